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

Cached calls (``init_cache``, then ``model(ids, mask, cache=cache)``) follow
the contract of :class:`~fedjax_fm.models.Decoder` and share its
:class:`~fedjax_fm.models.decoder.KVCache`, so
:func:`fedjax_fm.models.generate` serves both families. The ``prompt`` and
``prefix`` hooks (prompt and prefix tuning) have the Decoder's contract too.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from fedjax_fm.models.decoder import KVCache
from fedjax_fm.models.decoder import init_kv_cache
from fedjax_fm.models.layers import activation
from fedjax_fm.models.layers import dropout
from fedjax_fm.models.layers import embed
from fedjax_fm.models.layers import layer_norm
from fedjax_fm.models.layers import linear
from fedjax_fm.models.layers import linear_apply
from fedjax_fm.models.scan import check_scan_fields
from fedjax_fm.models.scan import scan_layers

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
    scan_layers: run the full-sequence forward as one ``lax.scan`` over the
      stacked layers when they share one structure; ``False``: a Python loop.
      Same numbers either way.
    remat: rematerialisation of each layer in the backward pass, one of
      :data:`~fedjax_fm.models.scan.REMAT_POLICIES`.
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
  scan_layers: bool = False
  remat: str = 'none'

  @property
  def head_dim(self) -> int:
    return self.dim // self.num_heads

  @property
  def num_kv_heads(self) -> int:
    """Key/value heads: ``num_heads`` (GPT-2 has no grouped-query attention)."""
    return self.num_heads

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
    check_scan_fields(self)
    return self


def _linear(cfg: GPT2Config, din: int, dout: int, rngs: nnx.Rngs,
            use_bias: bool = True):
  return linear(din, dout, use_bias=use_bias, dtype=cfg.dtype,
                param_dtype=cfg.param_dtype, rngs=rngs)


def _layer_norm(cfg: GPT2Config, rngs: nnx.Rngs):
  return layer_norm(cfg.dim, eps=cfg.norm_eps, dtype=cfg.dtype,
                    param_dtype=cfg.param_dtype, rngs=rngs)


class GPT2Attention(nnx.Module):
  """Multi-head causal self-attention with biased q/k/v/o projections.

  Attributes:
    q_proj, k_proj, v_proj, o_proj: the projections (``nnx.Linear`` or PEFT
      wrappers of them, called through :func:`~fedjax_fm.models.layers.
      linear_apply`).
    prefix: hook for prefix tuning, ``None`` by default; as
      ``Decoder`` attention: a module whose call ``prefix(batch_size)``
      returns ``(key, value)`` arrays ``[B, P, num_heads, head_dim]`` that are
      prepended to this layer's keys/values.
  """

  def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
    self.num_heads = cfg.num_heads
    self.head_dim = cfg.head_dim
    self.q_proj = _linear(cfg, cfg.dim, cfg.dim, rngs)
    self.k_proj = _linear(cfg, cfg.dim, cfg.dim, rngs)
    self.v_proj = _linear(cfg, cfg.dim, cfg.dim, rngs)
    self.o_proj = _linear(cfg, cfg.dim, cfg.dim, rngs)
    self.prefix = nnx.data(None)

  def __call__(
      self,
      x: jax.Array,
      mask: jax.Array,
      *,
      cache: tuple[jax.Array, jax.Array, jax.Array] | None = None,
      rngs: nnx.Rngs | None = None,
  ) -> jax.Array | tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Self-attention, optionally over a key/value cache.

    Without ``cache`` the ``L`` tokens attend to each other. With ``cache =
    (k_cache, v_cache, index)`` (``[B, S, num_heads, head_dim]`` arrays and
    an int32 scalar) the new keys/values are written at slots ``index ..
    index + L - 1`` and the queries attend to all ``S`` slots. Prefix
    key/values (the :attr:`prefix` hook) are prepended and always attendable.

    Args:
      x: ``[B, L, dim]``.
      mask: boolean ``[B, L, L]`` (query, key), or ``[B, L, S]`` (query,
        cache slot) with a cache; True = may attend.
      cache: optional ``(k_cache, v_cache, index)`` of this layer.
      rngs: call-time rngs (LoRA dropout).

    Returns:
      ``[B, L, dim]``; with a cache, ``(out, (k_cache, v_cache))`` with the
      updated layer cache.
    """
    b, l, _ = x.shape
    nh, hd = self.num_heads, self.head_dim
    split = lambda t: t.reshape(b, l, nh, hd)
    q = split(linear_apply(self.q_proj, x, rngs))
    k = split(linear_apply(self.k_proj, x, rngs))
    v = split(linear_apply(self.v_proj, x, rngs))
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
    scores = jnp.einsum(
        'bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32
    ) / jnp.sqrt(jnp.float32(hd))
    scores = jnp.where(mask[:, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum('bhqk,bkhd->bqhd', probs, v).reshape(b, l, nh * hd)
    out = linear_apply(self.o_proj, out, rngs)
    return out if new_cache is None else (out, new_cache)


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

  def __call__(self, x, mask, *, cache=None, rngs: nnx.Rngs | None = None):
    """Applies the block; see :meth:`GPT2Attention.__call__` for ``cache``.

    Returns:
      ``[B, L, dim]``; with a cache, ``(x, (k_cache, v_cache))``.
    """
    h = self.attn(self.attn_norm(x), mask, cache=cache, rngs=rngs)
    if cache is not None:
      h, new_cache = h
    x = x + dropout(h, self.dropout, rngs)
    h = self.mlp(self.mlp_norm(x), rngs=rngs)
    x = x + dropout(h, self.dropout, rngs)
    return x if cache is None else (x, new_cache)


class GPT2(nnx.Module):
  """GPT-2 language model (HF ``GPT2LMHeadModel`` compatible).

  Attributes:
    embed: ``nnx.Embed`` token embeddings (HF ``wte``).
    pos_embed: ``nnx.Embed`` learned positions (HF ``wpe``).
    layers: ``nnx.List`` of :class:`GPT2Block`.
    norm: final ``nnx.LayerNorm`` (HF ``ln_f``).
    lm_head: output ``nnx.Linear`` without bias (``None`` when tied).
    prompt: hook for prompt tuning, ``None`` by default; as
      ``Decoder.prompt``: a module with an int attribute
      ``num_virtual_tokens`` (``V``) whose call ``prompt(batch_size)`` returns
      ``[B, V, dim]`` virtual-token embeddings, prepended to the token
      embeddings (the position embeddings ``0..V-1`` are added to them).
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

    Two modes, as :meth:`fedjax_fm.models.Decoder.__call__`:

    * Full sequence (``cache=None``): the ``L`` tokens attend causally to
      each other. With a soft prompt (the :attr:`prompt` hook) its ``V``
      virtual tokens (positions ``0..V-1``) are prepended, are always
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
      positions: optional ``[L]`` or ``[B, L]`` int indices into the learned
        position embeddings, each in ``[0, max_len)`` (not checked; an
        index out of range gives NaN embeddings). Default without a cache:
        ``V .. V + L - 1`` (HF's default, padding included). Default with a
        cache: the number of real tokens before each token (real cache slots,
        virtual tokens included, plus real new tokens), so that padding does
        not shift positions (as HF ``generate`` does); these stay below the
        cache length, hence below ``max_len``.
      cache: optional :class:`~fedjax_fm.models.decoder.KVCache`.
      rngs: call-time rngs for dropout; ``None`` = deterministic. Without a
        cache each layer draws from its own key, as in the Decoder.

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
    x = x + self._position_embeddings(positions)
    if prompt is not None:
      virtual = prompt(b).astype(x.dtype)
      virtual = virtual + self.pos_embed(jnp.arange(nv))[None]
      x = jnp.concatenate([virtual, x], axis=1)
      real = jnp.concatenate([jnp.ones((b, nv), bool), real], axis=1)
    t = nv + l
    x = dropout(x, cfg.dropout, rngs)
    mask = jnp.tril(jnp.ones((t, t), dtype=bool))[None] & real[:, None, :]
    x = scan_layers(
        self.layers, lambda layer, h, _, r: layer(h, mask, rngs=r), x,
        scan=cfg.scan_layers, remat=cfg.remat, rngs=rngs,
    )
    return self._logits(x[:, nv:], rngs)

  def _position_embeddings(self, positions: jax.Array) -> jax.Array:
    """``[L]`` or ``[B, L]`` positions -> ``[1 or B, L, dim]`` embeddings."""
    pos = self.pos_embed(jnp.asarray(positions))
    return pos[None] if pos.ndim == 2 else pos

  def _logits(self, x: jax.Array, rngs: nnx.Rngs | None) -> jax.Array:
    x = self.norm(x)
    if self.lm_head is None:
      logits = self.embed.attend(x)
    else:
      logits = linear_apply(self.lm_head, x, rngs)
    return logits.astype(jnp.float32)

  def _cached_forward(self, x, real, positions, cache, rngs):
    """Cached forward of token embeddings ``x [B, L, dim]``; see __call__."""
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
    x = x + self._position_embeddings(positions).astype(x.dtype)
    kv_mask = jax.lax.dynamic_update_slice(cache.mask, real, (0, index))
    causal = jnp.arange(s)[None, :] <= index + jnp.arange(l)[:, None]
    mask = causal[None] & kv_mask[:, None, :]
    x = dropout(x, self.config.dropout, rngs)
    ks, vs = [], []
    for i, layer in enumerate(self.layers):
      x, (k, v) = layer(
          x, mask, cache=(cache.k[i], cache.v[i], index), rngs=rngs
      )
      ks.append(k)
      vs.append(v)
    new_cache = KVCache(jnp.stack(ks), jnp.stack(vs), kv_mask, index + l)
    return self._logits(x, rngs), new_cache

  def init_cache(
      self, batch_size: int, max_length: int, *, dtype: Any = None
  ) -> KVCache:
    """Returns a :class:`~fedjax_fm.models.decoder.KVCache` for cached calls.

    The cache holds ``[num_layers, B, S, num_heads, head_dim]`` keys and
    values. It is empty, except with a soft prompt (prompt tuning): its ``V``
    virtual tokens (positions ``0..V-1``), which only attend to each other,
    are run through the model and fill slots ``0..V-1`` (``index = V``).

    Args:
      batch_size: ``B >= 1``.
      max_length: number of slots ``S``, virtual tokens included; ``V < S
        <= config.max_len`` (HF ``n_positions``: every cached token needs a
        learned position).
      dtype: cache dtype; defaults to the compute dtype ``config.dtype``.

    Returns:
      The cache.

    Raises:
      ValueError: on a bad ``batch_size`` or ``max_length``.
    """
    return init_kv_cache(self, batch_size, max_length, dtype=dtype)
