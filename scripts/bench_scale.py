"""Throughput of a federated LoRA round next to its two reference points.

(a) a per-client Python loop around a jitted client step (how peer simulators
run clients), and (b) the centralised limit: one jitted training program over
the same examples with the same model, the same number of optimizer steps of
the same per-step work (S steps over the union of the clients' batches), i.e.
the round with zero federation overhead. All three are timed in one process.

  python scripts/bench_scale.py                              # tiny decoder, CPU
  python scripts/bench_scale.py --dim=768 --layers=12 --seq=256 --vocab=32000 \
      --clients=256 --batch=4 --dtype=bfloat16 --peak_tflops=989   # ~100M decoder, H100

The last line printed is ``{"bench": "scale", ...}``. MFU counts model FLOPs
per token as 6 x trainable + 4 x frozen matmul params (a frozen weight needs no
weight gradient) + 12 x layers x seq x dim (attention), divided by the round's
time and ``--peak_tflops``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
p.add_argument('--clients', type=int, default=256)
p.add_argument('--local_steps', type=int, default=5)
p.add_argument('--batch', type=int, default=8)
p.add_argument('--chunk', type=int, default=32)
p.add_argument('--dim', type=int, default=64)
p.add_argument('--layers', type=int, default=2)
p.add_argument('--seq', type=int, default=32)
p.add_argument('--vocab', type=int, default=256)
p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
p.add_argument('--devices', type=int, default=2, help='forced host devices on CPU')
p.add_argument('--repeats', type=int, default=3)
p.add_argument('--peak_tflops', type=float, default=0.0,
               help='device peak (e.g. 989 for H100 bf16 dense); 0: no MFU')
p.add_argument('--skip_loop', action='store_true')
ARGS = p.parse_args()
os.environ.setdefault('XLA_FLAGS', f'--xla_force_host_platform_device_count={ARGS.devices}')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import lora_transformer_problem, python_loop_round, round_data, time_fn  # noqa: E402,E501
from fedjax_fm import engine  # noqa: E402
from fedjax_fm import tree_util  # noqa: E402


def central_program(split, loss_fn, tx):
  """S optimizer steps, each over the union of all clients' batches."""

  @jax.jit
  def run(params, batch, mask, key):
    opt_state = tx.init(params)

    def step(carry, xs):
      params, opt_state = carry
      b, m = xs

      def objective(q):
        per = loss_fn(q, split.frozen, b, key)
        return jnp.sum(per * m) / jnp.maximum(m.sum(), 1.0)
      loss, grads = jax.value_and_grad(objective)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss
    (params, _), losses = jax.lax.scan(step, (params, opt_state), (batch, mask))
    return params, losses
  return run


def main():
  dtype = jnp.bfloat16 if ARGS.dtype == 'bfloat16' else jnp.float32
  split, loss_fn, make_batch = lora_transformer_problem(
      dim=ARGS.dim, num_layers=ARGS.layers, seq=ARGS.seq, vocab=ARGS.vocab, dtype=dtype)
  c, s, b = ARGS.clients, ARGS.local_steps, ARGS.batch
  data = round_data(make_batch, c, s, b)
  device_data = jax.device_put(data)
  tokens = c * s * b * ARGS.seq
  client_tx, server_tx = optax.sgd(0.05), optax.sgd(1.0)
  out = {}
  d, nl, sq = ARGS.dim, ARGS.layers, ARGS.seq
  frozen_matmul = tree_util.tree_size(split.frozen) - ARGS.vocab * d   # minus the embedding
  flops = tokens * (6 * tree_util.tree_size(split.trainable) + 4 * frozen_matmul
                    + 12 * nl * sq * d)
  for strategy, chunk in (('chunked', min(ARGS.chunk, c)),
                          ('sharded', max(1, min(ARGS.chunk, c // jax.device_count())))):
    fed = engine.build_round(loss_fn, split.trainable, client_optimizer=client_tx,
                             server_optimizer=server_tx, num_clients=c, strategy=strategy,
                             chunk_size=chunk)
    state = fed.init(split.trainable, jax.random.key(0))
    compiled = fed.apply.lower(state, split.frozen, device_data).compile()

    def one(compiled=compiled, state=state):
      st, m = compiled(state, split.frozen, device_data)
      jax.block_until_ready((st.params, m['train_loss']))
    out[strategy] = time_fn(one, ARGS.repeats)

  central = central_program(split, loss_fn, client_tx)
  # [C, S, B, ...] -> [S, C*B, ...]: the same examples, one big batch per step.
  cbatch = jax.tree.map(lambda x: np.swapaxes(x, 0, 1).reshape((s, c * b) + x.shape[3:]),
                        data['batch'])
  cmask = np.swapaxes(data['example_mask'], 0, 1).reshape(s, c * b).astype(np.float32)
  cbatch, cmask = jax.device_put((cbatch, cmask))
  out['central'] = time_fn(lambda: jax.block_until_ready(
      central(split.trainable, cbatch, cmask, jax.random.key(0))), ARGS.repeats)

  if not ARGS.skip_loop:
    loop = python_loop_round(split, loss_fn, client_tx, server_tx)
    sst = server_tx.init(split.trainable)
    out['python_loop'] = time_fn(lambda: jax.block_until_ready(
        loop(split.trainable, sst, data, jax.random.key(0))), max(1, ARGS.repeats - 1))

  best = min(out['chunked'], out['sharded'])
  result = {
      'bench': 'scale', 'backend': jax.default_backend(), 'device': str(jax.devices()[0]),
      'devices': jax.device_count(), 'clients': c, 'local_steps': s, 'batch': b,
      'seq': ARGS.seq, 'dim': ARGS.dim, 'layers': ARGS.layers, 'dtype': ARGS.dtype,
      'trainable_params': tree_util.tree_size(split.trainable),
      'frozen_params': tree_util.tree_size(split.frozen),
      **{f'{k}_s': round(v, 4) for k, v in out.items()},
      'round_tokens_per_s': round(tokens / best, 1),
      'round_clients_per_s': round(c / best, 2),
      'central_tokens_per_s': round(tokens / out['central'], 1),
      'round_over_central': round(best / out['central'], 3),
  }
  if 'python_loop' in out:
    result['loop_tokens_per_s'] = round(tokens / out['python_loop'], 1)
    result['speedup_over_loop'] = round(out['python_loop'] / best, 2)
  result['model_tflops_per_s'] = round(flops / best / 1e12, 4)
  if ARGS.peak_tflops:
    result['mfu'] = round(flops / best / 1e12 / ARGS.peak_tflops, 4)
  print(json.dumps(result))


if __name__ == '__main__':
  main()
