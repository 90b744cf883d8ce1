"""Chunked rounds: temporary memory does not grow with clients per round."""

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

from fedjax_fm import engine
from fedjax_fm import models
from fedjax_fm import peft
from fedjax_fm.engine import memory

pytestmark = pytest.mark.slow


def _problem():
  cfg = models.DecoderConfig(vocab_size=128, dim=32, num_layers=1, num_heads=4,
                             num_kv_heads=2, mlp_dim=64, max_len=16)
  model = models.Decoder(cfg, rngs=nnx.Rngs(0))
  peft.apply_lora(model, rank=2, alpha=4.0, target_modules=('q_proj', 'v_proj'),
                  rngs=nnx.Rngs(1))
  split = peft.split_model(model, 'lora')
  return split, models.make_loss_fn(split.graphdef, models.causal_lm_task())


def _data_like(c, s=3, b=4, l=16):
  sds = jax.ShapeDtypeStruct
  return {'batch': {'input_ids': sds((c, s, b, l), jnp.int32),
                    'attention_mask': sds((c, s, b, l), jnp.int32)},
          'example_mask': sds((c, s, b), bool), 'step_mask': sds((c, s), bool),
          'weight': sds((c,), jnp.float32), 'client_id': sds((c,), jnp.int32),
          'client_mask': sds((c,), bool)}


def _temp(split, loss_fn, clients, strategy, chunk):
  fed = engine.build_round(loss_fn, split.trainable, client_optimizer=optax.sgd(0.1),
                           server_optimizer=optax.sgd(1.0), num_clients=4096,
                           strategy=strategy, chunk_size=chunk)
  state = jax.eval_shape(fed.init, split.trainable, jax.random.key(0))
  return memory.round_memory(fed, state, memory.shapes_of(split.frozen),
                             _data_like(clients))['temp']


@pytest.mark.slow
def test_chunked_memory_is_flat_in_clients_vmap_is_not():
  split, loss_fn = _problem()
  chunked = [_temp(split, loss_fn, c, 'chunked', 8) for c in (64, 256, 1024)]
  vmapped = [_temp(split, loss_fn, c, 'vmap', None) for c in (64, 256)]
  # Per-client outputs (losses, norms) are O(C) but tiny: allow 64 bytes per client.
  assert chunked[2] - chunked[0] <= 64 * (1024 - 64), chunked
  assert vmapped[1] > 3 * vmapped[0], vmapped
  assert vmapped[1] > 10 * chunked[1]


def test_choose_chunk_size_fits_the_budget():
  split, loss_fn = _problem()
  clients = 64

  def build(k):
    return engine.build_round(loss_fn, split.trainable, client_optimizer=optax.sgd(0.1),
                              server_optimizer=optax.sgd(1.0), num_clients=4096,
                              strategy='chunked', chunk_size=k)
  state = jax.eval_shape(build(1).init, split.trainable, jax.random.key(0))
  frozen, data = memory.shapes_of(split.frozen), _data_like(clients)
  t1 = memory.round_memory(build(1), state, frozen, data)['temp']
  t2 = memory.round_memory(build(2), state, frozen, data)['temp']
  budget = t1 + 6 * (t2 - t1)     # room for about 7 clients per chunk
  k = memory.choose_chunk_size(build, state, frozen, data, budget)
  assert clients % k == 0 and 1 < k <= 7
  assert memory.round_memory(build(k), state, frozen, data)['temp'] <= budget * 1.05
  assert memory.choose_chunk_size(build, state, frozen, data, 1) == 1
