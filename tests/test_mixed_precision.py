"""bf16 compute for the frozen base; f32 trainable params and aggregation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
import pytest

from fedjax_fm import engine
from fedjax_fm import models
from fedjax_fm import peft

pytestmark = pytest.mark.slow


def _round(dtype):
  cfg = models.DecoderConfig(vocab_size=64, dim=32, num_layers=2, num_heads=4,
                             num_kv_heads=2, mlp_dim=64, max_len=16, dtype=dtype)
  model = models.Decoder(cfg, rngs=nnx.Rngs(0))
  peft.apply_lora(model, rank=4, alpha=8.0, target_modules=('q_proj', 'v_proj', 'o_proj'),
                  rngs=nnx.Rngs(1))
  split = peft.split_model(model, 'lora')
  loss_fn = models.make_loss_fn(split.graphdef, models.causal_lm_task())
  rng = np.random.default_rng(0)
  c, s, b = 4, 3, 4
  ids = rng.integers(0, 16, (c, s, b, 16)).astype(np.int32)   # a learnable, skewed vocab
  data = {'batch': {'input_ids': ids, 'attention_mask': np.ones_like(ids)},
          'example_mask': np.ones((c, s, b), bool), 'step_mask': np.ones((c, s), bool),
          'weight': np.full((c,), 12.0, np.float32), 'client_id': np.arange(c, dtype=np.int32)}
  fed = engine.build_round(loss_fn, split.trainable, client_optimizer=optax.sgd(0.5),
                           server_optimizer=optax.sgd(1.0), num_clients=c,
                           strategy='chunked', chunk_size=2)
  state = fed.init(split.trainable, jax.random.key(0))
  for _ in range(2):
    state, metrics = fed.apply(state, split.frozen, data)
  return split, state, metrics


def test_bf16_compute_matches_f32_within_bf16_tolerance():
  split32, s32, m32 = _round(jnp.float32)
  split16, s16, m16 = _round(jnp.bfloat16)
  # Params (trainable and frozen) and every aggregate stay float32.
  for leaf in jax.tree.leaves((s16.params, split16.frozen, s16.opt_state)):
    if hasattr(leaf, 'dtype') and jnp.issubdtype(leaf.dtype, jnp.floating):
      assert leaf.dtype == jnp.float32
  np.testing.assert_allclose(m16['train_loss'], m32['train_loss'], rtol=2e-2)
  d32 = jax.tree.map(lambda a, b: a - b, s32.params, split32.trainable)
  d16 = jax.tree.map(lambda a, b: a - b, s16.params, split16.trainable)
  num = sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(jax.tree.leaves(d16),
                                                         jax.tree.leaves(d32)))
  den = sum(float(jnp.sum(a ** 2)) for a in jax.tree.leaves(d32))
  assert np.sqrt(num / den) < 5e-2      # relative error of the model update
  assert float(m16['train_loss']) != float(m32['train_loss'])   # bf16 really ran
