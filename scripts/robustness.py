"""Accuracy under attack: every aggregator at 0%, 10% and 20% malicious clients.

Runs ``experiments/configs/mlp_synthetic.py`` (FedAdam on a non-IID Gaussian
mixture, 200 clients, 32 per round) once per (aggregator, attacker fraction),
writes ``robustness.md`` (a markdown table) into ``--out`` and prints a JSON
line last. Attackers are a fixed, seeded subset of the population; their
updates are corrupted as ``--kind`` says.

  python scripts/robustness.py --out=/tmp/robustness
  python scripts/robustness.py --kind=nan --rounds=20
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from experiments.configs import mlp_synthetic  # noqa: E402
from fedjax_fm import train  # noqa: E402

AGGREGATORS = ('mean', 'norm_bounded_mean', 'median', 'trimmed_mean', 'krum', 'multi_krum',
               'geometric_median')


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--out', default='/tmp/fedjax_fm_robustness')
  p.add_argument('--kind', default='scale', choices=['sign_flip', 'scale', 'noise', 'nan'])
  p.add_argument('--scale', type=float, default=-10.0)
  p.add_argument('--rounds', type=int, default=30)
  p.add_argument('--fractions', type=float, nargs='+', default=[0.0, 0.1, 0.2])
  p.add_argument('--aggregators', nargs='+', default=list(AGGREGATORS))
  args = p.parse_args()
  os.makedirs(args.out, exist_ok=True)
  acc = {}
  for name in args.aggregators:
    for frac in args.fractions:
      c = mlp_synthetic.get_config()
      c.num_rounds, c.progress, c.checkpoint.every = args.rounds, False, 0
      c.eval.every = args.rounds
      c.aggregator.name = name
      c.aggregator.num_byzantine = max(1, round(frac * c.fl.clients_per_round))
      c.aggregator.max_norm = 0.5
      c.aggregator.trim_fraction = 0.25
      if frac:
        c.attack.kind, c.attack.fraction, c.attack.scale = args.kind, frac, args.scale
      workdir = os.path.join(args.out, f'{name}_{int(frac * 100)}')
      with contextlib.redirect_stdout(io.StringIO()):
        summary = train.run(c, workdir)
      acc[(name, frac)] = summary['after']['accuracy']
      print(f'{name:>18} attackers={frac:.0%}: accuracy {acc[(name, frac)]:.4f}', flush=True)
  header = '| aggregator | ' + ' | '.join(f'{f:.0%} attackers' for f in args.fractions) + ' |'
  lines = [header, '|' + '---|' * (len(args.fractions) + 1)]
  for name in args.aggregators:
    lines.append(f'| {name} | ' + ' | '.join(f'{acc[(name, f)]:.3f}' for f in args.fractions)
                 + ' |')
  table = '\n'.join(lines)
  with open(os.path.join(args.out, 'robustness.md'), 'w') as fh:
    fh.write(f'Attack: {args.kind} (scale {args.scale}), {args.rounds} rounds of '
             f'mlp_synthetic; held-out accuracy.\n\n{table}\n')
  print(table)
  print(json.dumps({'bench': 'robustness', 'kind': args.kind, 'scale': args.scale,
                    **{f'{n}_{int(f * 100)}': round(a, 4) for (n, f), a in acc.items()}}))


if __name__ == '__main__':
  main()
