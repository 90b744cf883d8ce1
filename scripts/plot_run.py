"""PNG plots of one run: loss and accuracy against round and against uplink bytes,
and the histogram of per-client accuracy (when the run evaluated clients locally).

  python scripts/plot_run.py --workdir /tmp/fl_default --out /tmp/fl_default/plots

Reads ``metrics.jsonl`` (and ``client_eval.json``, written with
``--config.eval.federated_test_fraction > 0``) from the workdir.
"""

from __future__ import annotations

import argparse
import json
import os

try:  # no fedjax_fm import here: plotting needs neither jax nor the package
  import matplotlib
except ImportError as e:
  raise ImportError('scripts/plot_run.py needs matplotlib: pip install "fedjax_fm[plot]"') from e

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402


def load(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f if line.strip()]
  if not records:
    raise SystemExit(f'{workdir}/metrics.jsonl has no records')
  summary = os.path.join(workdir, 'summary.json')
  if os.path.exists(summary):   # the held-out metrics before training, at round 0
    with open(summary) as f:
      before = json.load(f).get('before')
    if before:
      records.insert(0, {'round': 0, 'cum_uplink_bytes': 0, 'eval': before,
                         'train_loss': float('nan')})
  clients = None
  path = os.path.join(workdir, 'client_eval.json')
  if os.path.exists(path):
    with open(path) as f:
      clients = json.load(f)
  return records, clients


def plot_curves(records, out_dir):
  rounds = [r['round'] for r in records]
  mib = [r['cum_uplink_bytes'] / 2**20 for r in records]
  evals = [r for r in records if 'eval' in r]
  metric = next((k for k in ('accuracy', 'token_accuracy') if evals and k in evals[0]['eval']),
                None)
  paths = []
  for x_name, xs, eval_xs in (
      ('round', rounds, [r['round'] for r in evals]),
      ('uplink', mib, [r['cum_uplink_bytes'] / 2**20 for r in evals])):
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(xs, [r.get('train_loss', float('nan')) for r in records], label='train loss (clients)', lw=1)
    if evals:
      ax.plot(eval_xs, [r['eval']['loss'] for r in evals], 'o-', label='held-out loss')
    ax.set_xlabel('round' if x_name == 'round' else 'cumulative uplink (MiB)')
    ax.set_ylabel('loss')
    ax.grid(True, alpha=0.3)
    if metric:
      ax2 = ax.twinx()
      ax2.plot(eval_xs, [r['eval'][metric] for r in evals], 's--', color='tab:green',
               label=f'held-out {metric}')
      ax2.set_ylabel(metric)
      ax2.legend(loc='center right', fontsize=8)
    ax.legend(loc='upper right', fontsize=8)
    fig.tight_layout()
    path = os.path.join(out_dir, f'curves_vs_{x_name}.png')
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
  return paths


def plot_clients(clients, out_dir):
  per_client = clients['federated']['per_client']
  key = 'accuracy' if 'accuracy' in per_client else 'loss'
  values = [v for v in per_client[key] if v == v]   # drop NaN (clients without test data)
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.hist(values, bins=20, alpha=0.7, label='global model')
  if clients.get('personalization'):
    after = [v for v in clients['personalization']['after'].get(key, []) if v == v]
    ax.hist(after, bins=20, alpha=0.5, label='personalised')
  ax.set_xlabel(f'per-client {key}')
  ax.set_ylabel('clients')
  ax.legend(fontsize=8)
  fig.tight_layout()
  path = os.path.join(out_dir, f'client_{key}_hist.png')
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--workdir', required=True)
  p.add_argument('--out', default=None, help='default: WORKDIR/plots')
  args = p.parse_args()
  out_dir = args.out or os.path.join(args.workdir, 'plots')
  os.makedirs(out_dir, exist_ok=True)
  records, clients = load(args.workdir)
  paths = plot_curves(records, out_dir)
  if clients:
    paths.append(plot_clients(clients, out_dir))
  print(json.dumps({'plots': paths}))


if __name__ == '__main__':
  main()
