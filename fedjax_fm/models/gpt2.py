"""A GPT-2 style decoder-only transformer in Flax NNX.

Learned absolute position embeddings, pre-LayerNorm blocks with biases,
multi-head causal self-attention and a GELU MLP (``'gelu_new'``, the tanh
approximation, by default), with the output projection tied to the token
embeddings. HF GPT-2 fuses the q/k/v projections into one ``Conv1D``
(``c_attn``); here they are separate ``nnx.Linear`` layers so that LoRA can
target them individually (the top-level ``hf`` package splits and re-fuses
``c_attn`` on import/export). Parameter paths::

  embed.embedding
  pos_embed.embedding
  layers.{i}.attn_norm.{scale,bias}
  layers.{i}.attn.{q_proj,k_proj,v_proj,o_proj}.{kernel,bias}
  layers.{i}.mlp_norm.{scale,bias}
  layers.{i}.mlp.{fc_in,fc_out}.{kernel,bias}
  norm.{scale,bias}
  lm_head.kernel            (only with tie_embeddings=False)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from fedjax_fm.models.layers import activation
from fedjax_fm.models.layers import dropout
from fedjax_fm.models.layers import embed
from fedjax_fm.models.layers import layer_norm
from fedjax_fm.models.layers import linear
from fedjax_fm.models.layers import linear_apply

__all__ = [
    'GPT2',
    'GPT2Attention',
    'GPT2Block',
    'GPT2Config',
    'GPT2MLP',
]

ACTIVATIONS = ('gelu_new', 'gelu', 'relu')


@dataclasses.dataclass(frozen=True)
class GPT2Config:
  """Configuration of :class:`GPT2`.

  Attributes:
    vocab_size: vocabulary size.
    dim: model width (HF ``n_embd``).
    num_layers: number of blocks (HF ``n_layer``).
    num_heads: attention heads (HF ``n_head``); must divide ``dim``.
    mlp_dim: MLP hidden size (HF ``n_inner``, default ``4 * dim``).
    max_len: number of learned positions (HF ``n_positions``).
    norm_eps: LayerNorm epsilon (HF ``layer_norm_epsilon``).
    activation: ``'gelu_new'`` (tanh approximation, as GPT-2), ``'gelu'``
      (exact erf) or ``'relu'``.
    tie_embeddings: use the token embeddings as the output projection.
    dropout: residual/embedding dropout rate (only with call-time rngs).
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """

  vocab_size: int = 256
  dim: int = 64
  num_layers: int = 2
  num_heads: int = 4
  mlp_dim: int = 256
  max_len: int = 128
  norm_eps: float = 1e-5
  activation: str = 'gelu_new'
  tie_embeddings: bool = True
  dropout: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @property
  def head_dim(self) -> int:
    return self.dim // self.num_heads

  def validate(self) -> 'GPT2Config':
    """Raises ValueError on an inconsistent config; returns self."""
    for name in ('vocab_size', 'dim', 'num_layers', 'num_heads', 'mlp_dim',
                 'max_len'):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f'{name} must be a positive int, got {value!r}')
    if self.dim % self.num_heads:
      raise ValueError(
          f'dim ({self.dim}) must be divisible by num_heads ({self.num_heads})'
      )
    if self.activation not in ACTIVATIONS:
      raise ValueError(
          f'activation must be one of {ACTIVATIONS}, got {self.activation!r}'
      )
    if self.norm_eps <= 0:
      raise ValueError(f'norm_eps must be > 0, got {self.norm_eps}')
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f'dropout must be in [0, 1), got {self.dropout}')
    return self


def _linear(cfg: GPT2Config, din: int, dout: int, rngs: nnx.Rngs,
            use_bias: bool = True):
  return linear(din, dout, use_bias=use_bias, dtype=cfg.dtype,
                param_dtype=cfg.param_dtype, rngs=rngs)


def _layer_norm(cfg: GPT2Config, rngs: nnx.Rngs):
  return layer_norm(cfg.dim, eps=cfg.norm_eps, dtype=cfg.dtype,
                    param_dtype=cfg.param_dtype, rngs=rngs)


class GPT2Attention(nnx.Module):
  """Multi-head causal self-attention with biased q/k/v/o projections."""

  def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
    self.num_heads = cfg.num_heads
    self.head_dim = cfg.head_dim
    self.q_proj = _linear(cfg, cfg.dim, cfg.dim, rngs)
    self.k_proj = _linear(cfg, cfg.dim, cfg.dim, rngs)
    self.v_proj = _linear(cfg, cfg.dim, cfg.dim, rngs)
    self.o_proj = _linear(cfg, cfg.dim, cfg.dim, rngs)

  def __call__(
      self, x: jax.Array, mask: jax.Array, *, rngs: nnx.Rngs | None = None
  ) -> jax.Array:
    """Self-attention.

    Args:
      x: ``[B, L, dim]``.
      mask: boolean ``[B, L, L]`` (query, key); True = may attend.
      rngs: call-time rngs (LoRA dropout).

    Returns:
      ``[B, L, dim]``.
    """
    b, l, _ = x.shape
    nh, hd = self.num_heads, self.head_dim
    split = lambda t: t.reshape(b, l, nh, hd)
    q = split(linear_apply(self.q_proj, x, rngs))
    k = split(linear_apply(self.k_proj, x, rngs))
    v = split(linear_apply(self.v_proj, x, rngs))
    scores = jnp.einsum(
        'bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32
    ) / jnp.sqrt(jnp.float32(hd))
    scores = jnp.where(mask[:, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum('bhqk,bkhd->bqhd', probs, v).reshape(b, l, nh * hd)
    return linear_apply(self.o_proj, out, rngs)


class GPT2MLP(nnx.Module):
  """``fc_out(act(fc_in(x)))``."""

  def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
    self.activation = cfg.activation
    self.fc_in = _linear(cfg, cfg.dim, cfg.mlp_dim, rngs)
    self.fc_out = _linear(cfg, cfg.mlp_dim, cfg.dim, rngs)

  def __call__(self, x, *, rngs: nnx.Rngs | None = None):
    h = activation(self.activation)(linear_apply(self.fc_in, x, rngs))
    return linear_apply(self.fc_out, h, rngs)


class GPT2Block(nnx.Module):
  """Pre-LayerNorm block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``."""

  def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
    self.attn_norm = _layer_norm(cfg, rngs)
    self.attn = GPT2Attention(cfg, rngs=rngs)
    self.mlp_norm = _layer_norm(cfg, rngs)
    self.mlp = GPT2MLP(cfg, rngs=rngs)
    self.dropout = cfg.dropout

  def __call__(self, x, mask, *, rngs: nnx.Rngs | None = None):
    h = self.attn(self.attn_norm(x), mask, rngs=rngs)
    x = x + dropout(h, self.dropout, rngs)
    h = self.mlp(self.mlp_norm(x), rngs=rngs)
    return x + dropout(h, self.dropout, rngs)


class GPT2(nnx.Module):
  """GPT-2 language model (HF ``GPT2LMHeadModel`` compatible).

  Attributes:
    embed: ``nnx.Embed`` token embeddings (HF ``wte``).
    pos_embed: ``nnx.Embed`` learned positions (HF ``wpe``).
    layers: ``nnx.List`` of :class:`GPT2Block`.
    norm: final ``nnx.LayerNorm`` (HF ``ln_f``).
    lm_head: output ``nnx.Linear`` without bias (``None`` when tied).
  """

  def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
    cfg.validate()
    self.config = cfg
    emb = lambda n: embed(
        n, cfg.dim, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs,
    )
    self.embed = emb(cfg.vocab_size)
    self.pos_embed = emb(cfg.max_len)
    self.layers = nnx.List(
        [GPT2Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)]
    )
    self.norm = _layer_norm(cfg, rngs)
    if cfg.tie_embeddings:
      self.lm_head = None
    else:
      self.lm_head = _linear(cfg, cfg.dim, cfg.vocab_size, rngs,
                             use_bias=False)

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
    x = self.embed(input_ids) + self.pos_embed(jnp.arange(l))[None]
    x = dropout(x, cfg.dropout, rngs)
    mask = jnp.tril(jnp.ones((l, l), dtype=bool))[None]
    if attention_mask is not None:
      mask = mask & attention_mask.astype(bool)[:, None, :]
    mask = jnp.broadcast_to(mask, (b, l, l))
    for layer in self.layers:
      x = layer(x, mask, rngs=rngs)
    x = self.norm(x)
    if self.lm_head is None:
      logits = self.embed.attend(x)
    else:
      logits = linear_apply(self.lm_head, x, rngs)
    return logits.astype(jnp.float32)
