"""Tests for Houlsby bottleneck adapters and the 'adapter' split."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from fedjax_fm import peft
from fedjax_fm.models import tasks
from fedjax_fm.models.decoder import Decoder
from fedjax_fm.models.encoder import Encoder
from fedjax_fm.peft.adapters import AdapterLinear, AdapterParam

from tests.peft_testlib import DEC
from tests.peft_testlib import ENC
from tests.peft_testlib import flat as _flat
from tests.peft_testlib import pretrained_like as _pretrained_like
from tests.peft_testlib import train as _train


@pytest.mark.slow
def test_identity_at_init_and_targets():
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(0, 64, (2, 7)))
  dec = _pretrained_like(Decoder(DEC, rngs=nnx.Rngs(0)))
  before = np.asarray(dec(ids))
  replaced = peft.apply_adapters(dec, bottleneck=4, rngs=nnx.Rngs(1))
  assert replaced == ['layers.0.attn.o_proj', 'layers.0.mlp.down_proj',
                      'layers.1.attn.o_proj', 'layers.1.mlp.down_proj']
  assert isinstance(dec.layers[1].mlp.down_proj, AdapterLinear)
  assert type(dec.layers[1].mlp.up_proj) is nnx.Linear
  np.testing.assert_array_equal(np.asarray(dec(ids)), before)
  enc = Encoder(ENC, rngs=nnx.Rngs(0))
  before = np.asarray(enc(ids))
  replaced = peft.apply_adapters(enc, bottleneck=4, activation='relu',
                                 rngs=nnx.Rngs(1))
  assert replaced == ['layers.0.attn_out', 'layers.0.output']
  np.testing.assert_array_equal(np.asarray(enc(ids)), before)
  # Wrapped layers are not wrapped again, their bases are not targets.
  with pytest.raises(ValueError, match='matched no linear layer'):
    peft.apply_adapters(enc, bottleneck=4, target_modules=('base',),
                        rngs=nnx.Rngs(1))


def test_matches_numpy_formula():
  rng = np.random.default_rng(0)
  base = nnx.Linear(6, 5, rngs=nnx.Rngs(0))
  layer = AdapterLinear(base, bottleneck=3, activation='tanh',
                        rngs=nnx.Rngs(1))
  assert layer.in_features == 6 and layer.out_features == 5
  for name, shape in [('down_kernel', (5, 3)), ('down_bias', (3,)),
                      ('up_kernel', (3, 5)), ('up_bias', (5,))]:
    var = getattr(layer, name)
    assert isinstance(var, AdapterParam) and var.shape == shape
    var.set_value(jnp.asarray(rng.normal(size=shape), jnp.float32))
  x = rng.normal(size=(2, 4, 6)).astype(np.float32)
  p = {k: np.asarray(getattr(layer, k)[...]) for k in
       ('down_kernel', 'down_bias', 'up_kernel', 'up_bias')}
  y = x @ np.asarray(base.kernel[...]) + np.asarray(base.bias[...])
  want = y + np.tanh(y @ p['down_kernel'] + p['down_bias']) @ p[
      'up_kernel'] + p['up_bias']
  np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x))), want,
                             rtol=1e-5, atol=1e-5)


def test_composes_with_lora():
  dec = Decoder(DEC, rngs=nnx.Rngs(0))
  peft.apply_lora(dec, rank=2, alpha=4.0, target_modules=('o_proj',),
                  rngs=nnx.Rngs(1))
  peft.apply_adapters(dec, bottleneck=4, target_modules=('o_proj',),
                      rngs=nnx.Rngs(2))
  layer = dec.layers[0].attn.o_proj
  assert isinstance(layer, AdapterLinear)
  assert isinstance(layer.base, peft.LoRALinear)
  ad = _flat(peft.split_model(dec, 'adapter').trainable)
  lo = _flat(peft.split_model(dec, 'lora').trainable)
  assert all('lora' not in k for k in ad) and len(ad) == 8
  assert set(lo) == {f'layers.{i}.attn.o_proj.base.lora_{f}'
                     for i in (0, 1) for f in 'ab'}


def test_errors():
  enc = Encoder(ENC, rngs=nnx.Rngs(0))
  for kwargs, field in [({'bottleneck': 0}, 'bottleneck'),
                        ({'activation': 'swish'}, 'activation'),
                        ({'init_std': -1.0}, 'init_std'),
                        ({'target_modules': ()}, 'target_modules')]:
    args = {'bottleneck': 2, **kwargs}
    with pytest.raises(ValueError, match=field):
      peft.apply_adapters(enc, rngs=nnx.Rngs(0), **args)
  with pytest.raises(ValueError, match=r'Available.*layers\.0\.query'):
    peft.apply_adapters(enc, bottleneck=2, target_modules=('o_proj',),
                        rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='apply_adapters'):
    peft.split_model(enc, 'adapter')


@pytest.mark.slow
def test_split_counts_and_training_changes_only_adapters():
  enc = _pretrained_like(Encoder(ENC, rngs=nnx.Rngs(0)))
  before = _flat(nnx.to_pure_dict(nnx.state(enc)))
  peft.apply_adapters(enc, bottleneck=8, rngs=nnx.Rngs(1))
  split = peft.split_model(enc, 'adapter')
  names = _flat(split.trainable)
  assert all(k.rsplit('.', 1)[1] in ('down_kernel', 'down_bias', 'up_kernel',
                                     'up_bias') for k in names)
  h, m = ENC.hidden_size, 8
  per_adapter = h * m + m + m * h + h
  assert peft.count_params(split.trainable) == 2 * ENC.num_layers * per_adapter
  assert peft.tree_bytes(split.trainable) == 4 * peft.count_params(
      split.trainable)
  assert peft.count_params(split.trainable) + peft.count_params(
      split.frozen) == peft.count_params(enc)

  rng = np.random.default_rng(0)
  batch = {'input_ids': jnp.asarray(rng.integers(0, 64, (8, 8))),
           'attention_mask': jnp.ones((8, 8), jnp.int32),
           'label': jnp.asarray(rng.integers(0, 4, 8))}
  frozen_copy = jax.tree.map(np.array, split.frozen)
  trained, losses = _train(split, tasks.classification_task(), batch)
  losses = np.asarray(losses)
  assert losses[-1] < 0.3 * losses[0]          # memorises 8 random labels
  after = _flat(nnx.to_pure_dict(nnx.state(
      peft.merge(split.graphdef, trained, split.frozen))))
  changed = {k for k in after if k in names
             and not np.array_equal(after[k], names[k])}
  assert changed == set(names)
  for k, v in after.items():
    if k not in names:   # base weights: bit-identical, only paths moved
      orig = k.replace('.base.', '.')
      np.testing.assert_array_equal(v, before[orig])
  jax.tree.map(np.testing.assert_array_equal, split.frozen, frozen_copy)


@pytest.mark.slow
def test_decoder_adapters_learn():
  dec = _pretrained_like(Decoder(DEC, rngs=nnx.Rngs(0)))
  peft.apply_adapters(dec, bottleneck=8, rngs=nnx.Rngs(1))
  split = peft.split_model(dec, 'adapter')
  rng = np.random.default_rng(1)
  batch = {'input_ids': jnp.asarray(rng.integers(0, 64, (4, 12)))}
  _, losses = _train(split, tasks.causal_lm_task(), batch)
  losses = np.asarray(losses)
  assert losses[-1] < 0.5 * losses[0]
