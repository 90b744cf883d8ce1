"""Start-up of the main job with JAX's persistent compilation cache: first vs second run.

Runs the binary (`python -m experiments.main`) twice on the same config with a
fresh, empty cache directory, each into a new workdir, and reads from each run's
``summary.json`` the round's compile time, and from its wall clock the time to
the end of the run. The first run fills the cache; the second loads the compiled
programs from it. A third run with ``--compilation_cache=`` (no cache) is the
reference.

  python scripts/bench_cache.py                          # the main job, 1 round
  python scripts/bench_cache.py --config=experiments/configs/mlp_synthetic.py:tiny

The last line printed is ``{"bench": "compilation_cache", ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_once(config: str, workdir: str, cache: str, rounds: int) -> dict:
  cmd = [sys.executable, '-m', 'experiments.main', f'--config={config}',
         f'--workdir={workdir}', f'--compilation_cache={cache}',
         f'--config.num_rounds={rounds}', '--config.progress=False',
         '--config.tensorboard=False', f'--config.eval.every={rounds}']
  t0 = time.time()
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
  wall = time.time() - t0
  if proc.returncode:
    raise RuntimeError(proc.stderr[-3000:])
  with open(os.path.join(workdir, 'summary.json')) as f:
    summary = json.load(f)
  return {'round_compile_s': summary['compile_time_s'], 'wall_s': wall}


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--config', default='experiments/configs/default.py')
  p.add_argument('--rounds', type=int, default=1)
  args = p.parse_args()
  result = {'bench': 'compilation_cache', 'config': args.config, 'rounds': args.rounds}
  with tempfile.TemporaryDirectory() as tmp:
    cache = os.path.join(tmp, 'cache')
    for name, cache_dir in (('no_cache', ''), ('first', cache), ('second', cache)):
      rec = run_once(args.config, os.path.join(tmp, name), cache_dir, args.rounds)
      print(json.dumps({'run': name, **rec}), flush=True)
      for k, v in rec.items():
        result[f'{name}_{k}'] = round(v, 2)
  result['second_over_first_compile'] = round(
      result['second_round_compile_s'] / max(result['first_round_compile_s'], 1e-9), 3)
  print(json.dumps(result))


if __name__ == '__main__':
  main()
