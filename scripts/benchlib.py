"""Shared pieces of the benchmarks: problems, synthetic rounds, timers, baselines."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fedjax_fm import models
from fedjax_fm import peft
from fedjax_fm import tree_util


def mlp_problem():
  model = models.MLPClassifier(32, (128, 128), 10, rngs=nnx.Rngs(0))
  split = peft.split_model(model, 'full')
  loss_fn = models.make_loss_fn(split.graphdef, models.features_classification_task())

  def make_batch(rng, shape):
    return {'x': rng.normal(size=shape + (32,)).astype(np.float32),
            'label': rng.integers(0, 10, size=shape).astype(np.int32)}
  return split, loss_fn, make_batch


def lora_transformer_problem(dim=64, num_layers=2, seq=32, vocab=256, dtype=jnp.float32):
  cfg = models.DecoderConfig(vocab_size=vocab, dim=dim, num_layers=num_layers,
                             num_heads=max(dim // 16, 1), num_kv_heads=max(dim // 32, 1),
                             mlp_dim=2 * dim, max_len=seq, dtype=dtype)
  model = models.Decoder(cfg, rngs=nnx.Rngs(0))
  peft.apply_lora(model, rank=4, alpha=8.0, target_modules=('q_proj', 'v_proj'),
                  rngs=nnx.Rngs(1))
  split = peft.split_model(model, 'lora')
  loss_fn = models.make_loss_fn(split.graphdef, models.causal_lm_task())

  def make_batch(rng, shape):
    return {'input_ids': rng.integers(0, vocab, size=shape + (seq,)).astype(np.int32),
            'attention_mask': np.ones(shape + (seq,), np.int32)}
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


