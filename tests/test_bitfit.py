"""Tests for BitFit (bias-only fine-tuning), split method 'bitfit'."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from fedjax_fm import peft
from fedjax_fm.models import tasks
from fedjax_fm.models.decoder import Decoder
from fedjax_fm.models.encoder import Encoder

from tests.peft_testlib import DEC
from tests.peft_testlib import ENC
from tests.peft_testlib import flat as _flat
from tests.peft_testlib import pretrained_like as _pretrained_like
from tests.peft_testlib import train as _train


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


@pytest.mark.slow
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
