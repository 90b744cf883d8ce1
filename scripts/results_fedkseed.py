"""FedKSeed (zeroth-order, K seeds) against first-order LoRA on the default task.

Runs ``experiments/configs/fedkseed.py`` (all-MiniLM-L6-v2 on the stdlib
docstrings, FedKSeed and FedKSeed-Pro on the LoRA factors, FedKSeed on the full
model) and first-order FedAvg of LoRA (``experiments/configs/default.py``, Adam)
through `fedjax_fm.train.run`, with a reduced budget (few rounds, 4 clients per
round) so the whole table takes minutes on a 2-core CPU. Reports held-out
accuracy and loss, uplink and downlink bytes per client per round (from the
rounds' payload arrays), and the peak temporary memory of one client's local
training (XLA's memory analysis of the compiled client update: zeroth-order
against first-order, LoRA and full). Writes ``fedkseed.md`` into ``--out``
and prints a JSON line last.

  python scripts/results_fedkseed.py --out=docs/results
  python scripts/results_fedkseed.py --rounds=8 --full_rounds=1 --out=/tmp/fedkseed
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402

from experiments.configs import default  # noqa: E402
from experiments.configs import fedkseed  # noqa: E402
from fedjax_fm import engine  # noqa: E402
from fedjax_fm import models  # noqa: E402
from fedjax_fm import train  # noqa: E402
from fedjax_fm.engine import memory as memory_lib  # noqa: E402
from fedjax_fm.engine import zeroth_order as zo  # noqa: E402
from fedjax_fm.train import build as build_lib  # noqa: E402
from fedjax_fm.train import registries  # noqa: E402

METHODS = ('fo_lora', 'fedkseed_lora', 'fedkseed_pro_lora', 'fedkseed_full')
LABELS = {'fo_lora': 'first-order LoRA (FedAvg, Adam)',
          'fedkseed_lora': 'FedKSeed, LoRA',
          'fedkseed_pro_lora': 'FedKSeed-Pro, LoRA',
          'fedkseed_full': 'FedKSeed, full model',
          'fo_full': 'first-order full model (memory only)'}


def config_of(method: str, args):
  if method == 'fo_lora':
    c = default.get_config()
  elif method == 'fo_full':
    c = default.get_config()
    c.peft.method = 'full'
  else:
    c = fedkseed.get_config('full' if method.endswith('full') else 'lora')
    if 'pro' in method:
      c.fl.algorithm = 'fedkseed_pro'
  full = method.endswith('full')
  c.num_rounds = args.full_rounds if full and method != 'fo_full' else args.rounds
  c.fl.clients_per_round = args.clients
  c.fl.chunk_size = args.clients
  c.fl.local_steps = args.full_steps if full else args.local_steps
  c.data.max_len = 16
  c.eval.every = c.num_rounds
  c.eval.max_examples = args.eval_examples
  c.checkpoint.every = 0
  c.progress, c.tensorboard = False, False
  return c


def client_memory(c) -> int:
  """Temporary bytes of one client's compiled local training (XLA's memory analysis)."""
  exp = build_lib.build_experiment(c, None)
  loss_fn = models.make_loss_fn(exp.split.graphdef, exp.task)
  data = memory_lib.shapes_of(exp.round_data(0))
  one = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype),
                     {k: data[k] for k in ('batch', 'example_mask', 'step_mask')})
  trainable = memory_lib.shapes_of(exp.split.trainable)
  frozen = memory_lib.shapes_of(exp.split.frozen)
  key = jax.random.key(0)
  if c.fl.algorithm in ('fedkseed', 'fedkseed_pro'):
    client = zo.make_zo_client_update(loss_fn, num_seeds=c.zo.num_seeds, eps=c.zo.eps,
                                      learning_rate=c.client_optimizer.learning_rate)
    pool = zo.pool_key(key)
    fn = lambda p, f, d: client(p, f, d, key, pool)[:3]   # noqa: E731
  else:
    tx = registries.CLIENT_OPTIMIZERS[c.client_optimizer.name](c.client_optimizer)
    client = engine.make_client_update(loss_fn, tx)
    fn = lambda p, f, d: client(p, f, d, key)[0]   # noqa: E731
  return zo.client_step_memory(fn, trainable, frozen, one)['temp']


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--out', default='/tmp/fedjax_fm_fedkseed')
  p.add_argument('--workdir', default='/tmp/fedjax_fm_fedkseed_runs')
  p.add_argument('--rounds', type=int, default=6)
  p.add_argument('--clients', type=int, default=4)
  p.add_argument('--local_steps', type=int, default=16)
  p.add_argument('--full_rounds', type=int, default=1)
  p.add_argument('--full_steps', type=int, default=4)
  p.add_argument('--eval_examples', type=int, default=512)
  p.add_argument('--methods', nargs='+', default=list(METHODS), choices=METHODS)
  p.add_argument('--memory_batch', type=int, default=32)
  p.add_argument('--memory_len', type=int, default=64)
  args = p.parse_args()
  os.makedirs(args.out, exist_ok=True)
  rows = {}
  start = time.time()
  for method in args.methods:
    c = config_of(method, args)
    workdir = os.path.join(args.workdir, method)
    with contextlib.redirect_stdout(io.StringIO()):
      summary = train.run(c, workdir)
      exp = build_lib.build_experiment(c, None)
      fr = exp.fed_round
    rows[method] = {
        'rounds': summary['rounds'], 'local_steps': c.fl.local_steps,
        'accuracy_before': summary['before']['accuracy'],
        'accuracy': summary['after']['accuracy'], 'loss': summary['after']['loss'],
        'uplink_bytes': fr.uplink_bytes_per_client,
        'downlink_bytes': fr.downlink_bytes_per_client,
        'client_temp_bytes': client_memory(c),
        'time_s': round(summary['total_time_s'], 1),
    }
    print(method, json.dumps(rows[method]), flush=True)
  with contextlib.redirect_stdout(io.StringIO()):
    fo_full_mem = client_memory(config_of('fo_full', args))
  # The same clients with larger batches: first-order memory grows with the activations.
  big = {}
  for method in ('fo_full', 'fedkseed_full'):
    c = config_of(method, args)
    c.fl.batch_size, c.data.max_len = args.memory_batch, args.memory_len
    with contextlib.redirect_stdout(io.StringIO()):
      big[method] = client_memory(c)
    print(method, 'batch', args.memory_batch, 'len', args.memory_len, big[method], flush=True)
  total = time.time() - start

  def mib(b):
    return f'{b / 2**20:.2f} MiB'

  lines = [
      '# FedKSeed against first-order LoRA (default task, reduced budget)',
      '',
      f'Command: `python scripts/results_fedkseed.py --out=docs/results` (rounds={args.rounds}, '
      f'clients={args.clients}, local_steps={args.local_steps}, full_rounds={args.full_rounds}, '
      f'full_steps={args.full_steps}, eval_examples={args.eval_examples}).',
      f'Task: all-MiniLM-L6-v2 on the stdlib docstrings (8 labels, 100 clients, Dirichlet '
      f'0.5), {args.clients} clients per round, batch 8, max_len 16; FedKSeed with K=4096 '
      f'seeds, eps=1e-3, plain SGD (LoRA lr 1e-2, full lr 2e-5); first-order LoRA: Adam 2e-3. '
      f'Machine: {platform.machine()} CPU, 2 cores shared with other jobs; '
      f'{total:.0f} s in all.',
      '',
      'Uplink and downlink: bytes per client per round from the payload arrays (FedKSeed: '
      'an int16 seed index and a float32 scalar per local step up; the K=4096 accumulated '
      'float32 scalars a client replays down). Client memory: temporary bytes of one '
      'client\'s compiled local training (XLA memory analysis; parameters and data not '
      'counted).',
      '',
      '| method | rounds x local steps | accuracy before -> after | held-out loss | '
      'uplink / client / round | downlink / client / round | client temp memory | wall |',
      '|---|---|---|---|---|---|---|---|',
  ]
  for method, r in rows.items():
    lines.append(
        f'| {LABELS[method]} | {r["rounds"]} x {r["local_steps"]} | '
        f'{r["accuracy_before"]:.3f} -> {r["accuracy"]:.3f} | {r["loss"]:.4f} | '
        f'{r["uplink_bytes"]:,} B | {r["downlink_bytes"]:,} B | '
        f'{mib(r["client_temp_bytes"])} | {r["time_s"]:.0f} s |')
  lines.append(f'| {LABELS["fo_full"]} | - | - | - | - | - | {mib(fo_full_mem)} | - |')
  lines += [
      '',
      f'Client temp memory of the full model with batch {args.memory_batch} x '
      f'{args.memory_len} tokens (the same {args.full_steps} local steps; compiled only): '
      f'first-order (Adam) {mib(big["fo_full"])}, FedKSeed {mib(big["fedkseed_full"])}. '
      'A FedKSeed client holds about four parameter-sized buffers (the params, z and the '
      'perturbed copies: XLA does not update them in place as MeZO does in PyTorch) and '
      'no gradient, optimizer state or stored activations, whatever the batch; a '
      'first-order client holds the gradient, the Adam moments and every layer\'s '
      'activations for the backward pass, which grow with the batch. So with the full '
      'model at batch 8 x 16 tokens FedKSeed needs more than first-order Adam, and at '
      'larger batches far less; with LoRA (few trainable params) it needs less at any batch.',
  ]
  lines += [
      '',
      'With this budget (a few hundred zeroth-order steps in all) FedKSeed barely moves the '
      'held-out metrics: a zeroth-order step estimates one random direction of a '
      'gradient in tens of thousands (LoRA) to 22.7 million (full) dimensions, and the '
      'paper runs thousands of steps on billion-parameter models. What the table shows '
      'at this scale is the cost side: the uplink and the client memory.',
  ]
  with open(os.path.join(args.out, 'fedkseed.md'), 'w') as fh:
    fh.write('\n'.join(lines) + '\n')
  print(json.dumps({'results': 'fedkseed', 'rows': rows, 'fo_full_client_temp_bytes':
                    fo_full_mem, 'client_temp_bytes_large_batch': big,
                    'total_s': round(total, 1)}))


if __name__ == '__main__':
  main()
