"""A Llama-style decoder-only transformer in Flax NNX.

Pre-norm blocks with RMSNorm, rotary position embeddings (HF Llama
"rotate-half" convention), grouped-query attention and a gated MLP; no
biases by default. Config switches cover the other decoder families of
:mod:`fedjax_fm.hf` (Mistral, Qwen2/3, Gemma 1/2/3, Phi-3) within this one
module tree: explicit ``head_size``, RoPE scaling (linear, dynamic NTK,
Llama 3, YaRN) and partial rotary dims, q/k RMSNorm per head, GeGLU, Gemma's
``(1 + w)`` RMSNorm and embedding scale, post-attention / post-MLP norms,
attention and final logit soft-capping, and sliding-window attention.

What differs between layers (sliding window or not, local RoPE base) is
data: per-layer index arrays (:meth:`DecoderConfig.layer_mask_index`,
:meth:`DecoderConfig.layer_rope_index`) into stacked masks and RoPE tables,
never a different module structure, so that the layers can be stacked and
scanned. Parameter paths::

  embed.embedding
  layers.{i}.attn_norm.scale
  layers.{i}.attn.{q_proj,k_proj,v_proj,o_proj}.kernel
  layers.{i}.attn.{q_norm,k_norm}.scale      (qk_norm=True)
  layers.{i}.post_attn_norm.scale            (post_norms=True)
  layers.{i}.mlp_norm.scale
  layers.{i}.mlp.{gate_proj,up_proj,down_proj}.kernel
  layers.{i}.post_mlp_norm.scale             (post_norms=True)
  norm.scale
  lm_head.kernel            (absent with tie_embeddings=True)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedjax_fm.models.layers import ACTIVATIONS
from fedjax_fm.models.layers import RMSNorm
from fedjax_fm.models.layers import activation
from fedjax_fm.models.layers import dropout
from fedjax_fm.models.layers import embed
from fedjax_fm.models.layers import linear
from fedjax_fm.models.layers import linear_apply
from fedjax_fm.models.scan import check_scan_fields
from fedjax_fm.models.scan import scan_layers

__all__ = [
    'ROPE_TYPES',
    'Attention',
    'DecoderBlock',
    'DecoderConfig',
    'Decoder',
    'KVCache',
    'init_kv_cache',
    'MLP',
    'RMSNorm',
    'RopeScaling',
    'apply_rope',
    'apply_rotary',
    'rope_cos_sin',
    'rotate_half',
]

# RoPE scalings implemented by :class:`RopeScaling` (HF ``rope_type`` names).
ROPE_TYPES = ('linear', 'dynamic', 'llama3', 'yarn')


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """A scaled RoPE (HF ``rope_parameters`` with a non-default ``rope_type``).

  Attributes:
    rope_type: one of :data:`ROPE_TYPES`: ``'linear'`` (positions divided by
      ``factor``), ``'dynamic'`` (NTK-aware base grown with the sequence
      length once it exceeds ``original_max_len``), ``'llama3'`` (Llama 3.1
      frequency-band scaling), ``'yarn'`` (YaRN ramp between interpolation
      and extrapolation, plus an attention factor on cos/sin).
    factor: scaling factor (>= 1 in practice).
    original_max_len: ``'llama3'``/``'yarn'``: the pre-training context
      (HF ``original_max_position_embeddings``); ``'dynamic'``: the length
      above which the base grows (HF ``max_position_embeddings``).
    low_freq_factor: ``'llama3'`` only.
    high_freq_factor: ``'llama3'`` only.
    beta_fast: ``'yarn'`` only.
    beta_slow: ``'yarn'`` only.
    attention_factor: ``'yarn'``: cos/sin multiplier; ``None`` derives it
      from ``factor`` (and ``mscale`` / ``mscale_all_dim``).
    mscale: ``'yarn'`` only.
    mscale_all_dim: ``'yarn'`` only.
    truncate: ``'yarn'``: round the correction range to integers.
  """

  rope_type: str = 'linear'
  factor: float = 1.0
  original_max_len: int | None = None
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  attention_factor: float | None = None
  mscale: float | None = None
  mscale_all_dim: float | None = None
  truncate: bool = True

  def validate(self) -> 'RopeScaling':
    """Raises ValueError on an inconsistent scaling; returns self."""
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(
          f'rope_scaling.rope_type must be one of {ROPE_TYPES}, got '
          f'{self.rope_type!r}'
      )
    if not self.factor > 0:
      raise ValueError(f'rope_scaling.factor must be > 0, got {self.factor}')
    if self.rope_type != 'linear' and not (
        isinstance(self.original_max_len, int) and self.original_max_len > 0):
      raise ValueError(
          f'rope_scaling.original_max_len must be a positive int for '
          f'rope_type={self.rope_type!r}, got {self.original_max_len!r}'
      )
    if (self.rope_type == 'llama3'
        and not self.high_freq_factor > self.low_freq_factor):
      raise ValueError(
          'rope_scaling.high_freq_factor must exceed low_freq_factor, got '
          f'{self.high_freq_factor} <= {self.low_freq_factor}'
      )
    return self

  def attention_scale(self) -> float:
    """The cos/sin multiplier (1 except for YaRN)."""
    if self.rope_type != 'yarn':
      return 1.0
    if self.attention_factor is not None:
      return float(self.attention_factor)

    def mscale(scale, m=1.0):
      return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if self.mscale and self.mscale_all_dim:
      return float(mscale(self.factor, self.mscale)
                   / mscale(self.factor, self.mscale_all_dim))
    return mscale(self.factor)

  def inv_freq(self, dim: int, theta: float,
               seq_len: jax.Array | None = None) -> jax.Array:
    """Scaled inverse frequencies ``[dim // 2]`` (float32).

    Args:
      dim: rotary dims.
      theta: RoPE base.
      seq_len: ``'dynamic'`` only: current sequence length (the largest
        position + 1), may be traced.
    """
    exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
    base_freq = 1.0 / (theta ** exponents)
    factor = self.factor
    if self.rope_type == 'linear':
      return base_freq / factor
    if self.rope_type == 'dynamic':
      orig = self.original_max_len
      if seq_len is None:
        return base_freq
      seq = jnp.maximum(jnp.asarray(seq_len, jnp.float32), orig)
      base = theta * ((factor * seq / orig) - (factor - 1)) ** (dim / (dim - 2))
      grown = 1.0 / (base ** exponents)
      return jnp.where(seq_len > orig, grown, base_freq)
    if self.rope_type == 'llama3':
      old = self.original_max_len
      low, high = self.low_freq_factor, self.high_freq_factor
      low_wavelen, high_wavelen = old / low, old / high
      wavelen = 2 * math.pi / base_freq
      scaled = jnp.where(wavelen > low_wavelen, base_freq / factor, base_freq)
      smooth = (old / wavelen - low) / (high - low)
      smoothed = (1 - smooth) * scaled / factor + smooth * scaled
      medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
      return jnp.where(medium, smoothed, scaled)
    # YaRN.
    def correction_dim(rotations):
      return (dim * math.log(self.original_max_len
                             / (rotations * 2 * math.pi))
              / (2 * math.log(theta)))

    lo, hi = correction_dim(self.beta_fast), correction_dim(self.beta_slow)
    if self.truncate:
      lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    if lo == hi:
      hi += 0.001
    pos_freqs = theta ** exponents
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    ramp = jnp.clip(
        (jnp.arange(dim // 2, dtype=jnp.float32) - lo) / (hi - lo), 0, 1)
    keep = 1 - ramp
    return interpolation * (1 - keep) + extrapolation * keep


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Configuration of :class:`Decoder`.

  The defaults are the Llama architecture; the other fields switch on the
  features of other decoder families (see :mod:`fedjax_fm.hf.configs`).

  Attributes:
    vocab_size: vocabulary size.
    dim: model width.
    num_layers: number of transformer blocks.
    num_heads: number of query heads.
    num_kv_heads: number of key/value heads (GQA); must divide num_heads.
    mlp_dim: gated-MLP hidden size.
    max_len: maximum sequence length.
    rope_theta: RoPE base (of the global layers, see ``local_rope_theta``).
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
    head_size: width of one attention head (HF ``head_dim``); ``None`` means
      ``dim // num_heads``. Read the resolved width from :attr:`head_dim`.
    mlp_activation: activation of the MLP gate (a name of
      :data:`~fedjax_fm.models.layers.ACTIVATIONS`): ``'silu'`` (SwiGLU),
      ``'gelu_new'`` (GeGLU with the tanh GELU, Gemma), ``'gelu'``.
    norm_scale_offset: RMSNorm multiplies by ``norm_scale_offset + scale``
      (1.0 for Gemma, whose norm weights are offsets from 1).
    embed_scale: multiply the token embeddings by ``sqrt(dim)`` (Gemma).
    qk_norm: RMSNorm over each query/key head before RoPE (Qwen3, Gemma3).
    post_norms: also normalize the attention and MLP outputs before the
      residual adds (Gemma2/3 "sandwich" norms).
    query_pre_attn_scalar: attention logits are scaled by
      ``query_pre_attn_scalar ** -0.5``; ``None`` means ``head_dim ** -0.5``.
    attn_logit_softcap: ``cap * tanh(logits / cap)`` on the attention logits
      (Gemma2); ``None`` = off.
    final_logit_softcap: the same on the output logits; ``None`` = off.
    rope_scaling: a :class:`RopeScaling` of the global layers' RoPE, or
      ``None`` for plain RoPE.
    partial_rotary_factor: fraction of each head's dims that RoPE rotates
      (the first ``rope_dim``, Phi-3 style); 1.0 = all.
    sliding_window: window ``W`` of the sliding-window layers: a token
      attends to itself and the ``W - 1`` tokens before it; ``None`` = no
      sliding-window layer.
    sliding_layers: per layer, whether it uses the sliding window; ``None``
      means every layer (when ``sliding_window`` is set).
    local_rope_theta: RoPE base of the sliding-window layers (plain RoPE,
      Gemma3 ``rope_local_base_freq``); ``None`` = they use the global RoPE.
    scan_layers: run the full-sequence forward as one ``lax.scan`` over the
      stacked layers when they share one structure (the layer is compiled
      once, whatever the depth); ``False``: a Python loop. Same numbers
      either way.
    remat: rematerialisation of each layer in the backward pass, one of
      :data:`~fedjax_fm.models.scan.REMAT_POLICIES`: ``'none'``, ``'layer'``
      (recompute everything inside a layer) or ``'dots'`` (keep the
      projections' matmul results).
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
  head_size: int | None = None
  mlp_activation: str = 'silu'
  norm_scale_offset: float = 0.0
  embed_scale: bool = False
  qk_norm: bool = False
  post_norms: bool = False
  query_pre_attn_scalar: float | None = None
  attn_logit_softcap: float | None = None
  final_logit_softcap: float | None = None
  rope_scaling: RopeScaling | None = None
  partial_rotary_factor: float = 1.0
  sliding_window: int | None = None
  sliding_layers: tuple[bool, ...] | None = None
  local_rope_theta: float | None = None
  scan_layers: bool = False
  remat: str = 'none'

  @property
  def head_dim(self) -> int:
    """Width of one attention head."""
    if self.head_size is not None:
      return self.head_size
    return self.dim // self.num_heads

  @property
  def rope_dim(self) -> int:
    """Number of rotated dims of each head (the leading ones)."""
    return int(self.head_dim * self.partial_rotary_factor)

  @property
  def layer_is_sliding(self) -> tuple[bool, ...]:
    """Per layer: True where it attends through the sliding window."""
    if self.sliding_window is None:
      return (False,) * self.num_layers
    if self.sliding_layers is None:
      return (True,) * self.num_layers
    return tuple(bool(s) for s in self.sliding_layers)

  def layer_mask_index(self) -> np.ndarray:
    """int32 ``[num_layers]``: each layer's row of the stacked masks.

    Row 0 is the causal mask; row 1 (present when some layer slides) the
    sliding-window causal mask.
    """
    return np.asarray(self.layer_is_sliding, np.int32)

  def layer_rope_index(self) -> np.ndarray:
    """int32 ``[num_layers]``: each layer's row of the stacked RoPE tables.

    Row 0 is the global RoPE; row 1 (present when ``local_rope_theta`` is
    set and some layer slides) the local RoPE of sliding-window layers.
    """
    if self.local_rope_theta is None:
      return np.zeros(self.num_layers, np.int32)
    return self.layer_mask_index()

  def validate(self) -> 'DecoderConfig':
    """Raises ValueError on an inconsistent config; returns self."""
    for name in ('vocab_size', 'dim', 'num_layers', 'num_heads',
                 'num_kv_heads', 'mlp_dim', 'max_len'):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f'{name} must be a positive int, got {value!r}')
    if self.head_size is None:
      if self.dim % self.num_heads:
        raise ValueError(
            f'dim ({self.dim}) must be divisible by num_heads '
            f'({self.num_heads}) unless head_size is set'
        )
    elif not isinstance(self.head_size, int) or self.head_size < 1:
      raise ValueError(
          f'head_size must be None or a positive int, got {self.head_size!r}'
      )
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f'num_kv_heads ({self.num_kv_heads}) must divide num_heads '
          f'({self.num_heads})'
      )
    if not 0.0 < self.partial_rotary_factor <= 1.0:
      raise ValueError(
          'partial_rotary_factor must be in (0, 1], got '
          f'{self.partial_rotary_factor}'
      )
    if self.rope_dim < 2 or self.rope_dim % 2:
      if self.partial_rotary_factor == 1.0:
        raise ValueError(
            f'head_dim = {self.head_dim} must be even for RoPE'
        )
      raise ValueError(
          f'rope_dim = int(head_dim * partial_rotary_factor) = '
          f'{self.rope_dim} must be even and >= 2'
      )
    if self.rope_theta <= 0:
      raise ValueError(f'rope_theta must be > 0, got {self.rope_theta}')
    if self.norm_eps <= 0:
      raise ValueError(f'norm_eps must be > 0, got {self.norm_eps}')
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f'dropout must be in [0, 1), got {self.dropout}')
    if self.mlp_activation not in ACTIVATIONS:
      raise ValueError(
          f'mlp_activation must be one of {ACTIVATIONS}, got '
          f'{self.mlp_activation!r}'
      )
    for name in ('query_pre_attn_scalar', 'attn_logit_softcap',
                 'final_logit_softcap', 'local_rope_theta'):
      value = getattr(self, name)
      if value is not None and not value > 0:
        raise ValueError(f'{name} must be None or > 0, got {value!r}')
    if self.rope_scaling is not None:
      if not isinstance(self.rope_scaling, RopeScaling):
        raise ValueError(
            'rope_scaling must be None or a RopeScaling, got '
            f'{type(self.rope_scaling).__name__}'
        )
      self.rope_scaling.validate()
    if self.sliding_window is not None and (
        isinstance(self.sliding_window, bool)
        or not isinstance(self.sliding_window, int)
        or self.sliding_window < 1):
      raise ValueError(
          'sliding_window must be None or a positive int, got '
          f'{self.sliding_window!r}'
      )
    if self.sliding_layers is not None:
      if self.sliding_window is None:
        raise ValueError('sliding_layers needs a sliding_window')
      if (not isinstance(self.sliding_layers, tuple)
          or len(self.sliding_layers) != self.num_layers):
        raise ValueError(
            f'sliding_layers must be a tuple of {self.num_layers} bools (one '
            f'per layer), got {self.sliding_layers!r}'
        )
    check_scan_fields(self)
    return self


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float,
                 scaling: RopeScaling | None = None):
  """Returns ``cos, sin`` of shape ``[..., head_dim]`` (HF Llama layout).

  Args:
    positions: integer positions, any shape.
    head_dim: number of rotated dims (even).
    theta: RoPE base.
    scaling: optional :class:`RopeScaling`; ``'dynamic'`` grows the base with
      the largest position in ``positions``.
  """
  if scaling is None:
    inv_freq = 1.0 / (
        theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    )
  else:
    seq_len = None
    if scaling.rope_type == 'dynamic':
      seq_len = jnp.max(positions) + 1
    inv_freq = scaling.inv_freq(head_dim, theta, seq_len)
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  cos, sin = jnp.cos(emb), jnp.sin(emb)
  if scaling is not None and scaling.attention_scale() != 1.0:
    factor = jnp.float32(scaling.attention_scale())
    cos, sin = cos * factor, sin * factor
  return cos, sin


def rotate_half(x: jax.Array) -> jax.Array:
  """``[x1, x2] -> [-x2, x1]`` on the last axis."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates the leading ``cos.shape[-1]`` dims of each head.

  Args:
    x: ``[B, L, H, D]`` queries or keys.
    cos: ``[L, R]`` or ``[B, L, R]`` from :func:`rope_cos_sin`, ``R <= D``.
    sin: same shape as ``cos``.

  Returns:
    ``x * cos + rotate_half(x) * sin`` on the first ``R`` dims (the others
    pass through), in ``x.dtype``.
  """
  if cos.ndim == 2:  # [L, R]
    cos, sin = cos[None], sin[None]
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  x32 = x.astype(jnp.float32)
  r = cos.shape[-1]
  if r == x.shape[-1]:
    return (x32 * cos + rotate_half(x32) * sin).astype(x.dtype)
  rot, rest = x32[..., :r], x32[..., r:]
  rot = rot * cos + rotate_half(rot) * sin
  return jnp.concatenate([rot, rest], axis=-1).astype(x.dtype)


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
  return apply_rotary(x, cos, sin)


def _softcap(x: jax.Array, cap: float | None) -> jax.Array:
  if cap is None:
    return x
  return jnp.tanh(x / cap) * cap


def _norm(cfg: DecoderConfig, dim: int | None = None) -> RMSNorm:
  return RMSNorm(cfg.dim if dim is None else dim, eps=cfg.norm_eps,
                 dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                 scale_offset=cfg.norm_scale_offset)


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
    q_norm, k_norm: per-head RMSNorms of queries/keys (``qk_norm=True``),
      else ``None``.
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
    self.rope_dim = cfg.rope_dim
    self.rope_scaling = cfg.rope_scaling
    self.query_pre_attn_scalar = cfg.query_pre_attn_scalar
    self.softcap = cfg.attn_logit_softcap
    qkv_bias = cfg.attention_bias
    self.q_proj = _linear(cfg, cfg.dim, cfg.num_heads * hd, rngs, qkv_bias)
    self.k_proj = _linear(cfg, cfg.dim, cfg.num_kv_heads * hd, rngs, qkv_bias)
    self.v_proj = _linear(cfg, cfg.dim, cfg.num_kv_heads * hd, rngs, qkv_bias)
    self.o_proj = _linear(cfg, cfg.num_heads * hd, cfg.dim, rngs,
                          cfg.attention_out_bias)
    if cfg.qk_norm:
      self.q_norm = _norm(cfg, hd)
      self.k_norm = _norm(cfg, hd)
    else:
      self.q_norm = self.k_norm = None
    self.prefix = nnx.data(None)

  def __call__(
      self,
      x: jax.Array,
      mask: jax.Array,
      positions: jax.Array | None = None,
      *,
      rope: tuple[jax.Array, jax.Array] | None = None,
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
        cache slot) with a cache; True = may attend. A sliding window is
        part of the mask.
      positions: ``[L]`` or ``[B, L]`` RoPE positions (the layer's global
        RoPE); ignored when ``rope`` is given.
      rope: ``(cos, sin)`` tables ``[L, rope_dim]`` or ``[B, L, rope_dim]``
        (:func:`rope_cos_sin`), as the :class:`Decoder` passes them.
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
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    if rope is None:
      rope = rope_cos_sin(positions, self.rope_dim, self.rope_theta,
                          self.rope_scaling)
    q = apply_rotary(q, *rope)
    k = apply_rotary(k, *rope)
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
    )
    if self.query_pre_attn_scalar is None:
      scores = scores / jnp.sqrt(jnp.float32(hd))
    else:
      scores = scores * jnp.float32(self.query_pre_attn_scalar ** -0.5)
    scores = _softcap(scores, self.softcap)
    scores = jnp.where(
        mask[:, None, None], scores, jnp.finfo(jnp.float32).min
    )
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum('bkgqs,bskd->bqkgd', probs, v)
    out = out.reshape(b, l, self.num_heads * hd)
    out = linear_apply(self.o_proj, out, rngs)
    return out if new_cache is None else (out, new_cache)


class MLP(nnx.Module):
  """Gated MLP: ``down(act(gate(x)) * up(x))`` (SwiGLU with ``silu``)."""

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
    self.gate_proj = _linear(cfg, cfg.dim, cfg.mlp_dim, rngs, cfg.mlp_bias)
    self.up_proj = _linear(cfg, cfg.dim, cfg.mlp_dim, rngs, cfg.mlp_bias)
    self.down_proj = _linear(cfg, cfg.mlp_dim, cfg.dim, rngs, cfg.mlp_bias)
    self.activation = cfg.mlp_activation

  def __call__(self, x, *, rngs: nnx.Rngs | None = None):
    h = activation(self.activation)(linear_apply(self.gate_proj, x, rngs))
    h = h * linear_apply(self.up_proj, x, rngs)
    return linear_apply(self.down_proj, h, rngs)


class DecoderBlock(nnx.Module):
  """Pre-norm block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``.

  With ``post_norms`` the attention and MLP outputs are normalized too before
  the residual adds: ``x + post_attn_norm(attn(attn_norm(x)))``, then
  ``x + post_mlp_norm(mlp(mlp_norm(x)))``.
  """

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
    self.attn_norm = _norm(cfg)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = _norm(cfg)
    self.mlp = MLP(cfg, rngs=rngs)
    if cfg.post_norms:
      self.post_attn_norm = _norm(cfg)
      self.post_mlp_norm = _norm(cfg)
    else:
      self.post_attn_norm = self.post_mlp_norm = None
    self.dropout = cfg.dropout

  def __call__(self, x, mask, positions=None, *, rope=None, cache=None,
               rngs: nnx.Rngs | None = None):
    """Applies the block; see :meth:`Attention.__call__` for the arguments.

    Returns:
      ``[B, L, dim]``; with a cache, ``(x, (k_cache, v_cache))``.
    """
    h = self.attn(self.attn_norm(x), mask, positions, rope=rope, cache=cache,
                  rngs=rngs)
    if cache is not None:
      h, new_cache = h
    if self.post_attn_norm is not None:
      h = self.post_attn_norm(h)
    x = x + dropout(h, self.dropout, rngs)
    h = self.mlp(self.mlp_norm(x), rngs=rngs)
    if self.post_mlp_norm is not None:
      h = self.post_mlp_norm(h)
    x = x + dropout(h, self.dropout, rngs)
    return x if cache is None else (x, new_cache)


class KVCache(NamedTuple):
  """Key/value cache of a :class:`Decoder` or :class:`~fedjax_fm.models.GPT2` (a pytree of arrays).

  Slot ``s`` of every layer holds the RoPE-rotated key and the value of one
  token; the slots ``0 .. index - 1`` are written. Sliding-window layers keep
  every slot too (their window is applied by the attention mask).

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
      embeddings that are prepended to the token embeddings (after the
      ``embed_scale`` of the token embeddings, which they do not get).
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
    self.norm = _norm(cfg)
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

    Sliding-window layers attend only to the ``sliding_window - 1`` tokens
    (sequence slots, padding included, as in HF transformers) before each
    token, and to the token itself.

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
      rngs: call-time rngs for dropout; ``None`` = deterministic. Without a
        cache each layer draws from its own key (one draw of the
        ``dropout`` stream, split per layer), whether the layers are
        scanned or looped (``config.scan_layers``).

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
    if cfg.embed_scale:
      x = x * jnp.asarray(cfg.dim ** 0.5, x.dtype)
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
    query_slot = jnp.arange(t)
    masks = self._masks(query_slot, jnp.arange(t), real)
    cos, sin = self._rope_tables(positions)

    def block(layer, h, index, layer_rngs):
      m, r = index
      return layer(h, masks[m], rope=(cos[r], sin[r]), rngs=layer_rngs)

    x = scan_layers(
        self.layers, block, x,
        (cfg.layer_mask_index(), cfg.layer_rope_index()),
        scan=cfg.scan_layers, remat=cfg.remat, rngs=rngs,
    )
    return self._logits(x[:, nv:], rngs)

  def _masks(self, query_slot: jax.Array, key_slot: jax.Array,
             real: jax.Array) -> jax.Array:
    """Stacked bool masks ``[K, B, L, S]``: causal, then sliding (if used).

    Args:
      query_slot: ``[L]`` sequence slot of each query.
      key_slot: ``[S]`` sequence slot of each key.
      real: ``[B, S]`` attendable keys.
    """
    cfg = self.config
    causal = key_slot[None, :] <= query_slot[:, None]
    masks = [causal[None] & real[:, None, :]]
    if any(cfg.layer_is_sliding):
      window = key_slot[None, :] > query_slot[:, None] - cfg.sliding_window
      masks.append((causal & window)[None] & real[:, None, :])
    return jnp.stack(masks)

  def _rope_tables(self, positions: jax.Array):
    """Stacked ``(cos, sin)`` ``[R, ..., rope_dim]``: global, then local."""
    cfg = self.config
    tables = [rope_cos_sin(positions, cfg.rope_dim, cfg.rope_theta,
                           cfg.rope_scaling)]
    if cfg.local_rope_theta is not None and any(cfg.layer_is_sliding):
      tables.append(rope_cos_sin(positions, cfg.rope_dim,
                                 cfg.local_rope_theta))
    return (jnp.stack([c for c, _ in tables]),
            jnp.stack([s for _, s in tables]))

  def _logits(self, x: jax.Array, rngs: nnx.Rngs | None) -> jax.Array:
    x = self.norm(x)
    if self.lm_head is None:
      logits = self.embed.attend(x)
    else:
      logits = linear_apply(self.lm_head, x, rngs)
    return _softcap(logits.astype(jnp.float32),
                    self.config.final_logit_softcap)

  def _cached_forward(self, x, real, positions, cache, rngs):
    """Cached forward of embeddings ``x [B, L, dim]``; see ``__call__``."""
    cfg = self.config
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
    masks = self._masks(index + jnp.arange(l), jnp.arange(s), kv_mask)
    cos, sin = self._rope_tables(positions)
    mask_index, rope_index = cfg.layer_mask_index(), cfg.layer_rope_index()
    x = dropout(x, cfg.dropout, rngs)
    ks, vs = [], []
    for i, layer in enumerate(self.layers):
      r = rope_index[i]
      x, (k, v) = layer(
          x, masks[mask_index[i]], rope=(cos[r], sin[r]),
          cache=(cache.k[i], cache.v[i], index), rngs=rngs,
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
    return init_kv_cache(self, batch_size, max_length, dtype=dtype)


def init_kv_cache(model, batch_size: int, max_length: int, *, dtype: Any = None
                  ) -> KVCache:
  """The ``init_cache`` of the cached models (:class:`Decoder`, GPT-2).

  ``model`` has ``config`` (``max_len``, ``num_kv_heads``, ``head_dim``,
  ``dtype``), ``layers``, the ``prompt`` hook and ``_cached_forward``; see
  :meth:`Decoder.init_cache`.
  """
  cfg = model.config
  for name, value in (('batch_size', batch_size),
                      ('max_length', max_length)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f'{name} must be a positive int, got {value!r}')
  prompt = model.prompt
  nv = model.num_virtual_tokens
  if not nv < max_length <= cfg.max_len:
    raise ValueError(
        f'max_length must be in ({nv}, max_len={cfg.max_len}] (the model '
        f'has {nv} virtual tokens), got {max_length}'
    )
  dtype = cfg.dtype if dtype is None else dtype
  shape = (len(model.layers), batch_size, max_length, cfg.num_kv_heads,
           cfg.head_dim)
  cache = KVCache(
      jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
      jnp.zeros((batch_size, max_length), bool), jnp.zeros((), jnp.int32),
  )
  if prompt is not None:
    x = prompt(batch_size).astype(cfg.dtype)
    _, cache = model._cached_forward(
        x, jnp.ones((batch_size, nv), bool), jnp.arange(nv), cache, None
    )
  return cache
