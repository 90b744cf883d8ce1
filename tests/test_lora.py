"""Tests for LoRALinear and apply_lora."""

import numpy as np
import pytest

import jax.numpy as jnp
from flax import nnx

from fedjax_fm import peft
from fedjax_fm.models.decoder import Decoder, DecoderConfig
from fedjax_fm.models.mlp import MLPClassifier
from fedjax_fm.peft.lora import LoRALinear

# Same shapes as tests/test_decoder.py (reuses compiled eager ops).
SMALL_DEC = DecoderConfig(vocab_size=37, dim=16, num_layers=2, num_heads=4,
                          num_kv_heads=2, mlp_dim=24, max_len=12)


def _base(seed=0, din=6, dout=5):
  lin = nnx.Linear(din, dout, rngs=nnx.Rngs(seed))
  lin.bias.set_value(jnp.linspace(-1.0, 1.0, dout))
  return lin


def test_zero_b_equals_base_exactly():
  base = _base()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 6)), jnp.float32)
  want = np.asarray(base(x))
  lora = LoRALinear(base, rank=3, alpha=6.0, rngs=nnx.Rngs(1))
  np.testing.assert_array_equal(np.asarray(lora(x)), want)
  assert isinstance(lora.lora_a, nnx.LoRAParam)
  assert isinstance(lora.lora_b, nnx.LoRAParam)
  assert type(lora.base.kernel) is nnx.Param
  assert lora.lora_a.shape == (6, 3) and lora.lora_b.shape == (3, 5)
  np.testing.assert_array_equal(np.asarray(lora.lora_b[...]), 0.0)


def test_init_bound_like_hf_peft():
  lora = LoRALinear(_base(din=64, dout=4), rank=16, alpha=1.0,
                    rngs=nnx.Rngs(0))
  a = np.asarray(lora.lora_a[...])
  bound = 1.0 / np.sqrt(64)
  assert np.abs(a).max() <= bound
  assert np.abs(a).max() > 0.8 * bound  # uniform, fills the range
  assert lora.scaling == 1.0 / 16


def test_matches_numpy_formula():
  rng = np.random.default_rng(0)
  base = _base()
  lora = LoRALinear(base, rank=2, alpha=5.0, rngs=nnx.Rngs(1))
  a = rng.normal(size=(6, 2)).astype(np.float32)
  b = rng.normal(size=(2, 5)).astype(np.float32)
  lora.lora_a.set_value(jnp.asarray(a))
  lora.lora_b.set_value(jnp.asarray(b))
  x = rng.normal(size=(3, 4, 6)).astype(np.float32)
  w, bias = np.asarray(base.kernel[...]), np.asarray(base.bias[...])
  want = x @ w + bias + (x @ a @ b) * (5.0 / 2)
  np.testing.assert_allclose(np.asarray(lora(jnp.asarray(x))), want,
                             rtol=1e-5, atol=1e-5)


def test_dropout_only_with_rngs():
  rng = np.random.default_rng(0)
  lora = LoRALinear(_base(), rank=2, alpha=2.0, dropout=0.5, rngs=nnx.Rngs(1))
  lora.lora_b.set_value(jnp.asarray(rng.normal(size=(2, 5)), jnp.float32))
  x = jnp.asarray(rng.normal(size=(8, 6)), jnp.float32)
  det = np.asarray(lora(x))
  np.testing.assert_array_equal(det, np.asarray(lora(x)))
  d1 = np.asarray(lora(x, rngs=nnx.Rngs(dropout=3)))
  d2 = np.asarray(lora(x, rngs=nnx.Rngs(dropout=3)))
  d3 = np.asarray(lora(x, rngs=nnx.Rngs(dropout=4)))
  np.testing.assert_array_equal(d1, d2)
  assert np.abs(d1 - det).max() > 1e-4
  assert np.abs(d1 - d3).max() > 1e-4
  # Dropout acts on the LoRA path only: with B = 0 the output is the base.
  lora.lora_b.set_value(jnp.zeros((2, 5)))
  np.testing.assert_array_equal(
      np.asarray(lora(x, rngs=nnx.Rngs(dropout=3))), np.asarray(lora.base(x)))


def test_hparam_errors():
  with pytest.raises(ValueError, match='rank'):
    LoRALinear(_base(), rank=0, alpha=1.0, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='alpha'):
    LoRALinear(_base(), rank=1, alpha=0.0, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='dropout'):
    LoRALinear(_base(), rank=1, alpha=1.0, dropout=1.0, rngs=nnx.Rngs(0))
  model = MLPClassifier(4, [8], 3, rngs=nnx.Rngs(0))
  for kwargs, field in [({'rank': 0}, 'rank'), ({'alpha': -1.0}, 'alpha'),
                        ({'dropout': -0.1}, 'dropout')]:
    args = {'rank': 2, 'alpha': 4.0, **kwargs}
    with pytest.raises(ValueError, match=field):
      peft.apply_lora(model, target_modules=('classifier',),
                      rngs=nnx.Rngs(0), **args)


@pytest.mark.slow
def test_apply_lora_by_name():
  model = Decoder(SMALL_DEC, rngs=nnx.Rngs(0))
  ids = jnp.arange(18).reshape(2, 9) % 37
  before = np.asarray(model(ids))
  replaced = peft.apply_lora(model, rank=4, alpha=8.0,
                             target_modules=('q_proj', 'v_proj'),
                             rngs=nnx.Rngs(1))
  assert replaced == ['layers.0.attn.q_proj', 'layers.0.attn.v_proj',
                      'layers.1.attn.q_proj', 'layers.1.attn.v_proj']
  for layer in model.layers:
    assert isinstance(layer.attn.q_proj, LoRALinear)
    assert isinstance(layer.attn.v_proj, LoRALinear)
    assert type(layer.attn.k_proj) is nnx.Linear
  np.testing.assert_array_equal(np.asarray(model(ids)), before)
  # Already-wrapped layers are not wrapped twice; their bases are not targets.
  assert 'layers.0.attn.q_proj.base' not in [
      '.'.join(map(str, p)) for p in peft.linear_paths(model)]
  with pytest.raises(ValueError, match='matched no'):
    peft.apply_lora(model, rank=2, alpha=2.0, target_modules=('q_proj',),
                    rngs=nnx.Rngs(2))


@pytest.mark.slow
def test_apply_lora_by_regex_and_list_container():
  model = Decoder(SMALL_DEC, rngs=nnx.Rngs(0))
  replaced = peft.apply_lora(model, rank=2, alpha=2.0,
                             target_modules=(r'layers\.1\.mlp\..*_proj',),
                             rngs=nnx.Rngs(1))
  assert sorted(replaced) == ['layers.1.mlp.down_proj',
                              'layers.1.mlp.gate_proj', 'layers.1.mlp.up_proj']
  assert type(model.layers[0].mlp.up_proj) is nnx.Linear
  # Linear layers directly inside an nnx.List.
  mlp = MLPClassifier(4, [8, 8], 3, rngs=nnx.Rngs(0))
  replaced = peft.apply_lora(mlp, rank=2, alpha=2.0,
                             target_modules=(r'layers\.\d+',),
                             rngs=nnx.Rngs(1))
  assert replaced == ['layers.0', 'layers.1']
  assert all(isinstance(l, LoRALinear) for l in mlp.layers)
  assert mlp(jnp.ones((2, 4))).shape == (2, 3)


def test_no_match_lists_available_paths():
  model = MLPClassifier(4, [8], 3, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r'layers\.0.*classifier|classifier'):
    peft.apply_lora(model, rank=2, alpha=2.0, target_modules=('query',),
                    rngs=nnx.Rngs(0))
