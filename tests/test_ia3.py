"""Tests for (IA)^3 rescaling vectors and the 'ia3' split."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from fedjax_fm import peft
from fedjax_fm.models import tasks
from fedjax_fm.models.decoder import Decoder
from fedjax_fm.models.encoder import Encoder
from fedjax_fm.peft.ia3 import IA3Linear, IA3Param

from tests.peft_testlib import DEC
from tests.peft_testlib import ENC
from tests.peft_testlib import flat as _flat
from tests.peft_testlib import pretrained_like as _pretrained_like
from tests.peft_testlib import train as _train


def test_output_and_input_scaling_formula():
  rng = np.random.default_rng(0)
  base = nnx.Linear(6, 5, rngs=nnx.Rngs(0))
  w, b = np.asarray(base.kernel[...]), np.asarray(base.bias[...])
  x = rng.normal(size=(3, 6)).astype(np.float32)
  out = IA3Linear(base, feedforward=False)
  inp = IA3Linear(base, feedforward=True)
  assert isinstance(out.ia3_scale, IA3Param)
  assert out.ia3_scale.shape == (5,) and inp.ia3_scale.shape == (6,)
  np.testing.assert_array_equal(np.asarray(out(jnp.asarray(x))),
                                np.asarray(base(jnp.asarray(x))))
  lo = rng.normal(size=5).astype(np.float32)
  li = rng.normal(size=6).astype(np.float32)
  out.ia3_scale.set_value(jnp.asarray(lo))
  inp.ia3_scale.set_value(jnp.asarray(li))
  np.testing.assert_allclose(np.asarray(out(jnp.asarray(x))),
                             (x @ w + b) * lo, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(inp(jnp.asarray(x))),
                             (x * li) @ w + b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_apply_ia3_defaults_both_models():
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(0, 64, (2, 7)))
  dec = Decoder(DEC, rngs=nnx.Rngs(0))
  before = np.asarray(dec(ids))
  replaced = peft.apply_ia3(dec)
  assert replaced == [f'layers.{i}.{m}' for i in (0, 1) for m in
                      ('attn.k_proj', 'attn.v_proj', 'mlp.down_proj')]
  layer = dec.layers[0]
  assert not layer.attn.k_proj.feedforward and layer.mlp.down_proj.feedforward
  assert layer.mlp.down_proj.ia3_scale.shape == (DEC.mlp_dim,)
  kv = DEC.num_kv_heads * DEC.head_dim
  assert layer.attn.v_proj.ia3_scale.shape == (kv,)
  np.testing.assert_array_equal(np.asarray(dec(ids)), before)
  enc = Encoder(ENC, rngs=nnx.Rngs(0))
  assert peft.apply_ia3(enc) == ['layers.0.key', 'layers.0.output',
                                 'layers.0.value']
  assert enc.layers[0].output.ia3_scale.shape == (ENC.intermediate_size,)
  assert not enc.layers[0].value.feedforward


def test_errors():
  enc = Encoder(ENC, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='subset of target_modules'):
    peft.apply_ia3(enc, target_modules=('key', 'value'))
  with pytest.raises(ValueError, match='matched no linear layer'):
    peft.apply_ia3(enc, target_modules=('k_proj',), feedforward_modules=())
  with pytest.raises(ValueError, match='target_modules'):
    peft.apply_ia3(enc, target_modules=())
  with pytest.raises(ValueError, match='apply_ia3'):
    peft.split_model(enc, 'ia3')


@pytest.mark.slow
def test_split_counts_and_training_changes_only_ia3():
  enc = _pretrained_like(Encoder(ENC, rngs=nnx.Rngs(0)))
  before = _flat(nnx.to_pure_dict(nnx.state(enc)))
  peft.apply_ia3(enc)
  split = peft.split_model(enc, 'ia3', extra_trainable=('classifier',))
  names = _flat(split.trainable)
  assert set(names) == {'layers.0.key.ia3_scale', 'layers.0.value.ia3_scale',
                        'layers.0.output.ia3_scale', 'classifier.kernel',
                        'classifier.bias'}
  h, i, c = ENC.hidden_size, ENC.intermediate_size, ENC.num_labels
  assert peft.count_params(split.trainable) == 2 * h + i + h * c + c
  assert peft.tree_bytes(split.trainable) == 4 * (2 * h + i + h * c + c)
  only = peft.split_model(enc, 'ia3')
  assert peft.count_params(only.trainable) == 2 * h + i

  rng = np.random.default_rng(0)
  batch = {'input_ids': jnp.asarray(rng.integers(0, 64, (8, 8))),
           'attention_mask': jnp.ones((8, 8), jnp.int32),
           'label': jnp.asarray(rng.integers(0, 4, 8))}
  frozen_copy = jax.tree.map(np.array, only.frozen)
  # The vectors alone (frozen head) fit the random labels.
  trained, losses = _train(only, tasks.classification_task(), batch)
  losses = np.asarray(losses)
  assert losses[-1] < 0.6 * losses[0]
  after = _flat(nnx.to_pure_dict(nnx.state(
      peft.merge(only.graphdef, trained, only.frozen))))
  ia3 = {k for k in after if k.endswith('ia3_scale')}
  assert ia3 == set(_flat(only.trainable))
  for k in ia3:
    assert not np.array_equal(after[k], 1.0)
  for k, v in after.items():
    if k not in ia3:
      np.testing.assert_array_equal(v, before[k.replace('.base.', '.')])
  jax.tree.map(np.testing.assert_array_equal, only.frozen, frozen_copy)


@pytest.mark.slow
def test_decoder_ia3_learns():
  dec = _pretrained_like(Decoder(DEC, rngs=nnx.Rngs(0)))
  peft.apply_ia3(dec)
  split = peft.split_model(dec, 'ia3')
  assert peft.count_params(split.trainable) == DEC.num_layers * (
      2 * DEC.num_kv_heads * DEC.head_dim + DEC.mlp_dim)
  rng = np.random.default_rng(1)
  batch = {'input_ids': jnp.asarray(rng.integers(0, 64, (4, 12)))}
  _, losses = _train(split, tasks.causal_lm_task(), batch)
  losses = np.asarray(losses)
  assert losses[-1] < 0.85 * losses[0]
