"""A quantized frozen base (QLoRA-style): block-quantized kernels, dequantized in the matmul.

QLoRA (Dettmers et al. 2023, https://arxiv.org/abs/2305.14314) keeps the frozen
base model in 4 bits and trains LoRA factors on top of it. This module gives
the pieces for that, in plain JAX:

* pure, jittable functions that block-quantize an array and dequantize it:
  :func:`quantize_int8` (symmetric absmax int8), :func:`quantize_nf4` (the 16
  NormalFloat levels of QLoRA, two 4-bit codes per byte, optional double
  quantization of the scales) and :func:`dequantize`;
* :func:`from_gguf_blocks`: GGUF ``Q8_0``, ``Q4_0`` and ``Q4_1`` tensors taken
  as they are stored (codes and scales split into arrays, nothing dequantized
  at load), dequantized in JAX with the GGML nibble order;
* :class:`QuantizedLinear`: stands in for a frozen ``nnx.Linear``; its codes
  and scales are :class:`QuantizedWeight` variables (not ``nnx.Param``), so no
  PEFT split ever trains or communicates them; each call dequantizes the
  kernel block-wise and multiplies;
* :func:`quantize_base`: swaps, in place, the ``nnx.Linear`` layers of a model
  (by default the projections inside its transformer layers) for
  :class:`QuantizedLinear` and reports the bytes saved.

Layout. A :class:`QuantizedTensor` of logical ``shape`` is cut into blocks of
``block_size`` consecutive elements along its block ``axis``. Its arrays keep
the other axes in order and put the blocks last::

  codes   [*rows, n_blocks, block_size]       int8   (int8, q8_0)
          [*rows, n_blocks, block_size // 2]  uint8  (nf4, q4_0, q4_1)
  scales  [*rows, n_blocks]                   f32/f16 (or a QuantizedTensor)
  mins    [*rows, n_blocks] or None           (q4_1; the double-quantized scales)

A 4-bit block packs its first half in the low nibbles and its second half in
the high nibbles (the GGML order: byte ``j`` holds elements ``j`` and
``j + block_size / 2``). An ``nnx`` kernel ``[in, out]`` quantized along its
input axis and a GGUF (HF) weight ``[out, in]`` stored as rows of ``in`` have
the same arrays: :attr:`QuantizedTensor.T` only swaps the logical view, and
the matmul contracts the stored rows directly, with no transposed copy.

Memory. The dequantized kernel is a temporary of one layer: the matmul has a
custom gradient that keeps only the codes and scales for the backward pass,
which dequantizes again, and each dequantization depends on the layer's input
(or output gradient) through a zero XLA cannot fold, so the compiler neither
shares the forward kernel with the backward pass nor hoists it out of the
loop over local steps (either would hold every dequantized kernel at once).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedjax_fm.peft.adapters import AdapterParam
from fedjax_fm.peft.ia3 import IA3Param
from fedjax_fm.peft.prompt import PrefixParam
from fedjax_fm.peft.prompt import PromptParam
from fedjax_fm.peft.surgery import dotted
from fedjax_fm.peft.surgery import get_child
from fedjax_fm.peft.surgery import normalize_patterns
from fedjax_fm.peft.surgery import path_matches
from fedjax_fm.peft.surgery import set_child

__all__ = [
    'DEFAULT_TARGETS',
    'FORMATS',
    'GGUF_TYPES',
    'NF4_LEVELS',
    'QUANTIZE_FORMATS',
    'QuantReport',
    'QuantizedLinear',
    'QuantizedTensor',
    'QuantizedWeight',
    'dequantize',
    'from_gguf_blocks',
    'quantize',
    'quantize_base',
    'quantize_int8',
    'quantize_nf4',
    'quantized_matmul',
]

# Formats :func:`quantize` produces, and every format :func:`dequantize` reads.
QUANTIZE_FORMATS = ('int8', 'nf4')
FORMATS = QUANTIZE_FORMATS + ('q8_0', 'q4_0', 'q4_1')

# GGML type ids (``gguf.GGMLQuantizationType``) of the GGUF block types read
# by :func:`from_gguf_blocks`, and their formats here.
GGUF_TYPES = {'Q4_0': 2, 'Q4_1': 3, 'Q8_0': 8}
_GGUF_FORMATS = {2: 'q4_0', 3: 'q4_1', 8: 'q8_0'}
_GGUF_BLOCK = 32
# Bytes of one GGUF block: f16 scale [+ f16 min] + codes.
_GGUF_BLOCK_BYTES = {'q8_0': 2 + 32, 'q4_0': 2 + 16, 'q4_1': 2 + 2 + 16}

# The 16 NormalFloat4 levels of QLoRA (Dettmers et al. 2023, appendix E): the
# quantiles of N(0, 1) (8 positive levels from probabilities evenly spaced in
# [0.5, 0.9677083], 7 negative ones likewise, and an exact zero), scaled
# into [-1, 1].
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
    0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
], np.float32)
_NF4_MIDPOINTS = ((NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2).astype(np.float32)

# Projections inside the transformer layers (``layers.{i}. ...``) of every
# model here; embeddings and output heads are left as they are.
DEFAULT_TARGETS = (r'layers\.\d+\..*',)

_FOUR_BIT = ('nf4', 'q4_0', 'q4_1')
# The int8 step is absmax * (1 / 127) in f32: written as a product, as XLA
# compiles a division by a constant, so a NumPy reference matches bit for bit.
_INV127 = np.float32(1.0 / 127.0)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=('codes', 'scales', 'mins'),
    meta_fields=('shape', 'fmt', 'block_size', 'axis'),
)
@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
  """A block-quantized array (a pytree of its codes, scales and mins).

  Attributes:
    codes: the codes, ``[*rows, n_blocks, block_size]`` (int8) or
      ``[*rows, n_blocks, block_size // 2]`` (uint8, two 4-bit codes a byte).
    scales: ``[*rows, n_blocks]`` per-block scales, or a
      :class:`QuantizedTensor` of them (double quantization).
    mins: ``[*rows, n_blocks]`` per-block offsets added after scaling, or
      ``None``.
    shape: the logical shape of the dequantized array.
    fmt: one of :data:`FORMATS`.
    block_size: elements per block along ``axis``.
    axis: the block axis of ``shape`` (non-negative).
  """

  codes: Any
  scales: Any
  mins: Any
  shape: tuple[int, ...]
  fmt: str
  block_size: int
  axis: int

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def rows_shape(self) -> tuple[int, ...]:
    """``shape`` without the block axis."""
    return self.shape[:self.axis] + self.shape[self.axis + 1:]

  @property
  def num_blocks(self) -> int:
    """Blocks per row (the last one zero-padded if needed)."""
    return -(-self.shape[self.axis] // self.block_size)

  @property
  def nbytes(self) -> int:
    """Bytes of all the arrays (codes, scales, mins)."""
    return _tree_bytes(self)

  @property
  def T(self) -> QuantizedTensor:  # pylint: disable=invalid-name
    """The transposed 2-D view (same arrays; only ``shape``/``axis`` swap)."""
    if self.ndim != 2:
      raise ValueError(f'T needs a 2-D QuantizedTensor, got shape {self.shape}')
    return dataclasses.replace(
        self, shape=self.shape[::-1], axis=1 - self.axis)


def _tree_bytes(tree: Any) -> int:
  """Bytes of the leaves of ``tree`` from their shapes (arrays or abstract)."""
  return int(sum(np.dtype(x.dtype).itemsize * math.prod(x.shape)
                 for x in jax.tree_util.tree_leaves(tree)))


def _check_block_size(block_size: Any, even: bool) -> int:
  if (isinstance(block_size, bool) or not isinstance(block_size, int)
      or block_size < 1 or (even and block_size % 2)):
    what = 'an even int >= 2' if even else 'an int >= 1'
    raise ValueError(f'block_size must be {what}, got {block_size!r}')
  return block_size


def _check_axis(axis: Any, ndim: int) -> int:
  if ndim < 1:
    raise ValueError('cannot quantize a scalar: w must have at least 1 axis')
  if isinstance(axis, bool) or not isinstance(axis, int) or not (
      -ndim <= axis < ndim):
    raise ValueError(f'axis must be an int in [-{ndim}, {ndim}), got {axis!r}')
  return axis % ndim


def _to_blocks(w: jax.Array, axis: int, block_size: int) -> jax.Array:
  """``w`` as ``[*rows, n_blocks, block_size]`` f32, the block axis zero-padded."""
  moved = jnp.moveaxis(jnp.asarray(w, jnp.float32), axis, -1)
  n = moved.shape[-1]
  nb = -(-n // block_size)
  if nb * block_size != n:
    pad = [(0, 0)] * (moved.ndim - 1) + [(0, nb * block_size - n)]
    moved = jnp.pad(moved, pad)
  return moved.reshape(moved.shape[:-1] + (nb, block_size))


def _pack_nibbles(codes: jax.Array) -> jax.Array:
  """``[..., b]`` codes in [0, 16) -> ``[..., b/2]`` bytes (GGML order)."""
  half = codes.shape[-1] // 2
  codes = codes.astype(jnp.uint8)
  return codes[..., :half] | (codes[..., half:] << 4)


def _unpack_nibbles(packed: jax.Array) -> jax.Array:
  """Inverse of :func:`_pack_nibbles`: low nibbles first, then high nibbles."""
  packed = jnp.asarray(packed, jnp.uint8)
  return jnp.concatenate([packed & 0x0F, packed >> 4], axis=-1)


def _safe(s: jax.Array) -> jax.Array:
  return jnp.where(s == 0, jnp.ones_like(s), s)


@functools.partial(jax.jit, static_argnames=('block_size', 'axis',
                                             'scale_dtype'))
def quantize_int8(
    w: jax.Array,
    block_size: int = 64,
    *,
    axis: int = 0,
    scale_dtype: Any = jnp.float32,
) -> QuantizedTensor:
  """Symmetric absmax int8 quantization per block of ``axis``.

  Each block of ``block_size`` elements along ``axis`` gets the scale ``s =
  absmax * (1 / 127)`` (f32, stored in ``scale_dtype``) and the codes ``round(w / s)``
  (computed with the stored scale), so that ``|w - code * s| <= s / 2``.

  Args:
    w: the array (any float dtype); for an ``nnx`` kernel ``[in, out]`` the
      default ``axis=0`` makes blocks of the input axis.
    block_size: elements per block (the last block is zero-padded).
    axis: the block axis.
    scale_dtype: dtype of the stored scales (``float32`` or ``float16``).

  Returns:
    A :class:`QuantizedTensor` of format ``'int8'``.
  """
  block_size = _check_block_size(block_size, even=False)
  axis = _check_axis(axis, jnp.ndim(w))
  blocks = _to_blocks(w, axis, block_size)
  scales = (jnp.max(jnp.abs(blocks), axis=-1) * _INV127).astype(scale_dtype)
  s = scales.astype(jnp.float32)[..., None]
  codes = jnp.clip(jnp.round(blocks / _safe(s)), -127, 127).astype(jnp.int8)
  return QuantizedTensor(codes, scales, None, tuple(jnp.shape(w)), 'int8',
                         block_size, axis)


def _nf4_codes(normalized: jax.Array) -> jax.Array:
  """Index of the nearest NF4 level of each element of ``normalized``."""
  mids = jnp.asarray(_NF4_MIDPOINTS)
  return jnp.sum(normalized[..., None] > mids, axis=-1).astype(jnp.uint8)


def _double_quantize(scales: jax.Array, block_size: int) -> QuantizedTensor:
  """Int8 codes of ``scales - mean`` per group of ``block_size`` (+ f32 means)."""
  flat = scales.reshape(-1).astype(jnp.float32)
  n = flat.shape[0]
  groups = -(-n // block_size)
  valid = (jnp.arange(groups * block_size) < n).reshape(groups, block_size)
  padded = jnp.pad(flat, (0, groups * block_size - n)).reshape(groups, -1)
  means = jnp.sum(padded, -1) / jnp.sum(valid, -1).astype(jnp.float32)
  centred = jnp.where(valid, padded - means[:, None], 0.0)
  step = jnp.max(jnp.abs(centred), axis=-1) * _INV127
  codes = jnp.clip(jnp.round(centred / _safe(step)[:, None]), -127, 127)
  return QuantizedTensor(codes.astype(jnp.int8), step, means, (n,), 'int8',
                         block_size, 0)


@functools.partial(
    jax.jit, static_argnames=('block_size', 'axis', 'scale_dtype',
                              'double_quant', 'double_quant_block_size'))
def quantize_nf4(
    w: jax.Array,
    block_size: int = 64,
    *,
    axis: int = 0,
    scale_dtype: Any = jnp.float32,
    double_quant: bool = False,
    double_quant_block_size: int = 256,
) -> QuantizedTensor:
  """NF4 quantization (QLoRA): absmax per block, nearest of 16 NormalFloat levels.

  Each block of ``block_size`` elements along ``axis`` is scaled by its
  absmax ``s`` and each element takes the code of the nearest level of
  :data:`NF4_LEVELS` to ``w / s``; it dequantizes to ``NF4_LEVELS[code] * s``.
  Two codes are packed per byte.

  Args:
    w: the array; for an ``nnx`` kernel ``[in, out]`` the default ``axis=0``
      makes blocks of the input axis.
    block_size: elements per block, even (the last block is zero-padded).
    axis: the block axis.
    scale_dtype: dtype of the stored scales without double quantization.
    double_quant: also quantize the scales (QLoRA's double quantization, here
      as symmetric int8 codes of ``scale - mean`` per group of
      ``double_quant_block_size`` scales, with an f32 step and mean per group):
      about 0.127 fewer bits per element at ``block_size=64``. The codes are
      chosen against the dequantized scales.
    double_quant_block_size: scales per group of the double quantization.

  Returns:
    A :class:`QuantizedTensor` of format ``'nf4'``.
  """
  block_size = _check_block_size(block_size, even=True)
  axis = _check_axis(axis, jnp.ndim(w))
  blocks = _to_blocks(w, axis, block_size)
  absmax = jnp.max(jnp.abs(blocks), axis=-1)
  if double_quant:
    _check_block_size(double_quant_block_size, even=False)
    scales = _double_quantize(absmax, double_quant_block_size)
    s = dequantize(scales).reshape(absmax.shape)
  else:
    scales = absmax.astype(scale_dtype)
    s = scales.astype(jnp.float32)
  codes = _nf4_codes(blocks / _safe(s)[..., None])
  return QuantizedTensor(_pack_nibbles(codes), scales, None,
                         tuple(jnp.shape(w)), 'nf4', block_size, axis)


def quantize(w: jax.Array, fmt: str = 'nf4', block_size: int = 64,
             **kwargs) -> QuantizedTensor:
  """:func:`quantize_int8` or :func:`quantize_nf4`, by ``fmt``.

  Raises:
    ValueError: for a format not in :data:`QUANTIZE_FORMATS`.
  """
  if fmt == 'int8':
    return quantize_int8(w, block_size, **kwargs)
  if fmt == 'nf4':
    return quantize_nf4(w, block_size, **kwargs)
  raise ValueError(f'fmt must be one of {QUANTIZE_FORMATS}, got {fmt!r}')


def _dequantize_rows(q: QuantizedTensor, dtype: Any = jnp.float32,
                     zero: jax.Array | None = None) -> jax.Array:
  """``[*rows, n]``: the values with the block axis last (f32 math, then ``dtype``).

  ``zero`` (an f32 scalar equal to 0, or ``None``) is added to the scales and
  the NF4 levels (and ``zero != 0``, i.e. 0, to the codes): it changes no
  value, but makes every step of the dequantization depend on whatever
  ``zero`` was computed from (see :func:`_tie`).
  """
  if q.fmt not in FORMATS:
    raise ValueError(f'fmt must be one of {FORMATS}, got {q.fmt!r}')
  nb = q.num_blocks
  scales = q.scales
  if isinstance(scales, QuantizedTensor):
    scales = dequantize(scales).reshape(q.rows_shape + (nb,))
  s = jnp.asarray(scales).astype(jnp.float32)
  if zero is not None:
    s = s + zero
  s = s[..., None]
  codes = jnp.asarray(q.codes)
  if zero is not None:
    codes = codes + (zero != 0).astype(codes.dtype)
  if q.fmt in _FOUR_BIT:
    codes = _unpack_nibbles(codes)
  if q.fmt == 'nf4':
    levels = jnp.asarray(NF4_LEVELS)
    if zero is not None:
      levels = levels + zero
    values = jnp.take(levels, codes.astype(jnp.int32)) * s
  elif q.fmt == 'q4_0':
    values = s * (codes.astype(jnp.float32) - 8.0)
  else:   # int8, q8_0, q4_1
    values = codes.astype(jnp.float32) * s
  if q.mins is not None:
    values = values + jnp.asarray(q.mins).astype(jnp.float32)[..., None]
  n = q.shape[q.axis]
  values = values.reshape(q.rows_shape + (nb * q.block_size,))[..., :n]
  return values.astype(dtype)


@functools.partial(jax.jit, static_argnames=('dtype',))
def dequantize(q: QuantizedTensor, dtype: Any = jnp.float32) -> jax.Array:
  """The array ``q`` stands for, of shape ``q.shape`` and dtype ``dtype``.

  The arithmetic is float32 (for GGUF blocks, the same operations as GGML's
  reference dequantization), then cast to ``dtype``.
  """
  return jnp.moveaxis(_dequantize_rows(q, dtype), -1, q.axis)


def _ggml_format(ggml_type: Any) -> str:
  if isinstance(ggml_type, str):
    key = ggml_type.upper()
    if key not in GGUF_TYPES:
      raise ValueError(
          f'ggml_type must be one of {tuple(GGUF_TYPES)} (or their GGML ids '
          f'{tuple(GGUF_TYPES.values())}), got {ggml_type!r}')
    return _GGUF_FORMATS[GGUF_TYPES[key]]
  try:
    return _GGUF_FORMATS[int(ggml_type)]
  except (KeyError, TypeError, ValueError):
    raise ValueError(
        f'ggml_type must be one of {tuple(GGUF_TYPES)} (or their GGML ids '
        f'{tuple(GGUF_TYPES.values())}), got {ggml_type!r}') from None


def _bitcast_f16(two_bytes: jax.Array) -> jax.Array:
  """``[..., 2]`` little-endian bytes -> ``[...]`` float16."""
  return jax.lax.bitcast_convert_type(two_bytes, jnp.float16)


def from_gguf_blocks(raw: Any, ggml_type: Any,
                     shape: Sequence[int]) -> QuantizedTensor:
  """A GGUF ``Q8_0``/``Q4_0``/``Q4_1`` tensor as stored, split into arrays.

  GGML blocks hold 32 consecutive elements of the last (row) axis:

  * ``Q8_0``: f16 scale ``d``, 32 int8 codes; ``value = q * d``;
  * ``Q4_0``: f16 ``d``, 16 bytes of nibbles; ``value = (q - 8) * d``;
  * ``Q4_1``: f16 ``d``, f16 min ``m``, 16 bytes; ``value = q * d + m``;

  where byte ``j`` of a 4-bit block holds element ``j`` (low nibble) and
  element ``j + 16`` (high nibble). Nothing is dequantized here: the codes
  keep their bytes and the scales (and mins) become float16 arrays.

  Args:
    raw: the tensor's bytes, a uint8 array of any shape (flat, or ``[*rows,
      bytes_per_row]`` as ``gguf.GGUFReader`` and ``gguf.quants.quantize``
      give them).
    ggml_type: ``'Q8_0'``, ``'Q4_0'``, ``'Q4_1'`` or their GGML ids (a
      ``gguf.GGMLQuantizationType``).
    shape: the logical shape in NumPy order (the reverse of GGUF's ``ne``):
      the last axis holds the blocks. A HF linear weight is ``(out, in)``;
      the ``nnx`` kernel is its :attr:`QuantizedTensor.T`.

  Returns:
    A :class:`QuantizedTensor` of format ``'q8_0'``, ``'q4_0'`` or ``'q4_1'``
    with ``axis = len(shape) - 1`` and ``block_size = 32``.

  Raises:
    ValueError: for an unknown type, a row length not a multiple of 32, or a
      byte count that does not match ``shape``.
  """
  fmt = _ggml_format(ggml_type)
  shape = tuple(int(d) for d in shape)
  if not shape or shape[-1] % _GGUF_BLOCK:
    raise ValueError(
        f'shape must have a last axis that is a multiple of {_GGUF_BLOCK} '
        f'(GGML blocks), got {shape}')
  raw = jnp.asarray(raw)
  if raw.dtype != jnp.uint8:
    raise ValueError(f'raw must be a uint8 array of bytes, got {raw.dtype}')
  nb = shape[-1] // _GGUF_BLOCK
  per_block = _GGUF_BLOCK_BYTES[fmt]
  want = math.prod(shape[:-1]) * nb * per_block
  if raw.size != want:
    raise ValueError(
        f'raw has {raw.size} bytes; a {fmt.upper()} tensor of shape {shape} '
        f'has {want}')
  blocks = raw.reshape(shape[:-1] + (nb, per_block))
  scales = _bitcast_f16(blocks[..., 0:2])
  mins = None
  if fmt == 'q8_0':
    codes = jax.lax.bitcast_convert_type(blocks[..., 2:], jnp.int8)
  elif fmt == 'q4_0':
    codes = blocks[..., 2:]
  else:
    mins = _bitcast_f16(blocks[..., 2:4])
    codes = blocks[..., 4:]
  return QuantizedTensor(codes, scales, mins, shape, fmt, _GGUF_BLOCK,
                         len(shape) - 1)


def _zero_cotangent(x: jax.Array):
  if jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.zeros(x.shape, x.dtype)
  return np.zeros(x.shape, jax.dtypes.float0)


def _dot_dims(q: QuantizedTensor, x_ndim: int):
  # Rows of a 2-D kernel [in, out]: [out, in] when blocks run along `in`.
  w_in = 1 if q.axis == 0 else 0
  return (((x_ndim - 1,), (w_in,)), ((), ()))


@jax.custom_batching.custom_vmap
def _tie(t: jax.Array) -> jax.Array:
  """An f32 zero computed from ``t`` (exactly 0 even for non-finite ``t``).

  XLA cannot fold it to a constant, so a dequantization that adds it depends
  on ``t``: it is neither shared between the forward and backward passes
  (common-subexpression elimination would keep every dequantized kernel alive
  from the forward pass to the backward one) nor hoisted out of a loop that
  ``t`` changes in (``optimization_barrier`` does not do this on every
  backend: the CPU compiler removes barriers before that elimination). Under
  ``vmap`` (e.g. over clients) the zero stays unbatched, so the kernel is
  dequantized once for the whole batch, not once per client.
  """
  first = jnp.sum(t.reshape(-1)[:1]).astype(jnp.float32)
  return jnp.where(jnp.isfinite(first), first, 0.0) * 0.0


@_tie.def_vmap
def _tie_vmap(axis_size, in_batched, t):
  del axis_size, in_batched
  return _tie(t), False


def _matmul_impl(x, q, dtype):
  w_rows = _dequantize_rows(q, dtype, _tie(x))
  return jax.lax.dot_general(x.astype(dtype), w_rows, _dot_dims(q, x.ndim))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _qmatmul(x, q, dtype):
  return _matmul_impl(x, q, dtype)


def _qmatmul_fwd(x, q, dtype):
  return _matmul_impl(x, q, dtype), (q, jnp.zeros((0,), x.dtype))


def _qmatmul_bwd(dtype, res, g):
  q, x_like = res
  w_rows = _dequantize_rows(q, dtype, _tie(g))
  w_out = 0 if q.axis == 0 else 1
  dx = jax.lax.dot_general(g.astype(dtype), w_rows,
                           (((g.ndim - 1,), (w_out,)), ((), ())))
  return dx.astype(x_like.dtype), jax.tree.map(_zero_cotangent, q)


_qmatmul.defvjp(_qmatmul_fwd, _qmatmul_bwd)


def quantized_matmul(x: jax.Array, q: QuantizedTensor,
                     dtype: Any = None) -> jax.Array:
  """``x @ dequantize(q)`` for a 2-D kernel ``q`` of logical shape ``[in, out]``.

  The kernel is dequantized in ``dtype`` (default: ``x.dtype``) inside the
  call and contracted in its stored layout (no transposed copy). The
  gradient flows to ``x`` only (the kernel is constant); the backward pass
  dequantizes again instead of keeping the dequantized kernel.

  Args:
    x: ``[..., in]``.
    q: a 2-D :class:`QuantizedTensor`.
    dtype: the compute dtype.

  Returns:
    ``[..., out]`` in ``dtype``.
  """
  if q.ndim != 2:
    raise ValueError(f'quantized_matmul needs a 2-D kernel, got shape {q.shape}')
  if x.shape[-1] != q.shape[0]:
    raise ValueError(
        f'x has {x.shape[-1]} features; the kernel expects {q.shape[0]}')
  dtype = jnp.dtype(x.dtype if dtype is None else dtype)
  return _qmatmul(x, q, dtype)


class QuantizedWeight(nnx.Variable):
  """Codes, scales and mins of a quantized kernel.

  Not an ``nnx.Param``: every PEFT split puts it in the frozen part, so it is
  broadcast to the clients and never trained, compressed or aggregated.
  """


class QuantizedLinear(nnx.Module):
  """A frozen linear layer whose kernel is a :class:`QuantizedTensor`.

  Computes ``x @ dequantize(kernel) + bias`` like the ``nnx.Linear`` it
  replaces, dequantizing block-wise in the compute dtype inside each call.

  Attributes:
    in_features, out_features: as ``nnx.Linear``.
    dtype: the compute dtype (``None``: promote the input and
      ``param_dtype``, as ``nnx.Linear``).
    param_dtype: dtype of the original kernel; PEFT wrappers create their
      parameters in it.
    fmt, block_size: the quantization format and block size.
    codes, scales, mins: :class:`QuantizedWeight` variables (``scale_codes``,
      ``scale_scales``, ``scale_mins`` instead of ``scales`` with double
      quantization); ``mins`` is ``None`` for formats without offsets.
    bias: the bias, kept as an ``nnx.Param`` (frozen by the LoRA, adapter and
      (IA)^3 splits; BitFit trains it), or ``None``.
    is_linear_leaf: ``True``: a linear layer itself, not a wrapper of one
      (for model surgery that looks for linear layers).
  """

  is_linear_leaf = True

  def __init__(
      self,
      kernel: QuantizedTensor,
      bias: jax.Array | None = None,
      *,
      dtype: Any = None,
      param_dtype: Any = jnp.float32,
  ):
    """Wraps a quantized kernel.

    Args:
      kernel: a 2-D :class:`QuantizedTensor` of logical shape ``[in, out]``
        (for GGUF blocks of a HF ``[out, in]`` weight: ``from_gguf_blocks(...).T``).
      bias: optional ``[out]`` bias.
      dtype: compute dtype.
      param_dtype: the dtype of the original kernel.
    """
    if not isinstance(kernel, QuantizedTensor) or kernel.ndim != 2:
      raise ValueError('kernel must be a 2-D QuantizedTensor of shape [in, out]')
    self.in_features, self.out_features = kernel.shape
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.fmt = kernel.fmt
    self.block_size = kernel.block_size
    self.kernel_axis = kernel.axis
    self.codes = QuantizedWeight(jnp.asarray(kernel.codes))
    if isinstance(kernel.scales, QuantizedTensor):
      inner = kernel.scales
      self.scale_meta = (inner.shape, inner.fmt, inner.block_size, inner.axis)
      self.scales = None
      self.scale_codes = QuantizedWeight(jnp.asarray(inner.codes))
      self.scale_scales = QuantizedWeight(jnp.asarray(inner.scales))
      self.scale_mins = (None if inner.mins is None
                         else QuantizedWeight(jnp.asarray(inner.mins)))
    else:
      self.scale_meta = None
      self.scales = QuantizedWeight(jnp.asarray(kernel.scales))
    self.mins = (None if kernel.mins is None
                 else QuantizedWeight(jnp.asarray(kernel.mins)))
    if bias is not None:
      bias = jnp.asarray(bias)
      if bias.shape != (self.out_features,):
        raise ValueError(
            f'bias must have shape ({self.out_features},), got {bias.shape}')
      self.bias = nnx.Param(bias)
    else:
      self.bias = None

  @classmethod
  def from_linear(
      cls,
      linear: nnx.Linear,
      fmt: str = 'nf4',
      block_size: int = 64,
      **kwargs,
  ) -> QuantizedLinear:
    """Quantizes an ``nnx.Linear`` (kernel blocks along its input axis).

    Args:
      linear: the layer; its ``dtype`` becomes the compute dtype.
      fmt: ``'int8'`` or ``'nf4'``.
      block_size: elements per block.
      **kwargs: passed to :func:`quantize_int8` / :func:`quantize_nf4`.
    """
    kernel = linear.kernel[...]
    q = quantize(kernel, fmt, block_size, axis=0, **kwargs)
    bias = None if linear.bias is None else linear.bias[...]
    return cls(q, bias, dtype=linear.dtype, param_dtype=kernel.dtype)

  @property
  def use_bias(self) -> bool:
    return self.bias is not None

  @property
  def kernel(self) -> QuantizedTensor:
    """The quantized kernel, logical shape ``[in_features, out_features]``."""
    if self.scale_meta is None:
      scales = self.scales[...]
    else:
      shape, fmt, block_size, axis = self.scale_meta
      scales = QuantizedTensor(
          self.scale_codes[...], self.scale_scales[...],
          None if self.scale_mins is None else self.scale_mins[...],
          shape, fmt, block_size, axis)
    return QuantizedTensor(
        self.codes[...], scales, None if self.mins is None else self.mins[...],
        (self.in_features, self.out_features), self.fmt, self.block_size,
        self.kernel_axis)

  @property
  def nbytes(self) -> int:
    """Bytes of the quantized kernel and the bias."""
    bias = 0 if self.bias is None else _tree_bytes(self.bias[...])
    return self.kernel.nbytes + bias

  def dequantized_kernel(self, dtype: Any = jnp.float32) -> jax.Array:
    """The ``[in, out]`` kernel as an array (for references and export)."""
    return dequantize(self.kernel, dtype)

  def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None):
    """Returns ``x @ dequantize(kernel) + bias`` in the compute dtype.

    Args:
      x: ``[..., in_features]``.
      rngs: unused (accepted as every linear wrapper's call).
    """
    del rngs
    dtype = self.dtype or jnp.result_type(x.dtype, self.param_dtype)
    y = quantized_matmul(x, self.kernel, dtype)
    if self.bias is not None:
      y = y + self.bias[...].astype(dtype)
    return y


class QuantReport(NamedTuple):
  """What :func:`quantize_base` did.

  Attributes:
    paths: dotted paths of the replaced layers.
    fmt: the format.
    block_size: the block size.
    replaced_bytes_before: bytes of the replaced layers' kernels and biases.
    replaced_bytes_after: bytes of their :class:`QuantizedLinear` arrays.
    frozen_bytes_before: bytes of the model's variables other than PEFT
      parameters (LoRA, adapter, (IA)^3, prompt, prefix), i.e. the frozen
      base of the PEFT splits.
    frozen_bytes_after: the same after quantization.
  """

  paths: tuple[str, ...]
  fmt: str
  block_size: int
  replaced_bytes_before: int
  replaced_bytes_after: int
  frozen_bytes_before: int
  frozen_bytes_after: int


_PEFT_PARAMS = (nnx.LoRAParam, AdapterParam, IA3Param, PromptParam,
                PrefixParam)


def _frozen_bytes(model: nnx.Module) -> int:
  return _tree_bytes(nnx.state(model, nnx.Not(nnx.Any(*_PEFT_PARAMS))))


def _linear_bytes(linear: nnx.Linear) -> int:
  bias = () if linear.bias is None else linear.bias[...]
  return _tree_bytes((linear.kernel[...], bias))


def quantize_base(
    model: nnx.Module,
    fmt: str = 'nf4',
    block_size: int = 64,
    *,
    targets: Sequence[str] | str = DEFAULT_TARGETS,
    **kwargs,
) -> QuantReport:
  """Replaces, in place, matching frozen ``nnx.Linear`` layers by :class:`QuantizedLinear`.

  A layer is replaced if it is an ``nnx.Linear`` whose kernel is a plain
  ``nnx.Param`` (never a PEFT parameter) and its path matches one of
  ``targets`` (see :func:`fedjax_fm.peft.surgery.path_matches`). Layers
  already wrapped (``LoRALinear``, ``AdapterLinear``, ``IA3Linear``) are
  reached through their ``base``, so LoRA can be applied before or after
  (``apply_lora`` first, then ``quantize_base``, works with every wrapper).
  The quantized kernels cannot be trained by any split method.

  Args:
    model: the model to modify.
    fmt: ``'int8'`` or ``'nf4'``.
    block_size: elements per block along the input axis.
    targets: names or regexes of the layers; the default
      :data:`DEFAULT_TARGETS` takes every projection inside ``layers.{i}``
      (attention and MLP) and leaves embeddings and output heads alone.
    **kwargs: passed to :func:`quantize_int8` / :func:`quantize_nf4` (e.g.
      ``double_quant=True``, ``scale_dtype=jnp.float16``).

  Returns:
    A :class:`QuantReport` (paths and bytes before/after).

  Raises:
    ValueError: for an unknown format, a bad block size, or if no layer
      matches (the message lists the candidate paths).
  """
  if fmt not in QUANTIZE_FORMATS:
    raise ValueError(f'fmt must be one of {QUANTIZE_FORMATS}, got {fmt!r}')
  _check_block_size(block_size, even=fmt == 'nf4')
  targets = normalize_patterns(targets, 'targets')
  candidates = [
      (tuple(path), mod) for path, mod in nnx.iter_modules(model)
      if isinstance(mod, nnx.Linear) and path
      and type(mod.kernel) is nnx.Param  # pylint: disable=unidiomatic-typecheck
  ]
  matched = [(p, m) for p, m in candidates
             if any(path_matches(p, t) for t in targets)]
  if not matched:
    available = ', '.join(dotted(p) for p, _ in candidates) or '(none)'
    raise ValueError(
        f'targets={targets!r} matched no frozen nnx.Linear layer. Available '
        f'paths: {available}')
  frozen_before = _frozen_bytes(model)
  before = after = 0
  for path, linear in matched:
    parent = model
    for key in path[:-1]:
      parent = get_child(parent, key)
    quantized = QuantizedLinear.from_linear(linear, fmt, block_size, **kwargs)
    before += _linear_bytes(linear)
    after += quantized.nbytes
    set_child(parent, path[-1], quantized)
  return QuantReport(
      paths=tuple(dotted(p) for p, _ in matched), fmt=fmt,
      block_size=block_size, replaced_bytes_before=before,
      replaced_bytes_after=after, frozen_bytes_before=frozen_before,
      frozen_bytes_after=_frozen_bytes(model))
