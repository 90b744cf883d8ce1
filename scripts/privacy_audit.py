"""Empirical privacy audit of one DP-FedAvg round next to the accountant's epsilon.

A canary client sends a fixed update of norm ``clip``; the auditor sees the
noised mean with and without it, thresholds its projection on the canary
direction (a membership-inference test), and turns the measured false
positive/negative rates (Clopper-Pearson bounds) into an epsilon lower bound.
A sound accountant must never be below it.

  python scripts/privacy_audit.py
  python scripts/privacy_audit.py --noise 0.5 1 2 --trials 20000

The last line printed is ``{"bench": "privacy_audit", ...}``.
"""

from __future__ import annotations

import argparse
import json

import jax

from fedjax_fm import privacy
from fedjax_fm.privacy import audit


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--noise', type=float, nargs='+', default=[0.5, 1.0, 2.0, 4.0])
  p.add_argument('--trials', type=int, default=20000)
  p.add_argument('--clients', type=int, default=10)
  p.add_argument('--delta', type=float, default=1e-5)
  args = p.parse_args()
  result = {'bench': 'privacy_audit', 'trials': args.trials, 'clients': args.clients,
            'delta': args.delta}
  for z in args.noise:
    out, inn = audit.gaussian_mechanism_scores(
        jax.random.key(0), args.trials, clip_norm=1.0, noise_multiplier=z,
        num_clients=args.clients, dim=64)
    lb = audit.empirical_epsilon(out, inn, args.delta)
    # One round that always includes the canary: sampling rate 1, one step.
    eps = privacy.epsilon(z, 1.0, 1, args.delta, accountant='pld')
    print(f'noise {z:>4}: empirical eps >= {lb.epsilon_lower_bound:.3f}   accountant eps = {eps:.3f}',
          flush=True)
    result[f'z{z}_empirical_lower_bound'] = round(float(lb.epsilon_lower_bound), 3)
    result[f'z{z}_accountant_epsilon'] = round(float(eps), 3)
  print(json.dumps(result))


if __name__ == '__main__':
  main()
