"""Time per federated round: each execution strategy vs a per-client Python loop.

The loop baseline is how peer simulators run clients: a Python loop over
clients and local steps around a jitted single-client step, deltas summed on
the host side of the loop, then the server update. Both sides use the same
model, loss, optimizers and data, and are timed in the same process, so the
ratios are meaningful on a shared, noisy machine.

  python scripts/bench_round.py                      # 64 and 256 clients x 5 local steps
  python scripts/bench_round.py --clients=64 --repeats=2

The last line printed is ``{"bench": "round", ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _parse():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--clients', type=int, nargs='+', default=[64, 256])
  p.add_argument('--local_steps', type=int, default=5)
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--chunk', type=int, default=16)
  p.add_argument('--devices', type=int, default=2,
                 help='forced host devices for the sharded strategy on CPU')
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--models', nargs='+', default=['mlp', 'lora_transformer'])
  return p.parse_args()


ARGS = _parse()
if 'jax' not in sys.modules:
  os.environ.setdefault('XLA_FLAGS',
                        f'--xla_force_host_platform_device_count={ARGS.devices}')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from fedjax_fm import engine  # noqa: E402
from fedjax_fm import models  # noqa: E402
from fedjax_fm import peft  # noqa: E402
from fedjax_fm import tree_util  # noqa: E402


def mlp_problem():
  model = models.MLPClassifier(32, (128, 128), 10, rngs=nnx.Rngs(0))
  split = peft.split_model(model, 'full')
  loss_fn = models.make_loss_fn(split.graphdef, models.features_classification_task())

  def make_batch(rng, shape):
    return {'x': rng.normal(size=shape + (32,)).astype(np.float32),
            'label': rng.integers(0, 10, size=shape).astype(np.int32)}
  return split, loss_fn, make_batch


def lora_transformer_problem():
  cfg = models.DecoderConfig(vocab_size=256, dim=64, num_layers=2, num_heads=4,
                             num_kv_heads=2, mlp_dim=128, max_len=32)
  model = models.Decoder(cfg, rngs=nnx.Rngs(0))
  peft.apply_lora(model, rank=4, alpha=8.0, target_modules=('q_proj', 'v_proj'),
                  rngs=nnx.Rngs(1))
  split = peft.split_model(model, 'lora')
  loss_fn = models.make_loss_fn(split.graphdef, models.causal_lm_task())

  def make_batch(rng, shape):
    return {'input_ids': rng.integers(0, 256, size=shape + (32,)).astype(np.int32),
            'attention_mask': np.ones(shape + (32,), np.int32)}
  return split, loss_fn, make_batch


def round_data(make_batch, clients, steps, batch, seed=0):
  rng = np.random.default_rng(seed)
  return {
      'batch': make_batch(rng, (clients, steps, batch)),
      'example_mask': np.ones((clients, steps, batch), bool),
      'step_mask': np.ones((clients, steps), bool),
      'weight': np.full((clients,), steps * batch, np.float32),
      'client_id': np.arange(clients, dtype=np.int32),
      'client_mask': np.ones((clients,), bool),
  }


def time_fn(fn, repeats):
  fn()  # compile / warm up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def python_loop_round(split, loss_fn, client_tx, server_tx):
  """A peer-style round: Python loops over clients and steps, one jitted step."""

  @jax.jit
  def client_step(params, opt_state, batch, mask, key):
    def objective(p):
      per = loss_fn(p, split.frozen, batch, key)
      return jnp.sum(per * mask) / jnp.maximum(mask.sum(), 1.0)
    loss, grads = jax.value_and_grad(objective)(params)
    updates, opt_state = client_tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def accumulate(acc, params, global_params, w):
    return jax.tree.map(lambda a, p, g: a + w * (p - g), acc, params, global_params)

  @jax.jit
  def server_step(params, opt_state, acc, wsum):
    grad = jax.tree.map(lambda a: -a / wsum, acc)
    updates, opt_state = server_tx.update(grad, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  def run(params, server_state, data, key):
    acc = tree_util.tree_zeros_like(params)
    clients, steps = data['step_mask'].shape
    for c in range(clients):
      p, s = params, client_tx.init(params)
      for t in range(steps):
        batch = jax.tree.map(lambda a: a[c, t], data['batch'])
        p, s, _ = client_step(p, s, batch, data['example_mask'][c, t].astype(np.float32),
                              jax.random.fold_in(key, c * steps + t))
      acc = accumulate(acc, p, params, float(data['weight'][c]))
    return server_step(params, server_state, acc, float(data['weight'].sum()))

  return run


def bench_problem(name, problem, clients):
  split, loss_fn, make_batch = problem()
  client_tx, server_tx = optax.sgd(0.05), optax.sgd(1.0)
  data = round_data(make_batch, clients, ARGS.local_steps, ARGS.batch)
  device_data = jax.device_put(data)
  out = {}
  strategies = [('vmap', None), ('chunked', ARGS.chunk),
                ('sharded', max(1, min(ARGS.chunk, clients // jax.device_count())))]
  for strategy, chunk in strategies:
    fed = engine.build_round(loss_fn, split.trainable, client_optimizer=client_tx,
                             server_optimizer=server_tx, num_clients=clients,
                             strategy=strategy, chunk_size=chunk)
    state = fed.init(split.trainable, jax.random.key(0))

    def one():
      s, m = fed.apply(state, split.frozen, device_data)
      jax.block_until_ready((s.params, m['train_loss']))
    out[strategy] = time_fn(one, ARGS.repeats)
  loop = python_loop_round(split, loss_fn, client_tx, server_tx)
  server_state = server_tx.init(split.trainable)

  def one_loop():
    jax.block_until_ready(loop(split.trainable, server_state, data, jax.random.key(0)))
  out['python_loop'] = time_fn(one_loop, max(1, ARGS.repeats - 1))
  best = min(out[s] for s, _ in strategies)
  result = {f'{name}_c{clients}_{k}_s': round(v, 4) for k, v in out.items()}
  for s, _ in strategies:
    result[f'{name}_c{clients}_loop_over_{s}'] = round(out['python_loop'] / out[s], 2)
  result[f'{name}_c{clients}_loop_over_best'] = round(out['python_loop'] / best, 2)
  print(json.dumps({'problem': name, 'clients': clients, **{k: round(v, 4) for k, v in
                                                             out.items()}}), flush=True)
  return result


def main():
  problems = {'mlp': mlp_problem, 'lora_transformer': lora_transformer_problem}
  result = {'bench': 'round', 'backend': jax.default_backend(),
            'devices': jax.device_count(), 'local_steps': ARGS.local_steps,
            'batch': ARGS.batch, 'chunk': ARGS.chunk}
  for name in ARGS.models:
    for clients in ARGS.clients:
      result.update(bench_problem(name, problems[name], clients))
  print(json.dumps(result))


if __name__ == '__main__':
  main()
