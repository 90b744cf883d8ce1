"""Tests for the Llama-style decoder against NumPy references."""

import dataclasses

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from fedjax_fm.models import decoder as dec
from fedjax_fm.models.decoder import Decoder, DecoderConfig

TINY = DecoderConfig(
    vocab_size=37, dim=16, num_layers=2, num_heads=4, num_kv_heads=2,
    mlp_dim=24, max_len=12, rope_theta=10000.0, norm_eps=1e-6,
)


def _params(model):
  return jax.tree_util.tree_map(
      np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param))
  )


# ---------------------------------------------------------------- NumPy refs


def np_rmsnorm(x, scale, eps):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * scale


def np_rope(x, positions, theta):
  """x: [B, L, H, D]; positions: [L]. HF Llama rotate-half convention."""
  d = x.shape[-1]
  inv = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
  freqs = positions[:, None].astype(np.float64) * inv[None]
  emb = np.concatenate([freqs, freqs], -1)
  cos, sin = np.cos(emb)[None, :, None], np.sin(emb)[None, :, None]
  x1, x2 = x[..., : d // 2], x[..., d // 2:]
  rot = np.concatenate([-x2, x1], -1)
  return x * cos + rot * sin


def np_softmax(x):
  x = x - x.max(-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(-1, keepdims=True)


def np_attention(p, x, cfg, mask):
  """p: attn params; x [B,L,D]; mask [B,L,L] bool. Explicit repeat-kv."""
  b, l, _ = x.shape
  h, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  q = (x @ p['q_proj']['kernel']).reshape(b, l, h, hd)
  k = (x @ p['k_proj']['kernel']).reshape(b, l, kv, hd)
  v = (x @ p['v_proj']['kernel']).reshape(b, l, kv, hd)
  pos = np.arange(l)
  q, k = np_rope(q, pos, cfg.rope_theta), np_rope(k, pos, cfg.rope_theta)
  rep = h // kv
  k = np.repeat(k, rep, axis=2)  # HF repeat_kv: head j uses kv head j // rep
  v = np.repeat(v, rep, axis=2)
  out = np.zeros((b, l, h, hd))
  for bi in range(b):
    for hi in range(h):
      s = q[bi, :, hi] @ k[bi, :, hi].T / np.sqrt(hd)
      s = np.where(mask[bi], s, -1e30)
      out[bi, :, hi] = np_softmax(s) @ v[bi, :, hi]
  return out.reshape(b, l, h * hd) @ p['o_proj']['kernel']


def np_silu(x):
  return x / (1.0 + np.exp(-x))


def np_decoder(params, ids, cfg, attention_mask=None):
  b, l = ids.shape
  x = params['embed']['embedding'][ids].astype(np.float64)
  mask = np.tril(np.ones((l, l), bool))[None].repeat(b, 0)
  if attention_mask is not None:
    mask = mask & attention_mask.astype(bool)[:, None, :]
  for i in range(cfg.num_layers):
    lp = params['layers'][i]
    h = np_rmsnorm(x, lp['attn_norm']['scale'], cfg.norm_eps)
    x = x + np_attention(lp['attn'], h, cfg, mask)
    h = np_rmsnorm(x, lp['mlp_norm']['scale'], cfg.norm_eps)
    m = lp['mlp']
    gate = np_silu(h @ m['gate_proj']['kernel'])
    x = x + (gate * (h @ m['up_proj']['kernel'])) @ m['down_proj']['kernel']
  x = np_rmsnorm(x, params['norm']['scale'], cfg.norm_eps)
  if cfg.tie_embeddings:
    return x @ params['embed']['embedding'].T
  return x @ params['lm_head']['kernel']


def np_gelu_tanh(x):
  return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def np_norm(x, scale, eps, offset):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * (offset + scale)


def np_partial_rope(x, positions, rope_dim, theta, factor=1.0):
  """Rotates the first ``rope_dim`` dims of ``x [B, L, H, D]``."""
  rot, rest = x[..., :rope_dim], x[..., rope_dim:]
  inv = 1.0 / theta ** (np.arange(0, rope_dim, 2, dtype=np.float64)
                        / rope_dim) / factor
  freqs = positions[:, None].astype(np.float64) * inv[None]
  emb = np.concatenate([freqs, freqs], -1)
  cos, sin = np.cos(emb)[None, :, None], np.sin(emb)[None, :, None]
  half = rope_dim // 2
  turned = np.concatenate([-rot[..., half:], rot[..., :half]], -1)
  return np.concatenate([rot * cos + turned * sin, rest], -1)


def np_general_decoder(p, ids, cfg, attention_mask):
  """Every DecoderConfig switch, written out independently (float64)."""
  b, l = ids.shape
  h, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  off, eps = cfg.norm_scale_offset, cfg.norm_eps
  cap = lambda z, c: z if c is None else np.tanh(z / c) * c
  lin = lambda z, q: z @ q['kernel'] + q.get('bias', 0.0)
  x = p['embed']['embedding'][ids].astype(np.float64)
  if cfg.embed_scale:
    x = x * np.sqrt(cfg.dim)
  pos = np.arange(l)
  causal = pos[None, :] <= pos[:, None]
  window = pos[None, :] > pos[:, None] - (cfg.sliding_window or 0)
  for i in range(cfg.num_layers):
    lp, a = p['layers'][i], p['layers'][i]['attn']
    sliding = cfg.layer_is_sliding[i]
    mask = (causal & window if sliding else causal)[None] & (
        attention_mask.astype(bool)[:, None, :])
    local = sliding and cfg.local_rope_theta is not None
    theta = cfg.local_rope_theta if local else cfg.rope_theta
    factor = 1.0 if local or cfg.rope_scaling is None else (
        cfg.rope_scaling.factor)
    z = np_norm(x, lp['attn_norm']['scale'], eps, off)
    q = lin(z, a['q_proj']).reshape(b, l, h, hd)
    k = lin(z, a['k_proj']).reshape(b, l, kv, hd)
    v = lin(z, a['v_proj']).reshape(b, l, kv, hd)
    if cfg.qk_norm:
      q = np_norm(q, a['q_norm']['scale'], eps, off)
      k = np_norm(k, a['k_norm']['scale'], eps, off)
    q = np_partial_rope(q, pos, cfg.rope_dim, theta, factor)
    k = np_partial_rope(k, pos, cfg.rope_dim, theta, factor)
    k, v = np.repeat(k, h // kv, axis=2), np.repeat(v, h // kv, axis=2)
    scale = (cfg.query_pre_attn_scalar or hd) ** -0.5
    scores = cap(np.einsum('bqhd,bkhd->bhqk', q, k) * scale,
                 cfg.attn_logit_softcap)
    scores = np.where(mask[:, None], scores, -1e30)
    out = np.einsum('bhqk,bkhd->bqhd', np_softmax(scores), v)
    z = lin(out.reshape(b, l, h * hd), a['o_proj'])
    if cfg.post_norms:
      z = np_norm(z, lp['post_attn_norm']['scale'], eps, off)
    x = x + z
    z = np_norm(x, lp['mlp_norm']['scale'], eps, off)
    m = lp['mlp']
    z = lin(np_gelu_tanh(lin(z, m['gate_proj'])) * lin(z, m['up_proj']),
            m['down_proj'])
    if cfg.post_norms:
      z = np_norm(z, lp['post_mlp_norm']['scale'], eps, off)
    x = x + z
  x = np_norm(x, p['norm']['scale'], eps, off)
  return cap(x @ p['embed']['embedding'].T, cfg.final_logit_softcap)


# All switches on: GeGLU, (1 + w) norms, embedding scale, q/k norms, post
# norms, query_pre_attn_scalar, both soft-caps, linear RoPE scaling, partial
# rotary, explicit head size, a sliding window on layers 0 and 2 with their
# own RoPE base, biases, tied embeddings.
FEATURES = DecoderConfig(
    vocab_size=37, dim=16, num_layers=3, num_heads=4, num_kv_heads=2,
    mlp_dim=24, max_len=16, head_size=8, tie_embeddings=True,
    attention_bias=True, attention_out_bias=True, mlp_bias=True,
    mlp_activation='gelu_new', norm_scale_offset=1.0, embed_scale=True,
    qk_norm=True, post_norms=True, query_pre_attn_scalar=6.0,
    attn_logit_softcap=3.0, final_logit_softcap=4.0,
    rope_scaling=dec.RopeScaling('linear', 2.0), partial_rotary_factor=0.5,
    sliding_window=3, sliding_layers=(True, False, True),
    local_rope_theta=100.0,
)


def _random_params(model, seed):
  """Every parameter (biases, norm scales too) drawn at random."""
  rng = np.random.default_rng(seed)
  for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    var.set_value(jnp.asarray(rng.normal(0, 0.3, var.shape), jnp.float32))


def _randomize_norms(model, seed):
  """Gives RMSNorm scales non-trivial values so the tests can see them."""
  rng = np.random.default_rng(seed)
  for _, mod in nnx.iter_modules(model):
    if isinstance(mod, dec.RMSNorm):
      mod.scale.set_value(
          jnp.asarray(rng.uniform(0.5, 1.5, mod.scale.shape), jnp.float32)
      )


# ---------------------------------------------------------------------- tests


def test_config_validation():
  TINY.validate()
  with pytest.raises(ValueError, match='num_heads'):
    DecoderConfig(dim=30, num_heads=4).validate()
  with pytest.raises(ValueError, match='num_kv_heads'):
    DecoderConfig(dim=24, num_heads=6, num_kv_heads=4).validate()
  with pytest.raises(ValueError, match='vocab_size'):
    DecoderConfig(vocab_size=0).validate()
  with pytest.raises(ValueError, match='dropout'):
    DecoderConfig(dropout=1.0).validate()
  with pytest.raises(ValueError, match='even'):
    DecoderConfig(dim=12, num_heads=4, num_kv_heads=4).validate()


@pytest.mark.parametrize('tie', [False, True])
@pytest.mark.slow
def test_shapes_and_names(tie):
  cfg = DecoderConfig(**{**TINY.__dict__, 'tie_embeddings': tie})
  model = Decoder(cfg, rngs=nnx.Rngs(0))
  ids = jnp.zeros((3, 7), jnp.int32)
  logits = model(ids)
  assert logits.shape == (3, 7, cfg.vocab_size)
  assert logits.dtype == jnp.float32
  params = _params(model)
  assert ('lm_head' in params) != tie
  attn = params['layers'][0]['attn']
  assert set(attn) == {'q_proj', 'k_proj', 'v_proj', 'o_proj'}
  assert attn['k_proj']['kernel'].shape == (16, 2 * 4)
  assert set(params['layers'][1]['mlp']) == {'gate_proj', 'up_proj',
                                             'down_proj'}
  assert all('bias' not in v for v in attn.values())
  with pytest.raises(ValueError, match='max_len'):
    model(jnp.zeros((1, 13), jnp.int32))


@pytest.mark.slow
def test_bf16_compute_gives_f32_logits():
  cfg = DecoderConfig(**{**TINY.__dict__, 'dtype': jnp.bfloat16})
  logits = Decoder(cfg, rngs=nnx.Rngs(0))(jnp.ones((1, 5), jnp.int32))
  assert logits.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(logits)))


@pytest.mark.slow
def test_causality():
  model = Decoder(TINY, rngs=nnx.Rngs(1))
  rng = np.random.default_rng(0)
  ids = rng.integers(0, TINY.vocab_size, (2, 10))
  base = np.asarray(model(jnp.asarray(ids)))
  t = 6
  ids2 = ids.copy()
  ids2[:, t] = (ids2[:, t] + 1) % TINY.vocab_size
  out = np.asarray(model(jnp.asarray(ids2)))
  np.testing.assert_array_equal(out[:, :t], base[:, :t])
  assert np.abs(out[:, t:] - base[:, t:]).max() > 1e-6


def test_padding_mask_hides_padded_keys():
  model = Decoder(TINY, rngs=nnx.Rngs(2))
  rng = np.random.default_rng(1)
  ids = rng.integers(0, TINY.vocab_size, (2, 8))
  mask = np.ones((2, 8), np.int32)
  mask[0, :3] = 0  # left padding of example 0
  base = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
  ids2 = ids.copy()
  ids2[0, :3] = (ids2[0, :3] + 5) % TINY.vocab_size
  out = np.asarray(model(jnp.asarray(ids2), jnp.asarray(mask)))
  np.testing.assert_allclose(out[0, 3:], base[0, 3:], atol=1e-6)
  assert np.all(np.isfinite(out))


def test_rmsnorm_matches_numpy():
  norm = dec.RMSNorm(8, eps=1e-5)
  norm.scale.set_value(jnp.linspace(0.5, 2.0, 8))
  x = np.random.default_rng(0).normal(size=(3, 5, 8)).astype(np.float32)
  np.testing.assert_allclose(
      np.asarray(norm(jnp.asarray(x))),
      np_rmsnorm(x, np.linspace(0.5, 2.0, 8), 1e-5), rtol=1e-5, atol=1e-5,
  )


def test_rope_matches_numpy_and_is_relative():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1, 9, 2, 8)).astype(np.float32)
  pos = np.arange(9)
  np.testing.assert_allclose(
      np.asarray(dec.apply_rope(jnp.asarray(x), jnp.asarray(pos), 100.0)),
      np_rope(x, pos, 100.0), atol=1e-5,
  )
  # Score between q at i and k at j only depends on i - j.
  q = rng.normal(size=(1, 1, 1, 16)).astype(np.float32)
  k = rng.normal(size=(1, 1, 1, 16)).astype(np.float32)

  def score(i, j):
    qi = dec.apply_rope(jnp.asarray(q), jnp.array([i]), 10000.0)
    kj = dec.apply_rope(jnp.asarray(k), jnp.array([j]), 10000.0)
    return float(jnp.sum(qi * kj))

  for i, j, d in [(5, 2, 7), (3, 3, 11), (1, 8, 4)]:
    np.testing.assert_allclose(score(i, j), score(i + d, j + d), atol=1e-4)
  assert abs(score(5, 2) - score(5, 3)) > 1e-3


def test_gqa_attention_matches_repeat_kv_reference():
  cfg = DecoderConfig(vocab_size=11, dim=24, num_layers=1, num_heads=6,
                      num_kv_heads=2, mlp_dim=8, max_len=8)
  attn = dec.Attention(cfg, rngs=nnx.Rngs(3))
  p = _params(attn)
  x = np.random.default_rng(0).normal(size=(2, 7, 24)).astype(np.float32)
  mask = np.tril(np.ones((7, 7), bool))[None].repeat(2, 0)
  mask[1, :, :2] = False
  mask[1, :2, 0] = True  # keep every row non-empty
  out = attn(jnp.asarray(x), jnp.asarray(mask), jnp.arange(7))
  np.testing.assert_allclose(
      np.asarray(out), np_attention(p, x, cfg, mask), rtol=1e-5, atol=1e-5
  )


@pytest.mark.parametrize('tie', [False, True])
def test_full_forward_matches_numpy(tie):
  cfg = DecoderConfig(**{**TINY.__dict__, 'tie_embeddings': tie})
  model = Decoder(cfg, rngs=nnx.Rngs(4))
  _randomize_norms(model, 0)
  rng = np.random.default_rng(2)
  ids = rng.integers(0, cfg.vocab_size, (2, 9))
  mask = np.ones((2, 9), np.int32)
  mask[1, 6:] = 0
  got = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
  want = np_decoder(_params(model), ids, cfg, mask)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  got = np.asarray(model(jnp.asarray(ids)))
  np.testing.assert_allclose(got, np_decoder(_params(model), ids, cfg),
                             rtol=1e-4, atol=1e-4)


def test_dropout_only_with_rngs():
  cfg = DecoderConfig(**{**TINY.__dict__, 'dropout': 0.5})
  model = Decoder(cfg, rngs=nnx.Rngs(0))
  ids = jnp.ones((1, 6), jnp.int32)
  a, b = model(ids), model(ids)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  c = model(ids, rngs=nnx.Rngs(dropout=1))
  assert np.abs(np.asarray(c) - np.asarray(a)).max() > 1e-4


def test_feature_switches_match_numpy():
  model = Decoder(FEATURES, rngs=nnx.Rngs(5))
  _random_params(model, 3)
  params = _params(model)
  assert set(params['layers'][0]) >= {'post_attn_norm', 'post_mlp_norm'}
  assert set(params['layers'][0]['attn']) >= {'q_norm', 'k_norm'}
  assert params['layers'][0]['attn']['q_proj']['kernel'].shape == (16, 32)
  rng = np.random.default_rng(2)
  ids = rng.integers(0, FEATURES.vocab_size, (2, 10))
  mask = np.ones((2, 10), np.int32)
  mask[1, :3] = 0  # left padding
  got = np.asarray(nnx.jit(lambda m, i, k: m(i, k))(
      model, jnp.asarray(ids), jnp.asarray(mask)))
  want = np_general_decoder(params, ids, FEATURES, mask)
  real = mask.astype(bool)
  np.testing.assert_allclose(got[real], want[real], rtol=1e-4, atol=1e-4)
  # The window and the local RoPE matter (the reference would notice).
  plain = dataclasses.replace(FEATURES, sliding_window=None,
                              sliding_layers=None)
  assert np.abs(np_general_decoder(params, ids, plain, mask)[real]
                - want[real]).max() > 1e-3


def test_gemma_norm_starts_as_identity_scale():
  norm = dec.RMSNorm(8, eps=1e-6, scale_offset=1.0)
  np.testing.assert_array_equal(np.asarray(norm.scale[...]), 0.0)
  x = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x))),
                             np_rmsnorm(x, 1.0, 1e-6), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_sliding_window_cache_matches_full_forward():
  """Cached prefill + steps (the generation path) equal the full forward."""
  model = Decoder(dataclasses.replace(FEATURES, max_len=14),
                  rngs=nnx.Rngs(5))
  _random_params(model, 4)
  ids = np.random.default_rng(3).integers(0, FEATURES.vocab_size, (2, 12))
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, ids):
    model = nnx.merge(graphdef, state)
    cache = model.init_cache(2, 14)
    outs = []
    for lo, hi in ((0, 5), (5, 6), (6, 7), (7, 12)):
      out, cache = model(ids[:, lo:hi], cache=cache)
      outs.append(out)
    return model(ids), jnp.concatenate(outs, 1)

  full, cached = run(state, jnp.asarray(ids))
  np.testing.assert_allclose(np.asarray(cached), np.asarray(full),
                             rtol=1e-5, atol=1e-5)
