"""Tests for split_model / merge and the engine-style functional flow."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from fedjax_fm import peft
from fedjax_fm.models import tasks
from fedjax_fm.models.encoder import Encoder, EncoderConfig
from fedjax_fm.models.mlp import MLPClassifier

# Same shapes as tests/test_encoder.py (reuses compiled eager ops).
ENC = EncoderConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=4,
                    intermediate_size=32, max_position=20, num_labels=3,
                    dropout=0.2)


def _paths(tree):
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'.'.join(str(getattr(k, 'key', k)) for k in path) for path, _ in flat}


def _batch():
  rng = np.random.default_rng(0)
  mask = np.ones((3, 9), np.int32)
  mask[1, 4:] = 0
  return {'input_ids': jnp.asarray(rng.integers(0, 50, (3, 9))),
          'attention_mask': jnp.asarray(mask),
          'label': jnp.asarray([0, 1, 2])}


def _lora_encoder():
  model = Encoder(ENC, rngs=nnx.Rngs(0))
  peft.apply_lora(model, rank=4, alpha=8.0, target_modules=('query', 'value'),
                  rngs=nnx.Rngs(1))
  return model


def test_full_split_round_trip():
  model = MLPClassifier(5, [7], 3, rngs=nnx.Rngs(0))
  x = jnp.ones((2, 5))
  split = peft.split_model(model, 'full')
  assert isinstance(split.trainable, dict) and isinstance(split.frozen, dict)
  assert _paths(split.trainable) == {
      'layers.0.kernel', 'layers.0.bias', 'classifier.kernel',
      'classifier.bias'}
  assert peft.count_params(split.trainable) == 5 * 7 + 7 + 7 * 3 + 3
  assert peft.count_params(model) == peft.count_params(split.trainable)
  assert peft.tree_bytes(split.trainable) == 4 * (5 * 7 + 7 + 7 * 3 + 3)
  np.testing.assert_array_equal(np.asarray(peft.merge(split)(x)),
                                np.asarray(model(x)))
  # New values go in; the original model is untouched.
  zeros = jax.tree_util.tree_map(jnp.zeros_like, split.trainable)
  m2 = peft.merge(split.graphdef, zeros, split.frozen)
  np.testing.assert_array_equal(np.asarray(m2(x)), 0.0)
  assert np.abs(np.asarray(model(x))).max() > 0


@pytest.mark.slow
def test_lora_split_contents_and_round_trip():
  model = _lora_encoder()
  batch = _batch()
  split = peft.split_model(model, 'lora', extra_trainable=('classifier',))
  trainable = _paths(split.trainable)
  assert all(p.endswith(('lora_a', 'lora_b')) or p.startswith('classifier.')
             for p in trainable)
  assert 'layers.0.query.lora_a' in trainable
  assert 'layers.1.value.lora_b' in trainable
  assert {'classifier.kernel', 'classifier.bias'} <= trainable
  frozen = _paths(split.frozen)
  assert 'layers.0.query.base.kernel' in frozen
  assert 'layers.0.key.kernel' in frozen
  assert 'embeddings.word.embedding' in frozen
  assert not trainable & frozen
  assert peft.count_params(split.trainable) + peft.count_params(
      split.frozen) == peft.count_params(model)
  want = model(batch['input_ids'], batch['attention_mask'])
  got = peft.merge(split)(batch['input_ids'], batch['attention_mask'])
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # Without extra_trainable only LoRA factors train; a regex works too.
  only = peft.split_model(model, 'lora')
  assert all(p.endswith(('lora_a', 'lora_b')) for p in _paths(only.trainable))
  rx = peft.split_model(model, 'lora', extra_trainable=(r'layers\.1\..*norm',))
  assert 'layers.1.attn_norm.scale' in _paths(rx.trainable)
  assert 'layers.0.attn_norm.scale' not in _paths(rx.trainable)


def test_split_errors():
  model = MLPClassifier(5, [7], 3, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="'full', 'lora'"):
    peft.split_model(model, 'adapters')
  with pytest.raises(ValueError, match='apply_lora'):
    peft.split_model(model, 'lora')
  lora_model = _lora_encoder()
  with pytest.raises(ValueError, match='classifer'):
    peft.split_model(lora_model, 'lora', extra_trainable=('classifer',))


@pytest.mark.slow
def test_grad_through_loss_fn():
  model = _lora_encoder()
  split = peft.split_model(model, 'lora', extra_trainable=('classifier',))
  task = tasks.classification_task()
  loss_fn = tasks.make_loss_fn(split.graphdef, task)
  batch = _batch()
  frozen_before = jax.tree_util.tree_map(np.array, split.frozen)

  @jax.jit
  def grad_fn(trainable, frozen, batch, key):
    def mean_loss(t):
      return loss_fn(t, frozen, batch, key).mean()

    return jax.value_and_grad(mean_loss)(trainable)

  loss, grads = grad_fn(split.trainable, split.frozen, batch,
                        jax.random.key(0))
  assert loss.shape == () and np.isfinite(loss)
  assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(
      split.trainable)
  # lora_b starts at zero but receives gradient; lora_a does not yet.
  gb = np.asarray(grads['layers'][0]['query']['lora_b'])
  assert np.abs(gb).max() > 0
  np.testing.assert_array_equal(
      np.asarray(grads['layers'][0]['query']['lora_a']), 0.0)
  assert np.abs(np.asarray(grads['classifier']['kernel'])).max() > 0
  # Frozen state is passed through unchanged.
  jax.tree_util.tree_map(np.testing.assert_array_equal, split.frozen,
                         frozen_before)
  # Per-example losses agree with the stateful model.
  want = task.loss(model, batch, None)
  np.testing.assert_allclose(
      np.asarray(loss_fn(split.trainable, split.frozen, batch, None)),
      np.asarray(want), rtol=1e-6)


@pytest.mark.slow
def test_vmap_over_clients():
  model = _lora_encoder()
  split = peft.split_model(model, 'lora', extra_trainable=('classifier',))
  eval_fn = tasks.make_eval_fn(split.graphdef, tasks.classification_task())
  batch = _batch()
  stacked = jax.tree_util.tree_map(lambda x: jnp.stack([x, 2 * x]),
                                   split.trainable)
  out = jax.jit(jax.vmap(eval_fn, in_axes=(0, None, None)))(
      stacked, split.frozen, batch)
  assert out['loss'].shape == (2, 3)
  single = eval_fn(split.trainable, split.frozen, batch)
  np.testing.assert_allclose(np.asarray(out['loss'][0]),
                             np.asarray(single['loss']), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_vmap_loss_over_clients_with_dropout_keys():
  model = _lora_encoder()
  split = peft.split_model(model, 'lora', extra_trainable=('classifier',))
  loss_fn = tasks.make_loss_fn(split.graphdef, tasks.classification_task())
  batch = _batch()
  keys = jax.random.split(jax.random.key(0), 2)
  stacked = jax.tree_util.tree_map(lambda x: jnp.stack([x, x]),
                                   split.trainable)
  losses = jax.jit(jax.vmap(loss_fn, in_axes=(0, None, None, 0)))(
      stacked, split.frozen, batch, keys)
  assert losses.shape == (2, 3)
  # Same params, different dropout keys -> different losses.
  assert np.abs(np.asarray(losses[0] - losses[1])).max() > 1e-6
  np.testing.assert_allclose(
      np.asarray(losses[0]),
      np.asarray(loss_fn(split.trainable, split.frozen, batch, keys[0])),
      rtol=1e-5, atol=1e-6)
