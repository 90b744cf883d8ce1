"""Memory of the main job's compiled round at 10, 100 and 1000 clients per round.

Builds the main job (`experiments/configs/default.py`: MiniLM + LoRA, the
``chunked`` strategy) through `fedjax_fm.train.build_experiment`, the same
path as the binary, for each LoRA aggregation mode and number of clients per
round, compiles its round and reads XLA's memory analysis: the temporaries
(``temp``) are what the round allocates beyond its arguments and outputs. With
every aggregator streaming they stay flat as clients grow; the round's data
(``args``, token ids on the host side) is O(clients) by nature and is reported
apart. A whole-round aggregator (coordinate median), which must see every
update, is measured beside them for contrast.

  python scripts/bench_main_memory.py
  python scripts/bench_main_memory.py --clients 10 100 --modes fedit

The last line printed is ``{"bench": "main_memory", ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from experiments.configs import default  # noqa: E402
from fedjax_fm import train  # noqa: E402
from fedjax_fm.engine import memory  # noqa: E402


def measure(mode: str, clients: int, workdir: str) -> dict:
  c = default.get_config('')
  c.data.num_clients = max(1000, clients)
  c.data.partition = 'iid'
  c.fl.clients_per_round = clients
  c.progress = c.tensorboard = False
  if mode == 'median':
    c.aggregator.name = 'median'
  else:
    c.peft.lora_aggregation = mode
  exp = train.build_experiment(c, workdir)
  state = exp.fed_round.init(exp.split.trainable, jax.random.key(0))
  data = exp.round_data(0)
  t0 = time.time()
  mem = memory.round_memory(exp.fed_round, memory.shapes_of(state),
                            memory.shapes_of(exp.split.frozen), memory.shapes_of(data))
  return {'temp_mib': mem['temp'] / 2**20, 'args_mib': mem['argument'] / 2**20,
          'compile_s': time.time() - t0}


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--clients', type=int, nargs='+', default=[10, 100, 1000])
  p.add_argument('--modes', nargs='+', default=['fedit', 'stack', 'median'])
  p.add_argument('--workdir', default='/tmp/fedjax_fm_bench_main_memory')
  args = p.parse_args()
  result = {'bench': 'main_memory', 'config': 'experiments/configs/default.py',
            'strategy': 'chunked', 'chunk_size': default.get_config('').fl.chunk_size}
  for mode in args.modes:
    for clients in args.clients:
      rec = measure(mode, clients, args.workdir)
      print(json.dumps({'mode': mode, 'clients': clients, **rec}), flush=True)
      for k, v in rec.items():
        result[f'{mode}_c{clients}_{k}'] = round(v, 2)
  print(json.dumps(result))


if __name__ == '__main__':
  main()
