"""Accuracy against cumulative uplink MB for the runs of the communication grid.

  python scripts/plot_comm.py --runs /tmp/comm --out docs/results/comm.png

``--runs`` holds one workdir per compressor (as written by
``scripts/run_comm_grid.py``); every held-out evaluation in each
``metrics.jsonl`` becomes a point (cumulative uplink MiB, accuracy).
"""

from __future__ import annotations

import argparse
import json
import os

try:  # no fedjax_fm import here: plotting needs neither jax nor the package
  import matplotlib
except ImportError as e:
  raise ImportError('scripts/plot_comm.py needs matplotlib: pip install "fedjax_fm[plot]"') from e

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

LABELS = {
    'none': 'none (f32)', 'topk1_ef': 'top-k 1% + EF', 'topk2_q4_ef': 'top-k 2% + 4-bit + EF',
    'q4': '4-bit stochastic', 'q2': '2-bit stochastic', 'powersgd4': 'PowerSGD rank 4 + EF',
    'prune90': '90% pruning', 'q1': '1-bit stochastic', 'ffa': 'FFA-LoRA (f32)',
    'ffa_q1': 'FFA-LoRA + 1-bit', 'ffa_sign_ef': 'FFA-LoRA + sign + EF',
    'ffa_lr2': 'FFA-LoRA, 2x lr (f32)', 'ffa_lr2_q1': 'FFA-LoRA, 2x lr + 1-bit',
}


def curves(runs_dir):
  out = {}
  for name in sorted(os.listdir(runs_dir)):
    path = os.path.join(runs_dir, name, 'metrics.jsonl')
    summary = os.path.join(runs_dir, name, 'summary.json')
    if not os.path.exists(path):
      continue
    xs, ys = [], []
    if os.path.exists(summary):
      with open(summary) as f:
        out.setdefault('_before', json.load(f)['before']['accuracy'])
    with open(path) as f:
      for line in f:
        rec = json.loads(line)
        if 'eval' in rec:
          xs.append(rec['cum_uplink_bytes'] / 2**20)
          ys.append(rec['eval']['accuracy'])
    if xs:
      out[name] = (xs, ys)
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--runs', required=True)
  p.add_argument('--out', default='comm.png')
  p.add_argument('--points', nargs='+', default=None,
                 help='only these runs (names of the workdirs under --runs); default: all')
  args = p.parse_args()
  data = curves(args.runs)
  before = data.pop('_before', None)
  if args.points:
    missing = sorted(set(args.points) - set(data))
    if missing:
      raise SystemExit(f'--points {missing} have no held-out evaluations under {args.runs}; '
                       f'found: {sorted(data)}')
    data = {k: data[k] for k in args.points}
  if not data:
    raise SystemExit(f'no runs with held-out evaluations under {args.runs}')
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for name, (xs, ys) in data.items():
    ax.plot(xs, ys, marker='o', ms=3, label=LABELS.get(name, name))
  if before is not None:
    ax.axhline(before, color='grey', ls='--', lw=1, label='before training')
  ax.set_xscale('log')
  ax.set_xlabel('cumulative uplink (MiB, log scale)')
  ax.set_ylabel('held-out accuracy')
  ax.set_title('Federated LoRA on all-MiniLM-L6-v2: accuracy vs uplink')
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  fig.savefig(args.out, dpi=120)
  print(json.dumps({'plot': args.out, 'runs': sorted(data)}))


if __name__ == '__main__':
  main()
