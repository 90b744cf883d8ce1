"""A Llama-style decoder-only transformer in Flax NNX.

Pre-norm blocks with RMSNorm, rotary position embeddings (HF Llama
"rotate-half" convention), grouped-query attention and a SwiGLU MLP; no
biases. Parameter paths::

  embed.embedding
  layers.{i}.attn_norm.scale
  layers.{i}.attn.{q_proj,k_proj,v_proj,o_proj}.kernel
  layers.{i}.mlp_norm.scale
  layers.{i}.mlp.{gate_proj,up_proj,down_proj}.kernel
  norm.scale
  lm_head.kernel            (absent with tie_embeddings=True)
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from fedjax_fm.models.layers import RMSNorm
from fedjax_fm.models.layers import activation
from fedjax_fm.models.layers import dropout
from fedjax_fm.models.layers import embed
from fedjax_fm.models.layers import linear
from fedjax_fm.models.layers import linear_apply

__all__ = [
    'Attention',
    'DecoderBlock',
    'DecoderConfig',
    'Decoder',
    'KVCache',
    'MLP',
    'RMSNorm',
    'apply_rope',
    'rope_cos_sin',
    'rotate_half',
]


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Configuration of :class:`Decoder`.

  Attributes:
    vocab_size: vocabulary size.
    dim: model width.
    num_layers: number of transformer blocks.
    num_heads: number of query heads.
    num_kv_heads: number of key/value heads (GQA); must divide num_heads.
    mlp_dim: SwiGLU hidden size.
    max_len: maximum sequence length.
    rope_theta: RoPE base.
    norm_eps: RMSNorm epsilon.
    tie_embeddings: use the embedding matrix as the output projection.
    attention_bias: biases on the q/k/v projections (Qwen2; HF Llama's
      ``attention_bias`` sets this and ``attention_out_bias``).
    attention_out_bias: bias on the attention output projection ``o_proj``.
    mlp_bias: biases on ``gate_proj``/``up_proj``/``down_proj`` (HF Llama
      ``mlp_bias``).
    dropout: residual dropout rate (only active with call-time rngs).
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """

  vocab_size: int = 256
  dim: int = 64
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 4
  mlp_dim: int = 128
  max_len: int = 128
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6
  tie_embeddings: bool = False
  attention_bias: bool = False
  attention_out_bias: bool = False
  mlp_bias: bool = False
  dropout: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @property
  def head_dim(self) -> int:
    return self.dim // self.num_heads

  def validate(self) -> 'DecoderConfig':
    """Raises ValueError on an inconsistent config; returns self."""
    for name in ('vocab_size', 'dim', 'num_layers', 'num_heads',
                 'num_kv_heads', 'mlp_dim', 'max_len'):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f'{name} must be a positive int, got {value!r}')
    if self.dim % self.num_heads:
      raise ValueError(
          f'dim ({self.dim}) must be divisible by num_heads ({self.num_heads})'
      )
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f'num_kv_heads ({self.num_kv_heads}) must divide num_heads '
          f'({self.num_heads})'
      )
    if self.head_dim % 2:
      raise ValueError(
          f'head_dim = dim / num_heads = {self.head_dim} must be even for RoPE'
      )
    if self.rope_theta <= 0:
      raise ValueError(f'rope_theta must be > 0, got {self.rope_theta}')
    if self.norm_eps <= 0:
      raise ValueError(f'norm_eps must be > 0, got {self.norm_eps}')
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f'dropout must be in [0, 1), got {self.dropout}')
    return self


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float):
  """Returns ``cos, sin`` of shape ``[..., head_dim]`` (HF Llama layout)."""
  inv_freq = 1.0 / (
      theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  )
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def rotate_half(x: jax.Array) -> jax.Array:
  """``[x1, x2] -> [-x2, x1]`` on the last axis."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Applies rotary embeddings.

  Args:
    x: ``[B, L, H, D]`` queries or keys.
    positions: ``[B, L]`` or ``[L]`` integer positions.
    theta: RoPE base.

  Returns:
    ``x * cos + rotate_half(x) * sin`` in ``x.dtype``.
  """
  cos, sin = rope_cos_sin(positions, x.shape[-1], theta)
  if cos.ndim == 2:  # [L, D]
    cos, sin = cos[None], sin[None]
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  x32 = x.astype(jnp.float32)
  return (x32 * cos + rotate_half(x32) * sin).astype(x.dtype)


def _linear(cfg: DecoderConfig, din: int, dout: int, rngs: nnx.Rngs,
            use_bias: bool = False):
  return linear(din, dout, use_bias=use_bias, dtype=cfg.dtype,
                param_dtype=cfg.param_dtype, rngs=rngs)


class Attention(nnx.Module):
  """Grouped-query causal self-attention with RoPE.

  Attributes:
    q_proj, k_proj, v_proj, o_proj: the projections (``nnx.Linear`` or PEFT
      wrappers of them, called through :func:`~fedjax_fm.models.layers.
      linear_apply`).
    prefix: hook for prefix tuning, ``None`` by default. Prefix tuning
      (``peft.apply_prefix_tuning``) installs here a module
      whose call ``prefix(batch_size)`` returns ``(key, value)`` arrays
      ``[B, P, kv_heads, head_dim]`` that are prepended to this layer's
      keys/values.
  """

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
    hd = cfg.head_dim
    self.num_heads = cfg.num_heads
    self.num_kv_heads = cfg.num_kv_heads
    self.head_dim = hd
    self.rope_theta = cfg.rope_theta
    qkv_bias = cfg.attention_bias
    self.q_proj = _linear(cfg, cfg.dim, cfg.num_heads * hd, rngs, qkv_bias)
    self.k_proj = _linear(cfg, cfg.dim, cfg.num_kv_heads * hd, rngs, qkv_bias)
    self.v_proj = _linear(cfg, cfg.dim, cfg.num_kv_heads * hd, rngs, qkv_bias)
    self.o_proj = _linear(cfg, cfg.num_heads * hd, cfg.dim, rngs,
                          cfg.attention_out_bias)
    self.prefix = nnx.data(None)

  def __call__(
      self,
      x: jax.Array,
      mask: jax.Array,
      positions: jax.Array,
      *,
      cache: tuple[jax.Array, jax.Array, jax.Array] | None = None,
      rngs: nnx.Rngs | None = None,
  ) -> jax.Array | tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Self-attention, optionally over a key/value cache.

    Without ``cache`` the ``L`` tokens attend to each other. With ``cache =
    (k_cache, v_cache, index)`` (``[B, S, kv_heads, head_dim]`` arrays and an
    int32 scalar) the new keys/values (after RoPE) are written at slots
    ``index .. index + L - 1`` and the queries attend to all ``S`` slots.

    If the :attr:`prefix` hook is set (by
    ``peft.apply_prefix_tuning``), its ``P`` key/value vectors
    are prepended to the keys/values (no RoPE; always attendable).

    Args:
      x: ``[B, L, dim]``.
      mask: boolean ``[B, L, L]`` (query, key), or ``[B, L, S]`` (query,
        cache slot) with a cache; True = may attend.
      positions: ``[L]`` or ``[B, L]`` RoPE positions.
      cache: optional ``(k_cache, v_cache, index)`` of this layer.
      rngs: call-time rngs (LoRA dropout).

    Returns:
      ``[B, L, dim]``; with a cache, ``(out, (k_cache, v_cache))`` with the
      updated layer cache.
    """
    b, l, _ = x.shape
    kv, hd = self.num_kv_heads, self.head_dim
    g = self.num_heads // kv
    q = linear_apply(self.q_proj, x, rngs).reshape(b, l, self.num_heads, hd)
    k = linear_apply(self.k_proj, x, rngs).reshape(b, l, kv, hd)
    v = linear_apply(self.v_proj, x, rngs).reshape(b, l, kv, hd)
    q = apply_rope(q, positions, self.rope_theta)
    k = apply_rope(k, positions, self.rope_theta)
    new_cache = None
    if cache is not None:
      k_cache, v_cache, index = cache
      start = (0, index, 0, 0)
      k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), start)
      v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), start)
      new_cache = (k, v)
    if self.prefix is not None:
      pk, pv = self.prefix(b)
      k = jnp.concatenate([pk.astype(k.dtype), k], axis=1)
      v = jnp.concatenate([pv.astype(v.dtype), v], axis=1)
      mask = jnp.concatenate(
          [jnp.ones(mask.shape[:2] + (pk.shape[1],), bool), mask], axis=-1
      )
    # Query head h uses kv head h // g (same as HF repeat_kv).
    q = q.reshape(b, l, kv, g, hd)
    scores = jnp.einsum(
        'bqkgd,bskd->bkgqs', q, k, preferred_element_type=jnp.float32
    ) / jnp.sqrt(jnp.float32(hd))
    scores = jnp.where(
        mask[:, None, None], scores, jnp.finfo(jnp.float32).min
    )
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum('bkgqs,bskd->bqkgd', probs, v)
    out = out.reshape(b, l, self.num_heads * hd)
    out = linear_apply(self.o_proj, out, rngs)
    return out if new_cache is None else (out, new_cache)


class MLP(nnx.Module):
  """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
    self.gate_proj = _linear(cfg, cfg.dim, cfg.mlp_dim, rngs, cfg.mlp_bias)
    self.up_proj = _linear(cfg, cfg.dim, cfg.mlp_dim, rngs, cfg.mlp_bias)
    self.down_proj = _linear(cfg, cfg.mlp_dim, cfg.dim, rngs, cfg.mlp_bias)

  def __call__(self, x, *, rngs: nnx.Rngs | None = None):
    h = activation('silu')(linear_apply(self.gate_proj, x, rngs))
    h = h * linear_apply(self.up_proj, x, rngs)
    return linear_apply(self.down_proj, h, rngs)


class DecoderBlock(nnx.Module):
  """Pre-norm block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
    norm = lambda: RMSNorm(cfg.dim, eps=cfg.norm_eps, dtype=cfg.dtype,
                           param_dtype=cfg.param_dtype)
    self.attn_norm = norm()
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = norm()
    self.mlp = MLP(cfg, rngs=rngs)
    self.dropout = cfg.dropout

  def __call__(self, x, mask, positions, *, cache=None,
               rngs: nnx.Rngs | None = None):
    """Applies the block; see :meth:`Attention.__call__` for ``cache``.

    Returns:
      ``[B, L, dim]``; with a cache, ``(x, (k_cache, v_cache))``.
    """
    h = self.attn(self.attn_norm(x), mask, positions, cache=cache, rngs=rngs)
    if cache is not None:
      h, new_cache = h
    x = x + dropout(h, self.dropout, rngs)
    h = self.mlp(self.mlp_norm(x), rngs=rngs)
    x = x + dropout(h, self.dropout, rngs)
    return x if cache is None else (x, new_cache)


class KVCache(NamedTuple):
  """Key/value cache of a :class:`Decoder` (a pytree of arrays).

  Slot ``s`` of every layer holds the RoPE-rotated key and the value of one
  token; the slots ``0 .. index - 1`` are written.

  Attributes:
    k: ``[num_layers, B, S, num_kv_heads, head_dim]`` keys.
    v: ``[num_layers, B, S, num_kv_heads, head_dim]`` values.
    mask: bool ``[B, S]``; True where a slot holds a real (attendable) token.
    index: int32 scalar; the next slot to write.
  """

  k: jax.Array
  v: jax.Array
  mask: jax.Array
  index: jax.Array

  @property
  def max_length(self) -> int:
    """Number of slots ``S``."""
    return self.mask.shape[1]


class Decoder(nnx.Module):
  """Llama-style decoder-only language model.

  Attributes:
    embed: ``nnx.Embed`` token embeddings.
    layers: ``nnx.List`` of :class:`DecoderBlock`.
    norm: final :class:`RMSNorm`.
    lm_head: output ``nnx.Linear`` (``None`` with tied embeddings).
    prompt: hook for prompt tuning, ``None`` by default. Prompt tuning
      (``peft.apply_prompt_tuning``) installs here a module
      with an int attribute ``num_virtual_tokens`` (``V``) whose call
      ``prompt(batch_size)`` returns the ``[B, V, dim]`` virtual-token
      embeddings that are prepended to the token embeddings.
  """

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
    cfg.validate()
    self.config = cfg
    self.embed = embed(
        cfg.vocab_size, cfg.dim, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        rngs=rngs,
    )
    self.layers = nnx.List(
        [DecoderBlock(cfg, rngs=rngs) for _ in range(cfg.num_layers)]
    )
    self.norm = RMSNorm(cfg.dim, eps=cfg.norm_eps, dtype=cfg.dtype,
                        param_dtype=cfg.param_dtype)
    if cfg.tie_embeddings:
      self.lm_head = None
    else:
      self.lm_head = _linear(cfg, cfg.dim, cfg.vocab_size, rngs)
    self.prompt = nnx.data(None)

  @property
  def num_virtual_tokens(self) -> int:
    """Number ``V`` of soft-prompt tokens (0 without a :attr:`prompt`)."""
    return 0 if self.prompt is None else self.prompt.num_virtual_tokens

  def __call__(
      self,
      input_ids: jax.Array,
      attention_mask: jax.Array | None = None,
      *,
      positions: jax.Array | None = None,
      cache: KVCache | None = None,
      rngs: nnx.Rngs | None = None,
  ) -> jax.Array | tuple[jax.Array, KVCache]:
    """Computes next-token logits.

    Two modes:

    * Full sequence (``cache=None``): the ``L`` tokens attend causally to
      each other. If the :attr:`prompt` hook is set (by
      ``peft.apply_prompt_tuning``), its ``V`` virtual tokens
      (positions ``0..V-1``) are prepended to the token embeddings, are always
      attended to, and are dropped from the output.
    * Cached (``cache`` from :meth:`init_cache` or a previous cached call):
      the tokens are written into the cache at ``cache.index`` and attend to
      every earlier real slot and causally among themselves. A cache made by
      :meth:`init_cache` already holds the soft prompt, if any.

    Args:
      input_ids: ``[B, L]`` int token ids (``V + L <= max_len`` without a
        cache; ``cache.index + L <= cache.max_length`` with one, which is not
        checked: writes past the end are clamped by XLA).
      attention_mask: optional ``[B, L]`` (1 = real token, 0 = padding);
        padding keys are never attended to (with a cache, padding slots stay
        masked for later calls too).
      positions: optional ``[L]`` or ``[B, L]`` int RoPE positions of the
        tokens. Default without a cache: ``V .. V + L - 1``. Default with a
        cache: the number of real tokens before each token (real cache slots
        plus real new tokens), so that padding does not shift positions.
      cache: optional :class:`KVCache`.
      rngs: call-time rngs for dropout; ``None`` = deterministic.

    Returns:
      float32 logits ``[B, L, vocab_size]``; with a cache, ``(logits,
      new_cache)``.

    Raises:
      ValueError: if ``V + L`` exceeds ``max_len`` (no cache) or ``L``
        exceeds the cache length.
    """
    cfg = self.config
    b, l = input_ids.shape
    if attention_mask is None:
      real = jnp.ones((b, l), bool)
    else:
      real = attention_mask.astype(bool)
    x = self.embed(input_ids)
    if cache is not None:
      return self._cached_forward(x, real, positions, cache, rngs)
    prompt = self.prompt
    nv = self.num_virtual_tokens
    if l + nv > cfg.max_len:
      extra = f' + {nv} virtual tokens' if nv else ''
      raise ValueError(
          f'sequence length {l}{extra} exceeds max_len={cfg.max_len}'
      )
    if positions is None:
      positions = jnp.arange(nv, nv + l)
    if prompt is not None:
      x = jnp.concatenate([prompt(b).astype(x.dtype), x], axis=1)
      real = jnp.concatenate([jnp.ones((b, nv), bool), real], axis=1)
      positions = jnp.concatenate([
          jnp.broadcast_to(jnp.arange(nv), (b, nv)),
          jnp.broadcast_to(positions, (b, l)),
      ], axis=1)
    t = nv + l
    x = dropout(x, cfg.dropout, rngs)
    mask = jnp.tril(jnp.ones((t, t), dtype=bool))[None] & real[:, None, :]
    for layer in self.layers:
      x = layer(x, mask, positions, rngs=rngs)
    return self._logits(x[:, nv:], rngs)

  def _logits(self, x: jax.Array, rngs: nnx.Rngs | None) -> jax.Array:
    x = self.norm(x)
    if self.lm_head is None:
      logits = self.embed.attend(x)
    else:
      logits = linear_apply(self.lm_head, x, rngs)
    return logits.astype(jnp.float32)

  def _cached_forward(self, x, real, positions, cache, rngs):
    """Cached forward of embeddings ``x [B, L, dim]``; see ``__call__``."""
    b, l = real.shape
    s = cache.max_length
    if l > s:
      raise ValueError(
          f'{l} new tokens do not fit a cache of max_length={s}'
      )
    index = cache.index
    if positions is None:
      before = jnp.sum(cache.mask, axis=-1, dtype=jnp.int32)[:, None]
      positions = before + jnp.cumsum(real, axis=-1, dtype=jnp.int32) - 1
      positions = jnp.maximum(positions, 0)
    kv_mask = jax.lax.dynamic_update_slice(cache.mask, real, (0, index))
    causal = jnp.arange(s)[None, :] <= index + jnp.arange(l)[:, None]
    mask = causal[None] & kv_mask[:, None, :]
    x = dropout(x, self.config.dropout, rngs)
    ks, vs = [], []
    for i, layer in enumerate(self.layers):
      x, (k, v) = layer(
          x, mask, positions, cache=(cache.k[i], cache.v[i], index), rngs=rngs
      )
      ks.append(k)
      vs.append(v)
    new_cache = KVCache(jnp.stack(ks), jnp.stack(vs), kv_mask, index + l)
    return self._logits(x, rngs), new_cache

  def init_cache(
      self, batch_size: int, max_length: int, *, dtype: Any = None
  ) -> KVCache:
    """Returns a :class:`KVCache` for cached calls of this model.

    The cache is empty, except with a soft prompt (prompt tuning): its ``V``
    virtual tokens, which only attend to each other, are run through the
    model and fill slots ``0..V-1`` (``index = V``).

    Args:
      batch_size: ``B >= 1``.
      max_length: number of slots ``S``, virtual tokens included; ``V < S
        <= config.max_len``.
      dtype: cache dtype; defaults to the compute dtype ``config.dtype``.

    Returns:
      The cache.

    Raises:
      ValueError: on a bad ``batch_size`` or ``max_length``.
    """
    cfg = self.config
    for name, value in (('batch_size', batch_size),
                        ('max_length', max_length)):
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f'{name} must be a positive int, got {value!r}')
    prompt = self.prompt
    nv = self.num_virtual_tokens
    if not nv < max_length <= cfg.max_len:
      raise ValueError(
          f'max_length must be in ({nv}, max_len={cfg.max_len}] (the model '
          f'has {nv} virtual tokens), got {max_length}'
      )
    dtype = cfg.dtype if dtype is None else dtype
    shape = (len(self.layers), batch_size, max_length, cfg.num_kv_heads,
             cfg.head_dim)
    cache = KVCache(
        jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
        jnp.zeros((batch_size, max_length), bool), jnp.zeros((), jnp.int32),
    )
    if prompt is not None:
      x = prompt(batch_size).astype(cfg.dtype)
      _, cache = self._cached_forward(
          x, jnp.ones((batch_size, nv), bool), jnp.arange(nv), cache, None
      )
    return cache
