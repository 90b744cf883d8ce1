"""Runs the tiny variant of every cell of experiments/configs/matrix.py.

Writes ``matrix.md`` (a markdown table: one row per computational method, one
column per communication method; each cell "held-out metric / uplink KiB") into
--out and prints a JSON line last.

  python scripts/run_matrix.py --out=/tmp/matrix
  python scripts/run_matrix.py --out=/tmp/matrix --comp lora adapter --comm none q4
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

from experiments.configs import matrix  # noqa: E402
from fedjax_fm import train  # noqa: E402
from fedjax_fm.train import logs  # noqa: E402


HEADER = ('Tiny variants (a smoke test of every combination, not tuned results): '
          'held-out accuracy (encoder) or perplexity (decoder) / total uplink.\n\n')


def markdown_table(cells, comps, comms) -> str:
  """``cells[(comp, comm)] = (metric, value, uplink bytes)`` as a markdown table."""
  lines = ['| computation \\ communication | ' + ' | '.join(comms) + ' |',
           '|---|' + '---|' * len(comms)]
  for comp in comps:
    row = []
    for comm in comms:
      metric, value, up = cells[(comp, comm)]
      short = 'acc' if metric == 'accuracy' else 'ppl'
      row.append(f'{short} {value:.3f} / {logs.fmt_bytes(up)}')
    lines.append(f'| {comp} | ' + ' | '.join(row) + ' |')
  return '\n'.join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--out', default='/tmp/fedjax_fm_matrix')
  p.add_argument('--comp', nargs='+', default=list(matrix.COMPUTATION))
  p.add_argument('--comm', nargs='+', default=list(matrix.COMMUNICATION))
  p.add_argument('--rounds', type=int, default=None, help='override the tiny rounds')
  args = p.parse_args()
  cells = {}
  for comp in args.comp:
    for comm in args.comm:
      c = matrix.get_config(f'{comp},{comm},tiny')
      c.progress, c.checkpoint.every = False, 0
      if args.rounds:
        c.num_rounds = c.eval.every = args.rounds
      with contextlib.redirect_stdout(io.StringIO()):
        s = train.run(c, os.path.join(args.out, f'{comp}_{comm}'))
      metric = 'accuracy' if 'accuracy' in s['after'] else 'perplexity'
      cells[(comp, comm)] = (metric, s['after'][metric], s['uplink_bytes_total'])
      print(f'{comp:>8} x {comm:<9} {metric} {s["after"][metric]:.4f}  uplink '
            f'{s["uplink_bytes_total"] / 1024:.1f} KiB', flush=True)
  table = markdown_table(cells, args.comp, args.comm)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'matrix.md'), 'w') as fh:
    fh.write(HEADER + table + '\n')
  print(table)
  print(json.dumps({'bench': 'matrix', 'cells': {f'{a},{b}': {'metric': m, 'value': v,
                                                              'uplink_bytes': u}
                                                 for (a, b), (m, v, u) in cells.items()}}))


if __name__ == '__main__':
  main()
