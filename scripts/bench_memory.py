"""Peak host memory (RSS) of one LoRA round at 64, 256 and 1024 clients per round.

Each setting runs in a fresh subprocess (compile + one round) and reports its
peak resident set size, plus XLA's own count of the round's temporary buffers.
Under ``chunked`` the temporaries stay flat as clients grow; ``vmap`` grows
linearly. The round data itself (token ids, host side) is O(clients) and is
reported separately.

  python scripts/bench_memory.py
  python scripts/bench_memory.py --clients 64 256 --strategies chunked

The last line printed is ``{"bench": "memory", ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r'''
import json, os, resource, sys
sys.path.insert(0, {scripts!r})
import jax, optax
from benchlib import lora_transformer_problem, round_data
from fedjax_fm import engine
from fedjax_fm.engine import memory
split, loss_fn, make_batch = lora_transformer_problem()
data = round_data(make_batch, {clients}, 5, 8)
fed = engine.build_round(loss_fn, split.trainable, client_optimizer=optax.sgd(0.05),
                         server_optimizer=optax.sgd(1.0), num_clients={clients},
                         strategy={strategy!r}, chunk_size={chunk})
state = fed.init(split.trainable, jax.random.key(0))
temp = memory.round_memory(fed, memory.shapes_of(state), memory.shapes_of(split.frozen),
                           memory.shapes_of(data))['temp']
state, m = fed.apply(state, split.frozen, data)
jax.block_until_ready(m['train_loss'])
data_bytes = sum(x.nbytes for x in jax.tree.leaves(data))
print(json.dumps({{'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  'xla_temp_mb': temp / 2**20, 'round_data_mb': data_bytes / 2**20}}))
'''


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--clients', type=int, nargs='+', default=[64, 256, 1024])
  p.add_argument('--strategies', nargs='+', default=['chunked', 'vmap'])
  p.add_argument('--chunk', type=int, default=16)
  args = p.parse_args()
  scripts = os.path.dirname(os.path.abspath(__file__))
  result = {'bench': 'memory', 'model': 'LoRA decoder d=64 L=2 seq=32 rank 4',
            'local_steps': 5, 'batch': 8, 'chunk': args.chunk}
  for strategy in args.strategies:
    for clients in args.clients:
      code = CHILD.format(scripts=scripts, clients=clients, strategy=strategy,
                          chunk=args.chunk if strategy != 'vmap' else None)
      env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}
      proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                            env=env, check=False)
      if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
      rec = json.loads(proc.stdout.strip().splitlines()[-1])
      print(json.dumps({'strategy': strategy, 'clients': clients, **rec}), flush=True)
      for k, v in rec.items():
        result[f'{strategy}_c{clients}_{k}'] = round(v, 1)
  print(json.dumps(result))


if __name__ == '__main__':
  main()
