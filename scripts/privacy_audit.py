"""Empirical privacy audit: a canary's membership test next to the accountant's epsilon.

Two kinds of audit, chosen with ``--family``:

``mechanism`` (the default): one DP-FedAvg aggregation (`gaussian_dp`) on its own.
  A canary client sends a fixed update of norm ``clip``; the auditor sees the
  noised mean with and without it (add/remove), thresholds its projection on the
  canary direction, and turns the measured false positive/negative rates
  (Clopper-Pearson bounds) into an epsilon lower bound.

``plain``, ``lora_fedit``, ``lora_ffa``, ``compressed``, ``adaptive`` (and
``skellam`` when ``config.privacy.mechanism`` allows it): the real federated
round, built by `fedjax_fm.train.build_experiment` from a tiny config of that
family (an MLP on synthetic features; a one-layer encoder with LoRA on a generated
text file; top-k with a stochastic quantizer and error feedback; adaptive
clipping). One client's data is replaced by a canary (identical examples that
give a large update, so the client sends exactly its clip norm in the canary's
direction); every trial runs ``--rounds`` rounds (same clients, the canary client
in every round) with fresh randomness, trials vectorised, and is scored by the
projection of the released params' change on the canary's direction. Because the
canary takes part in every round, the guarantee that bounds this test is the
accountant's epsilon *without* subsampling: ``rounds`` replace-one Gaussian
mechanisms, ``epsilon(z, 1, rounds, delta, sampling='fixed', population=m)``
(``accountant_epsilon``); the run's own accountant, with the sampling rate
``m / N``, is reported beside it (``accountant_epsilon_sampled``).

``--broken`` builds the round with the noise off while the accountant still claims
``--noise``: a sound audit must then report a lower bound above the claim.

  python scripts/privacy_audit.py
  python scripts/privacy_audit.py --noise 0.5 1 2 --trials 20000
  python scripts/privacy_audit.py --family plain lora_fedit lora_ffa compressed adaptive --noise 1 --trials 4000
  python scripts/privacy_audit.py --family plain --broken --noise 1 --rounds 1 --trials 400000

The last line printed is ``{"bench": "privacy_audit", ...}``.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import tempfile
import time

import jax
import numpy as np

from fedjax_fm import config as config_lib
from fedjax_fm import privacy
from fedjax_fm import train
from fedjax_fm.privacy import audit

ROUND_FAMILIES = ('plain', 'lora_fedit', 'lora_ffa', 'compressed', 'adaptive')


def mechanisms() -> tuple[str, ...]:
  """Values of ``config.privacy.mechanism`` (empty when the config has no such field).

  Read from its registry if there is one, else from the validator's message.
  """
  base = config_lib.base_config()
  if 'mechanism' not in base.privacy:
    return ()
  from fedjax_fm.train import registries  # pylint: disable=g-import-not-at-top
  for registry in registries.ALL:
    if registry.family == 'privacy.mechanism':
      return tuple(registry.names)
  c = family_config('plain', '.', noise=1.0, clip=1.0, clients=4, rounds=1, delta=1e-5)
  c.privacy.mechanism = '<not a mechanism>'
  try:
    config_lib.validate(c, num_devices=1)
  except config_lib.ConfigError as e:
    found = re.search(r'allowed values are (\(.*?\))', str(e))
    if found:
      return tuple(ast.literal_eval(found.group(1)))
  return (base.privacy.mechanism,)


def families() -> tuple[str, ...]:
  extra = ('skellam',) if 'skellam' in mechanisms() else ()
  return ('mechanism',) + ROUND_FAMILIES + extra


_WORDS = ('amber', 'basil', 'cedar', 'delta', 'ember', 'fjord', 'grove', 'heath', 'inlet',
          'jetty', 'knoll', 'larch', 'marsh', 'nexus', 'orbit', 'prism')


def write_text(path: str, n: int = 160, seed: int = 0) -> str:
  """A small JSONL of word sequences with 3 labels."""
  rng = np.random.default_rng(seed)
  with open(path, 'w') as f:
    for _ in range(n):
      label = int(rng.integers(0, 3))
      f.write(json.dumps({'text': ' '.join(rng.choice(_WORDS[label * 4: label * 4 + 8], 8)),
                          'label': label}) + '\n')
  return path


def family_config(family: str, workdir: str, *, noise: float, clip: float, clients: int,
                  rounds: int, delta: float):
  """The tiny experiment config of an audit family."""
  c = config_lib.base_config()
  c.num_rounds, c.progress, c.tensorboard = rounds, False, False
  lora = family.startswith('lora_')
  if lora:
    c.model.kind, c.model.hidden_size, c.model.num_layers = 'encoder', 16, 1
    c.model.num_heads, c.model.mlp_dim = 2, 32
    c.data.source, c.data.path = 'jsonl', write_text(os.path.join(workdir, 'text.jsonl'))
    c.data.tokenizer, c.data.vocab_size, c.data.max_len = 'sentencepiece', 64, 8
    c.peft.method, c.peft.rank, c.peft.lora_aggregation = 'lora', 2, family[len('lora_'):]
    c.peft.target_modules, c.peft.extra_trainable = ('query', 'value'), ('classifier',)
  else:
    c.model.kind, c.model.hidden = 'mlp', (8,)
    c.data.source, c.data.num_features, c.data.num_classes = 'synthetic', 8, 3
    c.data.num_examples = 240
    c.peft.method = 'full'
  c.data.num_clients, c.data.partition = 12, 'iid'
  c.fl.clients_per_round, c.fl.local_steps, c.fl.batch_size = clients, 1, 2
  c.fl.strategy = 'vmap'
  c.client_optimizer.name, c.client_optimizer.learning_rate = 'sgd', 0.5
  c.server_optimizer.name, c.server_optimizer.learning_rate = 'fedavg', 1.0
  c.eval.max_examples = 8
  c.privacy.enabled, c.privacy.clip_norm = True, clip
  c.privacy.noise_multiplier, c.privacy.delta = noise, delta
  if family == 'compressed':
    c.compress.uplink, c.compress.fraction, c.compress.then = 'top_k', 0.25, 'qsgd'
    c.compress.error_feedback, c.compress.min_size = True, 1
  if family == 'adaptive':
    c.privacy.adaptive = True
    c.privacy.clipped_count_stddev = max(clients / 20.0, 0.6 * noise)   # 2 sigma_b > z
  if family == 'skellam':
    c.privacy.mechanism = 'skellam'
  return c


def canary_data(data, kind: str, seed: int = 0):
  """The round data with client slot 0 holding the canary: identical, large examples."""
  rng = np.random.default_rng(seed + 7)
  out = jax.tree.map(np.array, data)
  batch = out['batch']
  if kind == 'mlp':
    v = rng.normal(size=batch['x'].shape[-1])
    batch['x'][0] = 30.0 * v / np.linalg.norm(v)
  else:
    batch['input_ids'][0] = rng.integers(1, 64, size=batch['input_ids'].shape[-1])
    batch['attention_mask'][0] = 1
  if 'label' in batch:
    batch['label'][0] = 0
  out['example_mask'][0] = True
  out['step_mask'][0] = True
  return out


def every_round_accountant(accountant, clients: int):
  """The run's accountant for a client that takes part in every round (no subsampling)."""
  if hasattr(accountant, 'params'):   # a distributed mechanism's (Skellam) accountant
    return type(accountant)(accountant.params, 1.0, accountant.delta)
  return privacy.Accountant(accountant.noise_multiplier, 1.0, accountant.delta,
                            accountant=accountant.accountant, sampling='fixed',
                            population=clients)


def audit_family(family: str, args, noise: float) -> dict:
  """Audits one family at one noise multiplier through the real round."""
  with tempfile.TemporaryDirectory() as workdir:
    claimed = family_config(family, workdir, noise=noise, clip=args.clip, clients=args.clients,
                            rounds=args.rounds, delta=args.delta)
    config_lib.validate(claimed, num_devices=1)
    run_config = claimed
    if args.broken:   # the round adds no noise; the accountant still claims `noise`
      run_config = family_config(family, workdir, noise=0.0, clip=args.clip,
                                 clients=args.clients, rounds=args.rounds, delta=args.delta)
    exp = train.build_experiment(run_config, workdir)
    claim = train.build_experiment(claimed, workdir, task_data=exp.data).accountant
  data = exp.round_data(0)
  rounds_out = [data] * args.rounds
  rounds_in = [canary_data(data, run_config.model.kind, args.seed)] * args.rounds
  state = exp.fed_round.init(exp.split.trainable, jax.random.key(args.seed))
  t0 = time.time()
  found = audit.audit_round(jax.random.key(args.seed + 1), exp.fed_round, state,
                            exp.split.frozen, rounds_out, rounds_in, args.trials, args.delta,
                            batch_size=args.batch, calibration_fraction=args.calibration)
  m = claimed.fl.clients_per_round
  eps_game = every_round_accountant(claim, m).step(args.rounds)
  eps_sampled = claim.step(args.rounds)
  r = found.result
  return {
      'family': family, 'rounds': args.rounds, 'noise_multiplier': noise,
      'noise_in_round': 0.0 if args.broken else noise, 'clip': args.clip, 'clients': m,
      'population': exp.data.train.num_clients, 'trials': args.trials,
      'accountant_epsilon': round(float(eps_game), 4),
      'accountant_epsilon_sampled': round(float(eps_sampled), 4),
      'empirical_lower_bound': round(float(r.epsilon_lower_bound), 4),
      'fpr': round(r.fpr, 5), 'fnr': round(r.fnr, 5),
      # ||released(in) - released(out)|| without noise, in units of C / m (at most 2 per
      # round: the replace-one sensitivity the accountant assumes).
      'canary_distance': round(float(np.linalg.norm(found.direction)) * m / args.clip, 4),
      'seconds': round(time.time() - t0, 1),
  }


def audit_mechanism(args, noise: float) -> dict:
  """The stand-alone DP-FedAvg aggregation (add/remove one canary client)."""
  out, inn = audit.gaussian_mechanism_scores(
      jax.random.key(args.seed), args.trials, clip_norm=1.0,
      noise_multiplier=0.0 if args.broken else noise, num_clients=args.clients, dim=64)
  lb = audit.empirical_epsilon(out, inn, args.delta, calibration_fraction=args.calibration)
  # One round that always includes the canary: sampling rate 1, one step.
  eps = privacy.epsilon(noise, 1.0, 1, args.delta, accountant='pld')
  return {'family': 'mechanism', 'rounds': 1, 'noise_multiplier': noise,
          'noise_in_round': 0.0 if args.broken else noise, 'clients': args.clients,
          'trials': args.trials, 'accountant_epsilon': round(float(eps), 4),
          'empirical_lower_bound': round(float(lb.epsilon_lower_bound), 4),
          'fpr': round(lb.fpr, 5), 'fnr': round(lb.fnr, 5)}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--family', nargs='+', default=['mechanism'], choices=families())
  p.add_argument('--noise', type=float, nargs='+', default=[0.5, 1.0, 2.0, 4.0])
  p.add_argument('--trials', type=int, default=20000, help='trials per world')
  p.add_argument('--clients', type=int, default=None,
                 help='mechanism: other clients (default 10); rounds: clients per round '
                      '(default 4)')
  p.add_argument('--rounds', type=int, default=2, help='rounds per trial (round families)')
  p.add_argument('--clip', type=float, default=0.01, help='clip norm (round families)')
  p.add_argument('--delta', type=float, default=1e-5)
  p.add_argument('--batch', type=int, default=2048, help='trials per vmapped call')
  p.add_argument('--calibration', type=float, default=0.5,
                 help='fraction of the trials that choose the threshold (the rest measure)')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--broken', action='store_true',
                 help='run without noise while the accountant claims --noise')
  args = p.parse_args(argv)
  result = {'bench': 'privacy_audit', 'trials': args.trials, 'delta': args.delta,
            'broken': args.broken, 'results': []}
  for family in args.family:
    for z in args.noise:
      if family == 'mechanism':
        args_f = argparse.Namespace(**{**vars(args), 'clients': args.clients or 10})
        row = audit_mechanism(args_f, z)
      else:
        args_f = argparse.Namespace(**{**vars(args), 'clients': args.clients or 4})
        row = audit_family(family, args_f, z)
      result['results'].append(row)
      sampled = row.get('accountant_epsilon_sampled')
      print(f'{family:>10} z={z:<4} rounds={row["rounds"]}: empirical eps >= '
            f'{row["empirical_lower_bound"]:.3f}   accountant eps = '
            f'{row["accountant_epsilon"]:.3f}'
            + (f' (with sampling {sampled:.3f})' if sampled is not None else ''),
            flush=True)
      if family == 'mechanism':   # the keys of earlier versions of this benchmark
        result[f'z{z}_empirical_lower_bound'] = round(row['empirical_lower_bound'], 3)
        result[f'z{z}_accountant_epsilon'] = round(row['accountant_epsilon'], 3)
  print(json.dumps(result))
  return result


if __name__ == '__main__':
  main()
