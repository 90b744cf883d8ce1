"""2-D meshes (clients x model): the sharded round equals one device."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from fedjax_fm import engine
from fedjax_fm import models
from fedjax_fm import peft
from fedjax_fm import sharding


def _problem():
  cfg = models.DecoderConfig(vocab_size=64, dim=32, num_layers=1, num_heads=4,
                             num_kv_heads=2, mlp_dim=64, max_len=8)
  model = models.Decoder(cfg, rngs=nnx.Rngs(0))
  peft.apply_lora(model, rank=2, alpha=4.0, target_modules=('q_proj', 'v_proj'),
                  rngs=nnx.Rngs(1))
  split = peft.split_model(model, 'lora')
  loss_fn = models.make_loss_fn(split.graphdef, models.causal_lm_task())
  rng = np.random.default_rng(0)
  c, s, b = 8, 2, 2
  data = {
      'batch': {'input_ids': rng.integers(0, 64, (c, s, b, 8)).astype(np.int32),
                'attention_mask': np.ones((c, s, b, 8), np.int32)},
      'example_mask': np.ones((c, s, b), bool), 'step_mask': np.ones((c, s), bool),
      'weight': rng.integers(1, 5, c).astype(np.float32),
      'client_id': np.arange(c, dtype=np.int32), 'client_mask': np.ones(c, bool)}
  return split, loss_fn, data


def _round(split, loss_fn, data, strategy, mesh=None, frozen=None, chunk=None):
  fed = engine.build_round(loss_fn, split.trainable, client_optimizer=optax.adam(1e-2),
                           server_optimizer=optax.sgd(1.0), num_clients=8,
                           strategy=strategy, chunk_size=chunk, mesh=mesh)
  state = fed.init(split.trainable, jax.random.key(0))
  state, m = fed.apply(state, split.frozen if frozen is None else frozen, data)
  return state, m


@pytest.mark.parametrize('clients,model', [(8, 1), (4, 2), (2, 4)])
@pytest.mark.slow
def test_2d_mesh_equals_single_device(clients, model):
  split, loss_fn, data = _problem()
  ref, m_ref = _round(split, loss_fn, data, 'vmap')
  mesh = sharding.make_mesh(clients, model)
  frozen = sharding.shard_frozen(split.frozen, mesh, min_size=256)
  if model > 1:   # the base really is split over the model axis
    specs = [x.sharding.spec for x in jax.tree.leaves(frozen)]
    assert any(sharding.MODEL in tuple(s) for s in specs)
  got, m_got = _round(split, loss_fn, data, 'sharded', mesh=mesh, frozen=frozen, chunk=1)
  for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(ref.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(m_got['train_loss'], m_ref['train_loss'], rtol=1e-5)


def test_logical_rules_and_errors():
  assert sharding.logical_to_spec(('clients', None, 'fsdp')) == jax.sharding.PartitionSpec(
      'clients', None, 'model')
  with pytest.raises(ValueError, match='no rule'):
    sharding.logical_to_spec(('heads',))
  with pytest.raises(ValueError, match='must equal the number of devices'):
    sharding.make_mesh(3, 2)
  mesh = sharding.make_mesh(4, 2)
  assert sharding.fsdp_spec((64, 30), mesh) == jax.sharding.PartitionSpec('model', None)
  assert sharding.fsdp_spec((30, 64), mesh) == jax.sharding.PartitionSpec(None, 'model')
  assert sharding.fsdp_spec((7,), mesh) == jax.sharding.PartitionSpec()
