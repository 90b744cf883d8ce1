"""Time per federated round: each execution strategy vs a per-client Python loop.

The loop baseline is how peer simulators run clients: a Python loop over
clients and local steps around a jitted single-client step, deltas summed on
the host side of the loop, then the server update. Both sides use the same
model, loss, optimizers and data, and are timed in the same process, so the
ratios are meaningful on a shared, noisy machine.

  python scripts/bench_round.py                      # 64 and 256 clients x 5 local steps
  python scripts/bench_round.py --clients=64 --repeats=2

The last line printed is ``{"bench": "round", ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _parse():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--clients', type=int, nargs='+', default=[64, 256])
  p.add_argument('--local_steps', type=int, default=5)
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--chunk', type=int, default=16)
  p.add_argument('--devices', type=int, default=2,
                 help='forced host devices for the sharded strategy on CPU')
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--models', nargs='+', default=['mlp', 'lora_transformer'])
  return p.parse_args()


ARGS = _parse()
if 'jax' not in sys.modules:
  os.environ.setdefault('XLA_FLAGS',
                        f'--xla_force_host_platform_device_count={ARGS.devices}')

import jax  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import lora_transformer_problem, mlp_problem  # noqa: E402
from benchlib import python_loop_round, round_data, time_fn  # noqa: E402
from fedjax_fm import engine  # noqa: E402


def bench_problem(name, problem, clients):
  split, loss_fn, make_batch = problem()
  client_tx, server_tx = optax.sgd(0.05), optax.sgd(1.0)
  data = round_data(make_batch, clients, ARGS.local_steps, ARGS.batch)
  device_data = jax.device_put(data)
  out = {}
  strategies = [('vmap', None), ('chunked', ARGS.chunk),
                ('sharded', max(1, min(ARGS.chunk, clients // jax.device_count())))]
  for strategy, chunk in strategies:
    fed = engine.build_round(loss_fn, split.trainable, client_optimizer=client_tx,
                             server_optimizer=server_tx, num_clients=clients,
                             strategy=strategy, chunk_size=chunk)
    state = fed.init(split.trainable, jax.random.key(0))

    def one():
      s, m = fed.apply(state, split.frozen, device_data)
      jax.block_until_ready((s.params, m['train_loss']))
    out[strategy] = time_fn(one, ARGS.repeats)
  loop = python_loop_round(split, loss_fn, client_tx, server_tx)
  server_state = server_tx.init(split.trainable)

  def one_loop():
    jax.block_until_ready(loop(split.trainable, server_state, data, jax.random.key(0)))
  out['python_loop'] = time_fn(one_loop, max(1, ARGS.repeats - 1))
  best = min(out[s] for s, _ in strategies)
  result = {f'{name}_c{clients}_{k}_s': round(v, 4) for k, v in out.items()}
  for s, _ in strategies:
    result[f'{name}_c{clients}_loop_over_{s}'] = round(out['python_loop'] / out[s], 2)
  result[f'{name}_c{clients}_loop_over_best'] = round(out['python_loop'] / best, 2)
  print(json.dumps({'problem': name, 'clients': clients, **{k: round(v, 4) for k, v in
                                                             out.items()}}), flush=True)
  return result


def main():
  problems = {'mlp': mlp_problem, 'lora_transformer': lora_transformer_problem}
  result = {'bench': 'round', 'backend': jax.default_backend(),
            'devices': jax.device_count(), 'local_steps': ARGS.local_steps,
            'batch': ARGS.batch, 'chunk': ARGS.chunk}
  for name in ARGS.models:
    for clients in ARGS.clients:
      result.update(bench_problem(name, problems[name], clients))
  print(json.dumps(result))


if __name__ == '__main__':
  main()
