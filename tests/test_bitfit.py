"""Tests for BitFit (bias-only fine-tuning), split method 'bitfit'."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from fedjax_fm import peft
from fedjax_fm.models import tasks
from fedjax_fm.models.decoder import Decoder, DecoderConfig
from fedjax_fm.models.encoder import Encoder, EncoderConfig

# Same shapes as tests/test_adapters.py (reuses compiled eager ops).
ENC = EncoderConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4,
                    intermediate_size=64, max_position=16, num_labels=4)
DEC = DecoderConfig(vocab_size=64, dim=32, num_layers=2, num_heads=4,
                    num_kv_heads=2, mlp_dim=64, max_len=16)


def _pretrained_like(model, factor=10.0):
  """Scales the N(0, 0.02) matrices up, as trained weights would be."""
  state = nnx.state(model, nnx.Param)
  nnx.update(model, jax.tree.map(
      lambda x: x * factor if x.ndim >= 2 else x, state))
  return model


def _flat(tree):
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'.'.join(str(getattr(k, 'key', k)) for k in p): np.asarray(v)
          for p, v in flat}


def _train(split, task, batch, steps=30, lr=0.05):
  loss_fn = tasks.make_loss_fn(split.graphdef, task)
  opt = optax.adam(lr)

  @jax.jit
  def run(trainable, frozen):
    def step(carry, _):
      t, s = carry
      loss, g = jax.value_and_grad(
          lambda t: loss_fn(t, frozen, batch, None).mean())(t)
      u, s = opt.update(g, s, t)
      return (optax.apply_updates(t, u), s), loss

    (t, _), losses = jax.lax.scan(
        step, (trainable, opt.init(trainable)), None, length=steps)
    return t, losses

  return run(split.trainable, split.frozen)


def test_bitfit_split_contents_and_counts():
  enc = Encoder(ENC, rngs=nnx.Rngs(0))
  split = peft.split_model(enc, 'bitfit')
  names = set(_flat(split.trainable))
  assert all(k.endswith('.bias') for k in names)
  assert {'layers.0.query.bias', 'layers.0.output.bias',
          'layers.0.attn_norm.bias', 'embeddings.norm.bias',
          'classifier.bias'} <= names
  assert not any(k.endswith('bias') for k in _flat(split.frozen))
  h, i, c = ENC.hidden_size, ENC.intermediate_size, ENC.num_labels
  # q, k, v, attn_out, output, 2 norms: 7 h; intermediate: i; + emb norm, head.
  want = ENC.num_layers * (7 * h + i) + h + c
  assert peft.count_params(split.trainable) == want
  assert peft.tree_bytes(split.trainable) == 4 * want
  with_head = peft.split_model(enc, 'bitfit', extra_trainable=('classifier',))
  assert peft.count_params(with_head.trainable) == want + h * c
  assert peft.count_params(with_head.trainable) + peft.count_params(
      with_head.frozen) == peft.count_params(enc)


def test_bitfit_errors():
  dec = Decoder(DEC, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='no bias parameters.*Decoder'):
    peft.split_model(dec, 'bitfit')
  enc = Encoder(ENC, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='classifer'):
    peft.split_model(enc, 'bitfit', extra_trainable=('classifer',))
  with pytest.raises(ValueError, match="'bitfit'"):
    peft.split_model(enc, 'bitfitt')


def test_bitfit_training_changes_only_biases_and_learns():
  enc = _pretrained_like(Encoder(ENC, rngs=nnx.Rngs(0)))
  before = _flat(nnx.to_pure_dict(nnx.state(enc)))
  split = peft.split_model(enc, 'bitfit')
  names = _flat(split.trainable)
  rng = np.random.default_rng(0)
  batch = {'input_ids': jnp.asarray(rng.integers(0, 64, (8, 8))),
           'attention_mask': jnp.ones((8, 8), jnp.int32),
           'label': jnp.asarray(rng.integers(0, 4, 8))}
  frozen_copy = jax.tree.map(np.array, split.frozen)
  trained, losses = _train(split, tasks.classification_task(), batch)
  losses = np.asarray(losses)
  assert losses[-1] < 0.6 * losses[0]
  after = _flat(nnx.to_pure_dict(nnx.state(
      peft.merge(split.graphdef, trained, split.frozen))))
  assert set(after) == set(before)
  changed = {k for k in after if not np.array_equal(after[k], before[k])}
  assert changed <= set(names)
  # Nearly every bias moves (the key bias gets no gradient: softmax is
  # invariant to a per-query constant).
  assert changed >= set(names) - {'layers.0.key.bias'}
  jax.tree.map(np.testing.assert_array_equal, split.frozen, frozen_copy)
