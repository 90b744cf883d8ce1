"""Heterogeneous LoRA ranks: accuracy and uplink of each aggregation mode vs homogeneous ranks.

The default task (all-MiniLM-L6-v2 + LoRA on query/value, classifying standard-library
docstrings by package, 100 Dirichlet clients; ``experiments/configs/default.py``) with
the modes of ``experiments/configs/hetlora.py``: clients in three rank tiers 2 / 4 / 8
(40 / 30 / 30 %, fixed per client by the seed) aggregated by zero padding (data-weighted
mean), HetLoRA (sparsity-weighted, rank self-pruning penalty), stacking (exact mean
product merged into the base) and product + SVD (each tier gets its rank's
truncation), against every client at rank 8 and every client at rank 2. Shortened by
the size flags so that all six runs take a few minutes on a 2-core CPU.

Accuracy is measured on the held-out split for the server model (rank 8) and for that
model truncated to rank 2 (what a client of the lowest tier holds). Uplink is the sum,
over rounds and clients, of each client's bytes at its own rank (the round's
``uplink_bytes`` metric).

  python scripts/results_hetlora.py                    # writes docs/results/hetlora.{md,png}
  python scripts/results_hetlora.py --tiny --out=/tmp/hetlora_tiny

The last line printed is ``{"results": "hetlora", ...}``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import platform
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from experiments.configs import hetlora as hetlora_configs  # noqa: E402
from fedjax_fm import config as config_lib  # noqa: E402
from fedjax_fm import train  # noqa: E402
from fedjax_fm.peft import hetlora  # noqa: E402

LABELS = {
    'zeropad': 'ranks 2/4/8, zero padding (mean)',
    'hetlora': 'ranks 2/4/8, HetLoRA (sparsity-weighted + self-pruning)',
    'stack': 'ranks 2/4/8, stacking (exact, merged into base)',
    'product': 'ranks 2/4/8, product + SVD per tier',
    'homo_max': 'every client rank 8',
    'homo_min': 'every client rank 2',
}


@dataclasses.dataclass(frozen=True)
class Sizes:
  rounds: int = 8
  clients_per_round: int = 6
  local_steps: int = 2
  batch_size: int = 8
  max_len: int = 24
  chunk_size: int = 3
  eval_every: int = 4
  eval_examples: int = 256
  seed: int = 0


TINY = Sizes(rounds=2, clients_per_round=4, local_steps=1, batch_size=4, max_len=16,
             chunk_size=2, eval_every=2, eval_examples=64)


def make_config(mode: str, sizes: Sizes):
  c = hetlora_configs.get_config(mode)
  c.seed = sizes.seed
  c.num_rounds = sizes.rounds
  c.progress, c.tensorboard = False, False
  c.data.max_len = sizes.max_len
  c.fl.clients_per_round = sizes.clients_per_round
  c.fl.local_steps = sizes.local_steps
  c.fl.batch_size = sizes.batch_size
  c.fl.chunk_size = sizes.chunk_size
  c.eval.max_examples = sizes.eval_examples
  config_lib.validate(c, num_devices=1)
  return c


def run_mode(mode: str, sizes: Sizes, workdir: str, task_data=None, before=None):
  """One run; returns (its task data for the next runs, its measurements).

  ``before``: the held-out accuracy before training (measured when None; the
  same for every run: the same task data, model and LoRA initialisation).
  """
  c = make_config(mode, sizes)
  t0 = time.time()
  with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    exp = train.build_experiment(c, workdir, task_data=task_data)
  fed, frozen = exp.fed_round, exp.split.frozen
  state = fed.init(exp.split.trainable, jax.random.key(c.seed))
  curve, up, dense = [], 0.0, 0.0
  if before is None:
    before = exp.evaluate(exp.split.trainable)['accuracy']
  curve.append((0.0, float(before)))
  for r in range(sizes.rounds):
    state, m = fed.apply(state, frozen, exp.round_data(r))
    up += float(m['uplink_bytes'])
    dense += float(m.get('uplink_bytes_dense', m['uplink_bytes']))
    if (r + 1) % sizes.eval_every == 0 or r + 1 == sizes.rounds:
      acc = exp.evaluate(state.params, fed.frozen_view(state, frozen))['accuracy']
      curve.append((up, float(acc)))
  view = fed.frozen_view(state, frozen)
  low = min(hetlora_configs.RANKS)
  truncated = jax.tree.map(lambda p, k: jnp.where(k, p, 0), state.params,
                           hetlora.rank_masks(state.params, low))
  return exp.data, {
      'mode': mode,
      'accuracy': curve[-1][1],
      'accuracy_rank2': float(exp.evaluate(truncated, view)['accuracy']),
      'accuracy_before': float(before),
      'uplink_bytes': up,
      'uplink_bytes_dense': dense,
      'final_train_loss': float(m['train_loss']),
      'curve': curve,
      'seconds': time.time() - t0,
  }


def write_table(results: list[dict], sizes: Sizes, command: str, path: str, png: str,
                total_s: float):
  base = next((r for r in results if r['mode'] == 'homo_max'), None)
  lines = [
      '# Heterogeneous LoRA ranks on the default task',
      '',
      f'Command: `{command}`',
      '',
      'Task: all-MiniLM-L6-v2 with LoRA on query/value (peft.rank = 8 is the maximum rank) '
      'classifying standard-library docstrings by package, 100 Dirichlet(0.5) clients '
      '(`experiments/configs/default.py`), shortened: '
      f'{sizes.rounds} rounds of {sizes.clients_per_round} clients, {sizes.local_steps} '
      f'local Adam steps of batch {sizes.batch_size}, max_len {sizes.max_len}, held-out '
      f'accuracy on {sizes.eval_examples} examples; seed {sizes.seed}. Heterogeneous runs: '
      'ranks 2 / 4 / 8 for 40 / 30 / 30 % of the clients (`experiments/configs/hetlora.py`). '
      f'Machine: {platform.machine()} CPU, 2 cores shared with other jobs '
      f'(JAX {jax.__version__}); one seed, so differences of a few points are within '
      'run-to-run noise.',
      '',
      '| run | held-out acc (server model, rank 8) | acc truncated to rank 2 | uplink total '
      '(MiB) | uplink vs rank 8 | train loss (last round) | time (s) |',
      '|---|---:|---:|---:|---:|---:|---:|',
  ]
  for r in results:
    ratio = f"{r['uplink_bytes'] / base['uplink_bytes']:.2f}x" if base else '-'
    lines.append(f"| {LABELS[r['mode']]} (`{r['mode']}`) | {r['accuracy']:.3f} | "
                 f"{r['accuracy_rank2']:.3f} | {r['uplink_bytes'] / 2**20:.2f} | {ratio} | "
                 f"{r['final_train_loss']:.3f} | {r['seconds']:.0f} |")
  lines += [
      '',
      f"Held-out accuracy before training: {results[0]['accuracy_before']:.3f}. Uplink counts "
      'each client at its own rank: r (in + out) values per LoRA pair plus the classifier '
      'head, float32. Plot: `' + os.path.relpath(png, ROOT) + '` (accuracy against '
      'cumulative uplink). With `stack` the adapter is merged into the frozen base every '
      'round (its LoRA B is reset to 0), so truncating its factors changes nothing; a client '
      'of any tier then also downloads the merged base. Times: build, compilation, '
      f'rounds and evaluation (the first run also builds the task data); all runs '
      f'{total_s / 60:.1f} min of wall time.',
      '',
  ]
  with open(path, 'w') as fh:
    fh.write('\n'.join(lines))


def plot(results: list[dict], png: str):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for r in results:
    xs = [u / 2**20 for u, _ in r['curve']]
    ys = [a for _, a in r['curve']]
    ls = '--' if r['mode'].startswith('homo') else '-'
    ax.plot(xs, ys, marker='o', ms=3, ls=ls, label=LABELS[r['mode']])
  ax.axhline(results[0]['accuracy_before'], color='grey', ls=':', lw=1,
             label='before training')
  ax.set_xlabel('cumulative uplink (MiB)')
  ax.set_ylabel('held-out accuracy (server model)')
  ax.set_title('Heterogeneous LoRA ranks on all-MiniLM-L6-v2: accuracy vs uplink')
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
  fig.savefig(png, dpi=120)


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--out', default=os.path.join(ROOT, 'docs', 'results'))
  p.add_argument('--tiny', action='store_true', help='the tiny sizes (a smoke run)')
  p.add_argument('--modes', nargs='+', default=list(hetlora_configs.MODES),
                 choices=hetlora_configs.MODES)
  p.add_argument('--rounds', type=int, default=0, help='override the number of rounds')
  args = p.parse_args()
  sizes = TINY if args.tiny else Sizes()
  if args.rounds:
    sizes = dataclasses.replace(sizes, rounds=args.rounds)
  command = 'python scripts/results_hetlora.py' + (' --tiny' if args.tiny else '') + (
      f' --rounds={args.rounds}' if args.rounds else '')
  os.makedirs(args.out, exist_ok=True)
  results, task_data, before = [], None, None
  t0 = time.time()
  with tempfile.TemporaryDirectory() as tmp:
    for mode in args.modes:   # the same task data (and client partition) for every run
      task_data, result = run_mode(mode, sizes, os.path.join(tmp, mode), task_data, before)
      before = result['accuracy_before']
      results.append(result)
      print(json.dumps({k: v for k, v in results[-1].items() if k != 'curve'}), flush=True)
  md = os.path.join(args.out, 'hetlora.md')
  png = os.path.join(args.out, 'hetlora.png')
  plot(results, png)
  write_table(results, sizes, command, md, png, time.time() - t0)
  print(json.dumps({'results': 'hetlora', 'table': md, 'plot': png, 'runs': {
      r['mode']: {k: r[k] for k in ('accuracy', 'accuracy_rank2', 'uplink_bytes')}
      for r in results}}))


if __name__ == '__main__':
  main()
