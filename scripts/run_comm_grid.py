"""Runs every point of experiments/configs/comm_grid.py and prints bytes vs accuracy.

  python scripts/run_comm_grid.py --out=/tmp/comm            # full (about 3 min a point)
  python scripts/run_comm_grid.py --out=/tmp/comm --tiny      # seconds

Each point writes its workdir under --out; the table (markdown) goes to
--out/comm.md and the last line printed is ``{"bench": "comm_grid", ...}``.
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

from experiments.configs import comm_grid  # noqa: E402
from fedjax_fm import train  # noqa: E402


LAST = 3   # final accuracy moves by a few points between evaluations: also average these


def _row(summary, workdir):
  """(uplink bytes, final accuracy, mean accuracy of the last LAST evaluations)."""
  accs = []
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      rec = json.loads(line)
      if 'eval' in rec:
        accs.append(rec['eval']['accuracy'])
  final = summary['after']['accuracy']
  tail = accs[-LAST:] or [final]
  return summary['uplink_bytes_total'], final, sum(tail) / len(tail)


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--out', default='/tmp/fedjax_fm_comm')
  p.add_argument('--points', nargs='+', default=list(comm_grid.POINTS))
  p.add_argument('--tiny', action='store_true')
  p.add_argument('--table_only', action='store_true',
                 help='only rebuild the table from the summaries already under --out')
  args = p.parse_args()
  rows = {}
  if args.table_only:
    for point in comm_grid.POINTS:
      path = os.path.join(args.out, point, 'summary.json')
      if os.path.exists(path):
        with open(path) as f:
          s = json.load(f)
        rows[point] = _row(s, os.path.join(args.out, point))
  for point in ([] if args.table_only else args.points):
    c = comm_grid.get_config(point + (',tiny' if args.tiny else ''))
    c.progress = False
    workdir = os.path.join(args.out, point)
    with contextlib.redirect_stdout(io.StringIO()):
      s = train.run(c, workdir)
    rows[point] = _row(s, workdir)
    print(f'{point:>12}: uplink {s["uplink_bytes_total"] / 2**20:9.2f} MiB  '
          f'accuracy {s["after"]["accuracy"]:.4f}', flush=True)
  base_bytes, base_acc, base_last = rows.get('none', next(iter(rows.values())))
  lines = ['| compressor | uplink total | less than none | held-out accuracy | vs none '
           f'| mean of the last {LAST} evaluations | vs none |',
           '|---|---|---|---|---|---|---|']
  for point, (b, a, m) in rows.items():
    lines.append(f'| {point} | {b / 2**20:.2f} MiB | {base_bytes / b:.1f}x | {a:.4f} | '
                 f'{100 * (a - base_acc):+.1f} pt | {m:.4f} | {100 * (m - base_last):+.1f} pt |')
  table = '\n'.join(lines)
  with open(os.path.join(args.out, 'comm.md'), 'w') as fh:
    fh.write(table + '\n')
  print(table)
  print(json.dumps({'bench': 'comm_grid', **{f'{k}_uplink_bytes': v[0] for k, v in rows.items()},
                    **{f'{k}_accuracy': round(v[1], 4) for k, v in rows.items()},
                    **{f'{k}_accuracy_last{LAST}': round(v[2], 4) for k, v in rows.items()}}))


if __name__ == '__main__':
  main()
