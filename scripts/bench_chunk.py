"""Time per round against the chunk size: where the sweet spot is, and the default's speed.

For each problem (an MLP and a small LoRA transformer, both from
``benchlib``; optionally a larger LoRA transformer) and clients per round
(100 and 500, 5 local steps of 8 examples), the ``chunked`` round is compiled
and timed for chunk sizes from 1 to all clients (``all`` = one chunk =
``vmap``). The automatic choice (``fl.chunk_size=0``, the default:
`fedjax_fm.engine.memory.auto_chunk_size` with one client's
`memory.client_bytes_bound`, as `fedjax_fm.train` computes it) is reported
next to the sweep's best; ``sharded`` over the forced host devices is timed
with its old default (all of a device's clients in one chunk), the automatic
chunk and the sweep's best. All rounds of a problem are compiled first, then
timed round-robin (median of ``--repeats``), so the ratios hold on a shared,
noisy machine; process CPU time is reported beside wall time.

  python scripts/bench_chunk.py
  python scripts/bench_chunk.py --models mlp --clients 100 --repeats 2
  python scripts/bench_chunk.py --models lora_transformer_big --clients 100
  python scripts/bench_chunk.py --models mlp --clients 100 --batch 32

The last line printed is ``{"bench": "chunk", ...}``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time


def _parse():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--models', nargs='+', default=['mlp', 'lora_transformer'],
                 help='mlp, lora_transformer, lora_transformer_big')
  p.add_argument('--clients', type=int, nargs='+', default=[100, 500])
  p.add_argument('--local_steps', type=int, default=5)
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--chunks', type=int, nargs='*', default=None,
                 help='chunk sizes to sweep (default: divisors of the clients per round)')
  p.add_argument('--devices', type=int, default=2,
                 help='forced host devices for the sharded strategy on CPU')
  p.add_argument('--repeats', type=int, default=3)
  return p.parse_args()


ARGS = _parse()
if 'jax' not in sys.modules:
  os.environ.setdefault('XLA_FLAGS',
                        f'--xla_force_host_platform_device_count={ARGS.devices}')

import jax  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import lora_transformer_problem, mlp_problem, round_data  # noqa: E402
from fedjax_fm import engine  # noqa: E402
from fedjax_fm.engine import memory  # noqa: E402


def divisors(n):
  return [k for k in range(1, n + 1) if n % k == 0]


def sweep_sizes(clients):
  if ARGS.chunks:
    return sorted({k for k in ARGS.chunks if clients % k == 0} | {clients})
  ks = divisors(clients)
  if len(ks) > 12:   # keep the sweep short: small sizes, a few middle ones, all
    ks = sorted({*ks[:6], *ks[6:-1:max(1, (len(ks) - 7) // 4)], ks[-1]})
  return ks


def build(problem, clients, strategy, chunk):
  split, loss_fn, data = problem
  fed = engine.build_round(loss_fn, split.trainable, client_optimizer=optax.sgd(0.05),
                           server_optimizer=optax.sgd(1.0), num_clients=clients,
                           strategy=strategy, chunk_size=chunk)
  state = fed.init(split.trainable, jax.random.key(0))

  def one():
    s, m = fed.apply(state, split.frozen, data)
    jax.block_until_ready((s.params, m['train_loss']))
  one()   # compile and warm up
  return one


def time_round_robin(runs):
  """Median wall and CPU seconds per round of each setting, timed in turns."""
  wall = {k: [] for k in runs}
  cpu = {k: [] for k in runs}
  for _ in range(ARGS.repeats):
    for k, one in runs.items():
      w, c = time.perf_counter(), time.process_time()
      one()
      wall[k].append(time.perf_counter() - w)
      cpu[k].append(time.process_time() - c)
  return ({k: statistics.median(v) for k, v in wall.items()},
          {k: statistics.median(v) for k, v in cpu.items()})


def work_bytes(problem):
  """`memory.client_bytes_bound` of one client, as `fedjax_fm.train` computes it."""
  split, loss_fn, data = problem
  one = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype),
                     {k: data[k] for k in ('batch', 'example_mask', 'step_mask')})
  bound = memory.client_bytes_bound(engine.make_client_update(loss_fn, optax.sgd(0.05)),
                                    split.trainable, memory.shapes_of(split.frozen), one,
                                    jax.random.key(0))
  return bound + 4 * sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(split.trainable))


def bench(name, make_problem, clients):
  split, loss_fn, make_batch = make_problem()
  data = jax.device_put(round_data(make_batch, clients, ARGS.local_steps, ARGS.batch))
  problem = (split, loss_fn, data)
  platform = jax.default_backend()
  bound = work_bytes(problem)
  auto = memory.auto_chunk_size(clients, platform=platform, work_bytes=bound)
  sizes = sweep_sizes(clients)
  runs = {k: build(problem, clients, 'chunked', k) for k in sorted({*sizes, auto})}
  wall, cpu = time_round_robin(runs)
  best = min((k for k in sizes), key=wall.get)
  for k in sorted(runs):
    print(json.dumps({'problem': name, 'clients': clients, 'strategy': 'chunked', 'chunk': k,
                      'round_s': round(wall[k], 4), 'cpu_s': round(cpu[k], 4),
                      'over_best': round(wall[k] / wall[best], 2)}), flush=True)
  prefix = f'{name}_c{clients}'
  out = {f'{prefix}_chunk_{k}_s': round(t, 4) for k, t in wall.items()}
  out.update({
      f'{prefix}_work_mib': round(bound / 2**20, 2),
      f'{prefix}_best_chunk': best, f'{prefix}_best_s': round(wall[best], 4),
      f'{prefix}_default_chunk': auto, f'{prefix}_default_s': round(wall[auto], 4),
      f'{prefix}_default_over_best': round(wall[auto] / wall[best], 2),
      f'{prefix}_default_over_best_cpu': round(cpu[auto] / cpu[best], 2),
      f'{prefix}_vmap_over_best': round(wall[clients] / wall[best], 2),
  })
  devices = jax.device_count()
  if devices > 1 and clients % devices == 0:
    per_device = clients // devices
    auto_d = memory.auto_chunk_size(per_device, platform=platform, work_bytes=bound,
                                    divides=True)
    best_d = max(d for d in divisors(per_device) if d <= best)
    chunks = {'old_default': per_device, 'default': auto_d, 'best': best_d}
    sharded = {k: build(problem, clients, 'sharded', k) for k in set(chunks.values())}
    swall, _ = time_round_robin(sharded)
    swall = {key: swall[k] for key, k in chunks.items()}
    for key, k in chunks.items():
      out[f'{prefix}_sharded_{key}_chunk'] = k
      out[f'{prefix}_sharded_{key}_s'] = round(swall[key], 4)
    out[f'{prefix}_sharded_old_default_over_default'] = round(
        swall['old_default'] / swall['default'], 2)
  print(json.dumps({'problem': name, 'clients': clients, 'best_chunk': best,
                    'default_chunk': auto,
                    'default_over_best': out[f'{prefix}_default_over_best'],
                    **{k: v for k, v in out.items() if 'sharded' in k}}), flush=True)
  return out


def main():
  problems = {'mlp': mlp_problem, 'lora_transformer': lora_transformer_problem,
              'lora_transformer_big': functools.partial(lora_transformer_problem, dim=128,
                                                        num_layers=4, seq=64)}
  result = {'bench': 'chunk', 'backend': jax.default_backend(), 'devices': jax.device_count(),
            'local_steps': ARGS.local_steps, 'batch': ARGS.batch}
  for name in ARGS.models:
    for clients in ARGS.clients:
      result.update(bench(name, problems[name], clients))
  print(json.dumps(result))


if __name__ == '__main__':
  main()
