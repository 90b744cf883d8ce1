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
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from fedjax_fm.peft.lora import dropout as _dropout
from fedjax_fm.peft.lora import linear_apply

__all__ = [
    'Attention',
    'DecoderBlock',
    'DecoderConfig',
    'Decoder',
    'MLP',
    'RMSNorm',
    'apply_rope',
    'rope_cos_sin',
    'rotate_half',
]

_INIT = nnx.initializers.normal(stddev=0.02)


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


class RMSNorm(nnx.Module):
  """``x / sqrt(mean(x**2) + eps) * scale``, computed in float32."""

  def __init__(self, dim: int, *, eps: float = 1e-6, dtype=None,
               param_dtype=jnp.float32):
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = self.dtype or x.dtype
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(dtype)


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


def _linear(cfg: DecoderConfig, din: int, dout: int, rngs: nnx.Rngs):
  return nnx.Linear(
      din, dout, use_bias=False, dtype=cfg.dtype,
      param_dtype=cfg.param_dtype, kernel_init=_INIT, rngs=rngs,
  )


class Attention(nnx.Module):
  """Grouped-query causal self-attention with RoPE."""

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
    hd = cfg.head_dim
    self.num_heads = cfg.num_heads
    self.num_kv_heads = cfg.num_kv_heads
    self.head_dim = hd
    self.rope_theta = cfg.rope_theta
    self.q_proj = _linear(cfg, cfg.dim, cfg.num_heads * hd, rngs)
    self.k_proj = _linear(cfg, cfg.dim, cfg.num_kv_heads * hd, rngs)
    self.v_proj = _linear(cfg, cfg.dim, cfg.num_kv_heads * hd, rngs)
    self.o_proj = _linear(cfg, cfg.num_heads * hd, cfg.dim, rngs)

  def __call__(
      self,
      x: jax.Array,
      mask: jax.Array,
      positions: jax.Array,
      *,
      rngs: nnx.Rngs | None = None,
  ) -> jax.Array:
    """Self-attention.

    Args:
      x: ``[B, L, dim]``.
      mask: boolean ``[B, L, L]`` (query, key); True = may attend.
      positions: ``[L]`` or ``[B, L]`` RoPE positions.
      rngs: call-time rngs (LoRA dropout).

    Returns:
      ``[B, L, dim]``.
    """
    b, l, _ = x.shape
    kv, hd = self.num_kv_heads, self.head_dim
    g = self.num_heads // kv
    q = linear_apply(self.q_proj, x, rngs).reshape(b, l, self.num_heads, hd)
    k = linear_apply(self.k_proj, x, rngs).reshape(b, l, kv, hd)
    v = linear_apply(self.v_proj, x, rngs).reshape(b, l, kv, hd)
    q = apply_rope(q, positions, self.rope_theta)
    k = apply_rope(k, positions, self.rope_theta)
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
    return linear_apply(self.o_proj, out, rngs)


class MLP(nnx.Module):
  """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
    self.gate_proj = _linear(cfg, cfg.dim, cfg.mlp_dim, rngs)
    self.up_proj = _linear(cfg, cfg.dim, cfg.mlp_dim, rngs)
    self.down_proj = _linear(cfg, cfg.mlp_dim, cfg.dim, rngs)

  def __call__(self, x, *, rngs: nnx.Rngs | None = None):
    h = jax.nn.silu(linear_apply(self.gate_proj, x, rngs))
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

  def __call__(self, x, mask, positions, *, rngs: nnx.Rngs | None = None):
    h = self.attn(self.attn_norm(x), mask, positions, rngs=rngs)
    x = x + _dropout(h, self.dropout, rngs)
    h = self.mlp(self.mlp_norm(x), rngs=rngs)
    return x + _dropout(h, self.dropout, rngs)


class Decoder(nnx.Module):
  """Llama-style decoder-only language model.

  Attributes:
    embed: ``nnx.Embed`` token embeddings.
    layers: ``nnx.List`` of :class:`DecoderBlock`.
    norm: final :class:`RMSNorm`.
    lm_head: output ``nnx.Linear`` (``None`` with tied embeddings).
  """

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
    cfg.validate()
    self.config = cfg
    self.embed = nnx.Embed(
        cfg.vocab_size, cfg.dim, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        embedding_init=_INIT, rngs=rngs,
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

  def __call__(
      self,
      input_ids: jax.Array,
      attention_mask: jax.Array | None = None,
      *,
      rngs: nnx.Rngs | None = None,
  ) -> jax.Array:
    """Computes next-token logits.

    Args:
      input_ids: ``[B, L]`` int token ids, ``L <= max_len``.
      attention_mask: optional ``[B, L]`` (1 = real token, 0 = padding);
        padding keys are never attended to. Positions are ``0..L-1``.
      rngs: call-time rngs for dropout; ``None`` = deterministic.

    Returns:
      float32 logits ``[B, L, vocab_size]``.
    """
    cfg = self.config
    b, l = input_ids.shape
    if l > cfg.max_len:
      raise ValueError(f'sequence length {l} exceeds max_len={cfg.max_len}')
    x = self.embed(input_ids)
    x = _dropout(x, cfg.dropout, rngs)
    mask = jnp.tril(jnp.ones((l, l), dtype=bool))[None]
    if attention_mask is not None:
      mask = mask & attention_mask.astype(bool)[:, None, :]
    mask = jnp.broadcast_to(mask, (b, l, l))
    positions = jnp.arange(l)
    for layer in self.layers:
      x = layer(x, mask, positions, rngs=rngs)
    x = self.norm(x)
    if self.lm_head is None:
      logits = self.embed.attend(x)
    else:
      logits = linear_apply(self.lm_head, x, rngs)
    return logits.astype(jnp.float32)
