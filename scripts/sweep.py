"""Vectorised hyperparameter search: every setting in ONE compiled program.

The grid of client x server learning rates (and seeds) becomes one more array
axis over the server state (`fedjax_fm.engine.build_sweep`); all members train
on the same sampled clients and data each round. Prints a table of held-out
results and the best setting; the last line is ``{"bench": "sweep", ...}``.

  python scripts/sweep.py --config=experiments/configs/mlp_synthetic.py \
      --client_lr 0.01 0.05 0.2 --server_lr 0.003 0.01 0.03 --rounds 20
  python scripts/sweep.py --config=experiments/configs/default.py:tiny --client_lr 1e-3 3e-3
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from fedjax_fm import engine  # noqa: E402
from fedjax_fm import models  # noqa: E402
from fedjax_fm import train  # noqa: E402


def load_config(spec: str):
  path, _, arg = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('sweep_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--config', default=os.path.join(ROOT, 'experiments/configs/mlp_synthetic.py'))
  p.add_argument('--client_lr', type=float, nargs='+', default=[0.01, 0.05, 0.2])
  p.add_argument('--server_lr', type=float, nargs='+', default=None,
                 help='default: the config value')
  p.add_argument('--seeds', type=int, nargs='+', default=[0])
  p.add_argument('--rounds', type=int, default=None)
  p.add_argument('--workdir', default='/tmp/fedjax_fm_sweep')
  args = p.parse_args()

  c = load_config(args.config)
  c.progress = False
  if args.rounds:
    c.num_rounds = args.rounds
  exp = train.build_experiment(c, args.workdir)
  co, so = c.client_optimizer, c.server_optimizer
  server_lrs = args.server_lr or [so.learning_rate]
  settings = list(itertools.product(args.client_lr, server_lrs, args.seeds))

  fed = engine.build_round(
      models.make_loss_fn(exp.split.graphdef, exp.task), exp.split.trainable,
      client_optimizer=lambda h: engine.client_optimizer(co.name, h['client_lr'],
                                                         momentum=co.momentum),
      server_optimizer=lambda h: engine.server_optimizer(so.name, h['server_lr'],
                                                         momentum=so.momentum, b1=so.b1,
                                                         b2=so.b2, eps=so.eps),
      num_clients=exp.data.train.num_clients,
      strategy='chunked' if c.fl.strategy != 'vmap' else 'vmap',
      chunk_size=c.fl.chunk_size or None, prox_mu=c.fl.prox_mu)
  sweep = engine.build_sweep(fed)
  hp = {'client_lr': jnp.array([s[0] for s in settings], jnp.float32),
        'server_lr': jnp.array([s[1] for s in settings], jnp.float32)}
  keys = jax.vmap(jax.random.key)(jnp.array([s[2] for s in settings]))
  states = sweep.init(exp.split.trainable, keys, hp)
  t0 = time.time()
  for r in range(c.num_rounds):
    states, metrics = sweep.apply(states, exp.split.frozen, exp.round_data(r))
  jax.block_until_ready(metrics['train_loss'])
  elapsed = time.time() - t0
  results = []
  for i, (clr, slr, seed) in enumerate(settings):
    ev = exp.evaluate(jax.tree.map(lambda x: x[i], states.params))
    results.append({'client_lr': clr, 'server_lr': slr, 'seed': seed,
                    'train_loss': float(metrics['train_loss'][i]), **ev})
  key = 'accuracy' if 'accuracy' in results[0] else 'loss'
  best = (max if key == 'accuracy' else min)(results, key=lambda r: r[key])
  print(f'{len(settings)} settings x {c.num_rounds} rounds in one program: {elapsed:.1f}s')
  print('| client_lr | server_lr | seed | train loss | held-out ' + key + ' |')
  print('|---|---|---|---|---|')
  for r in results:
    print(f'| {r["client_lr"]:g} | {r["server_lr"]:g} | {r["seed"]} | {r["train_loss"]:.4f} '
          f'| {r[key]:.4f} |')
  print(f'best: client_lr={best["client_lr"]:g} server_lr={best["server_lr"]:g} '
        f'seed={best["seed"]} ({key} {best[key]:.4f})')
  print(json.dumps({'bench': 'sweep', 'settings': len(settings), 'rounds': c.num_rounds,
                    'seconds': round(elapsed, 2), 'best': best, 'results': results}))


if __name__ == '__main__':
  main()
