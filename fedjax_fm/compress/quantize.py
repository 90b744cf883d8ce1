"""Quantization: stochastic and deterministic uniform grids, QSGD, sign, TernGrad.

Each compressed leaf (a float tensor with at least ``min_size`` elements;
smaller leaves are sent raw) is flattened to ``n`` values and cut into ``nb``
blocks of ``B`` values (``block_size``; ``None``, or a tensor no longer than
``block_size``: one block for the whole tensor, ``B = n`` rounded up to a whole
word). The last block is padded (with
its last value for the min/max grids, else with zeros, which leave norms and
maxima unchanged). Every value becomes a ``bits``-bit code; the payload is a
:class:`QuantizedPayload`:

* ``words``: uint32 ``[nb, ceil(B * bits / 32)]``: the codes, bit-packed per
  block (:mod:`fedjax_fm.compress.bitpack`, planar layout);
* ``scales``: float32 ``[nb, c]``: per-block scale(s), ``c`` per scheme:

  ============================ ===== ==================== =======================
  scheme                       c     scales               value of code ``q``
  ============================ ===== ==================== =======================
  uniform (min/max grid)       2     ``lo, step``         ``lo + q * step``
  uniform symmetric            1     ``s = max|x|``       ``-s + q * 2s/(L-1)``
  qsgd (``levels`` = s_q)      1     ``||x||_2``          ``||x|| (q - s_q) / s_q``
  sign                         1     ``mean |x|``         ``mean|x| (2q - 1)``
  ternary                      1     ``max |x|``          ``max|x| (q - 1)``
  ============================ ===== ==================== =======================

with ``L = 2**bits`` levels. Wire bytes per leaf are
``4 * nb * (ceil(B * bits / 32) + c)``.

Stochastic rounding (``stochastic_uniform``, ``qsgd``, ``ternary``) is
unbiased: a value at fractional position ``t`` between two levels rounds up
with probability ``t - floor(t)``.

``stochastic_uniform`` can run as the fused Pallas kernel
``fedjax_fm_kernels.quantize_pack`` (``use_kernel``), in block mode when ``B``
is a multiple of ``32 // bits`` (and, on GPU, a power of two); both paths give
the same words, bit for bit, for the same key.

References:
  Alistarh et al. 2017, "QSGD: Communication-Efficient SGD via Gradient
  Quantization and Encoding", https://arxiv.org/abs/1610.02132.
  Wen et al. 2017, "TernGrad: Ternary Gradients to Reduce Communication in
  Distributed Deep Learning", https://arxiv.org/abs/1705.07878.
  Bernstein et al. 2018, "signSGD: Compressed Optimisation for Non-Convex
  Problems", https://arxiv.org/abs/1802.04434.
  Karimireddy et al. 2019, "Error Feedback Fixes SignSGD and other Gradient
  Compression Schemes", https://arxiv.org/abs/1901.09847 (scaled sign, mean |x|).
  Suresh et al. 2017, "Distributed Mean Estimation with Limited
  Communication", https://arxiv.org/abs/1611.00429 (stochastic uniform
  quantization between min and max).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_fm.compress import bitpack
from fedjax_fm.compress import leafwise
from fedjax_fm.compress.base import Compressor
from fedjax_fm.compress.leafwise import Payload

BITS = (1, 2, 4, 8)
SCHEMES = ('uniform', 'uniform_symmetric', 'deterministic', 'deterministic_symmetric', 'qsgd',
           'sign', 'ternary')
_NUM_SCALES = {'uniform': 2, 'uniform_symmetric': 1, 'deterministic': 2,
               'deterministic_symmetric': 1, 'qsgd': 1, 'sign': 1, 'ternary': 1}
_EDGE_PAD = ('uniform', 'deterministic')   # min/max grids: pad with the last value


@leafwise.payload_node
class QuantizedPayload(Payload):
  """Bit-packed codes ``words[nb, W]`` and per-block ``scales[nb, c]``; see module doc."""
  words: Any
  scales: Any
  shape: tuple = leafwise.static_field()
  dtype: Any = leafwise.static_field()
  scheme: str = leafwise.static_field()
  bits: int = leafwise.static_field()
  levels: int = leafwise.static_field()   # QSGD's s; 0 for the other schemes
  block: int = leafwise.static_field()    # B, the block length after padding


def _block_length(n: int, bits: int, block_size) -> int:
  # A tensor no longer than one block is one block of its own length (rounded up
  # to a whole word), not a block padded out to ``block_size``.
  per_word = 32 // bits
  whole = -(-n // per_word) * per_word
  if block_size is None:
    return whole
  return min(int(block_size), whole)


def _check_block_size(block_size):
  if block_size is not None and (isinstance(block_size, bool) or
                                 not isinstance(block_size, (int, np.integer)) or
                                 block_size < 1):
    raise ValueError(f'block_size must be None (one block per tensor) or an int >= 1, '
                     f'got {block_size!r}')
  return None if block_size is None else int(block_size)


def _check_bits(bits, allowed=BITS):
  if isinstance(bits, bool) or bits not in allowed:
    raise ValueError(f'bits must be one of {allowed}, got {bits!r}')
  return int(bits)


# ---------------------------------------------------------------------- the schemes
# Every function sees rows[nb, B] float32. The uniform formulas are the same as
# in fedjax_fm_kernels.quantize_pack, so the kernel and jnp paths agree exactly.


def _grid(rows, levels, symmetric):
  if symmetric:
    s = jnp.max(jnp.abs(rows), axis=1)
    return -s, (2.0 * s) / (levels - 1), (s,)
  lo = jnp.min(rows, axis=1)
  hi = jnp.max(rows, axis=1)
  step = (hi - lo) / (levels - 1)
  return lo, step, (lo, step)


def _position(rows, offset, step):
  positive = step > 0
  return jnp.where(positive, (rows - offset) / jnp.where(positive, step, 1.0), 0.0)


def _stochastic_round(t, u):
  fl = jnp.floor(t)
  return fl + (u < (t - fl)).astype(jnp.float32)


def _encode_rows(scheme, rows, u, counts, bits, levels):
  """-> (codes uint32 [nb, B], scales float32 [nb, c])."""
  num = 1 << bits
  if scheme in ('uniform', 'uniform_symmetric', 'deterministic', 'deterministic_symmetric'):
    offset, step, scales = _grid(rows, num, scheme.endswith('symmetric'))
    t = _position(rows, offset[:, None], step[:, None])
    q = _stochastic_round(t, u) if scheme.startswith('uniform') else jnp.round(t)
    codes = jnp.clip(q, 0.0, num - 1.0)
    return codes.astype(jnp.uint32), jnp.stack(scales, axis=1)
  if scheme == 'qsgd':
    norm = jnp.sqrt(jnp.sum(rows * rows, axis=1))
    t = _position(jnp.abs(rows), 0.0, (norm / levels)[:, None])
    mag = jnp.clip(_stochastic_round(t, u), 0.0, float(levels))
    codes = jnp.where(rows >= 0, levels + mag, levels - mag)
    return codes.astype(jnp.uint32), norm[:, None]
  if scheme == 'sign':
    mean_abs = jnp.sum(jnp.abs(rows), axis=1) / counts
    return (rows >= 0).astype(jnp.uint32), mean_abs[:, None]
  if scheme == 'ternary':
    s = jnp.max(jnp.abs(rows), axis=1)
    keep = u < _position(jnp.abs(rows), 0.0, s[:, None])
    codes = jnp.where(keep, jnp.where(rows > 0, 2, 0), 1)
    return codes.astype(jnp.uint32), s[:, None]
  raise ValueError(f'scheme must be one of {SCHEMES}, got {scheme!r}')


def _decode_rows(scheme, codes, scales, bits, levels):
  q = codes.astype(jnp.float32)
  num = 1 << bits
  if scheme in ('uniform', 'deterministic'):
    return scales[:, :1] + q * scales[:, 1:2]
  if scheme in ('uniform_symmetric', 'deterministic_symmetric'):
    s = scales[:, :1]
    return -s + q * ((2.0 * s) / (num - 1))
  if scheme == 'qsgd':
    return scales[:, :1] * ((q - levels) / levels)
  if scheme == 'sign':
    return scales[:, :1] * (2.0 * q - 1.0)
  if scheme == 'ternary':
    return scales[:, :1] * (q - 1.0)
  raise ValueError(f'scheme must be one of {SCHEMES}, got {scheme!r}')


def _kernel_fits(b: int, bits: int, interpret: bool) -> bool:
  if b % (32 // bits):
    return False
  if not interpret and jax.default_backend() == 'gpu':
    return b & (b - 1) == 0          # Triton blocks: powers of two
  return True


def _quantizer(scheme: str, bits: int, *, levels: int = 0, block_size=None,
               min_size: int = leafwise.DEFAULT_MIN_SIZE, use_kernel=None) -> Compressor:
  stochastic = scheme in ('uniform', 'uniform_symmetric', 'qsgd', 'ternary')

  def encode(key, x, state):
    flat = x.reshape(-1).astype(jnp.float32)
    n = flat.shape[0]
    b = _block_length(n, bits, block_size)
    nb = -(-n // b)
    pad = nb * b - n
    mode = 'edge' if scheme in _EDGE_PAD else 'constant'
    rows = (jnp.pad(flat, (0, pad), mode=mode) if pad else flat).reshape(nb, b)
    u = jax.random.uniform(key, (nb, b), jnp.float32) if stochastic else None
    counts = jnp.minimum(b, n - b * jnp.arange(nb)).astype(jnp.float32)
    words = None
    if scheme in ('uniform', 'uniform_symmetric') and block_size is not None:
      use, interpret = leafwise.kernel_mode(use_kernel)
      if use and _kernel_fits(b, bits, interpret):
        import fedjax_fm_kernels  # pylint: disable=g-import-not-at-top
        words, scales = fedjax_fm_kernels.quantize_pack(rows, u, bits=bits,
                                             symmetric=scheme == 'uniform_symmetric',
                                             interpret=interpret)
    if words is None:
      codes, scales = _encode_rows(scheme, rows, u, counts, bits, levels)
      words = bitpack.pack_bits(codes, bits)
    payload = QuantizedPayload(words, scales, tuple(x.shape), np.dtype(x.dtype), scheme, bits,
                               levels, b)
    return payload, state

  def decode(p: QuantizedPayload):
    codes = bitpack.unpack_bits(p.words, p.bits, p.block)
    rows = _decode_rows(p.scheme, codes, p.scales, p.bits, p.levels)
    n = leafwise.size_of(p.shape)
    return rows.reshape(-1)[:n].reshape(p.shape).astype(p.dtype)

  codec = leafwise.LeafCodec(leafwise.takes_float(min_size), None, encode, decode)
  return leafwise.leafwise(codec)


def _common(block_size, min_size, use_kernel=None):
  leafwise.check_use_kernel(use_kernel)
  return _check_block_size(block_size), leafwise.check_min_size(min_size)


# ------------------------------------------------------------------ the factories


def stochastic_uniform(bits: int, *, block_size=None, symmetric: bool = False,
                       min_size: int = leafwise.DEFAULT_MIN_SIZE, use_kernel=None) -> Compressor:
  """Unbiased stochastic rounding to ``2**bits`` evenly spaced levels per block.

  The grid spans ``[min, max]`` of the block, or ``[-s, s]`` with
  ``s = max |x|`` when ``symmetric``. With spacing ``delta`` the per-element
  variance is at most ``delta**2 / 4``.

  Args:
    bits: one of ``(1, 2, 4, 8)``.
    block_size: values per scale; ``None``: one scale per tensor.
    symmetric: ``[-s, s]`` grid (1 scale per block) instead of ``[min, max]`` (2).
    min_size: leaves with fewer elements are sent raw.
    use_kernel: Pallas kernel switch (block mode only); see
      ``leafwise.kernel_mode``.

  Returns:
    A :class:`Compressor` with a :class:`QuantizedPayload` per compressed leaf.
  """
  bits = _check_bits(bits)
  block_size, min_size = _common(block_size, min_size, use_kernel)
  return _quantizer('uniform_symmetric' if symmetric else 'uniform', bits,
                    block_size=block_size, min_size=min_size, use_kernel=use_kernel)


def deterministic(bits: int, *, block_size=None, symmetric: bool = False,
                  min_size: int = leafwise.DEFAULT_MIN_SIZE) -> Compressor:
  """Round to the nearest of ``2**bits`` evenly spaced levels per block (biased).

  Same grid and payload as :func:`stochastic_uniform`; error at most
  ``delta / 2`` per element. Values already on the grid come back exactly.
  """
  bits = _check_bits(bits)
  block_size, min_size = _common(block_size, min_size)
  return _quantizer('deterministic_symmetric' if symmetric else 'deterministic', bits,
                    block_size=block_size, min_size=min_size)


def _qsgd_levels(bits, levels):
  bits = _check_bits(bits, (2, 4, 8))
  if levels is None:
    levels = (1 << (bits - 1)) - 1
  if isinstance(levels, bool) or not isinstance(levels, (int, np.integer)) or levels < 1:
    raise ValueError(f'levels must be an int >= 1, got {levels!r}')
  if 2 * levels + 1 > (1 << bits):
    raise ValueError(f'levels={levels} needs 2 * levels + 1 = {2 * levels + 1} codes, more '
                     f'than bits={bits} holds ({1 << bits}); raise bits or lower levels')
  return bits, int(levels)


def qsgd(bits: int = 4, *, levels=None, block_size=None,
         min_size: int = leafwise.DEFAULT_MIN_SIZE) -> Compressor:
  """QSGD (Alistarh et al. 2017): norm, sign and a stochastic level of ``|x| / ||x||``.

  Each value is ``||x|| sign(x_i) l_i / s`` with ``l_i`` in ``{0..s}`` rounded
  stochastically (unbiased); the signed level is one ``bits``-bit code in
  ``[0, 2s]``. Per block (the paper's buckets) of ``d`` values,
  ``E||Q(x) - x||^2 <= min(d / s^2, sqrt(d) / s) ||x||^2``.

  Args:
    bits: code width, one of ``(2, 4, 8)``.
    levels: ``s``; default ``2**(bits-1) - 1`` (the most that fit).
    block_size: bucket size; ``None``: one norm per tensor.
    min_size: leaves with fewer elements are sent raw.

  Returns:
    A :class:`Compressor` with a :class:`QuantizedPayload` per compressed leaf.
  """
  bits, levels = _qsgd_levels(bits, levels)
  block_size, min_size = _common(block_size, min_size)
  return _quantizer('qsgd', bits, levels=levels, block_size=block_size, min_size=min_size)


def sign(*, block_size=None, min_size: int = leafwise.DEFAULT_MIN_SIZE) -> Compressor:
  """Scaled sign (EF-signSGD): 1 bit per value and ``mean |x|`` per tensor (or block).

  Decodes to ``mean|x| * sign(x)`` (``sign(0) = +1``); biased, meant for
  :func:`~fedjax_fm.compress.error_feedback.error_feedback` (Karimireddy et al. 2019).
  """
  block_size, min_size = _common(block_size, min_size)
  return _quantizer('sign', 1, block_size=block_size, min_size=min_size)


def ternary(*, block_size=None, min_size: int = leafwise.DEFAULT_MIN_SIZE) -> Compressor:
  """TernGrad (Wen et al. 2017): ``s * sign(x_i) * b_i``, ``b_i ~ Bernoulli(|x_i| / s)``.

  ``s = max |x|`` per tensor (or block); 2-bit codes; unbiased, with
  per-element variance ``s |x_i| - x_i^2``.
  """
  block_size, min_size = _common(block_size, min_size)
  return _quantizer('ternary', 2, block_size=block_size, min_size=min_size)


# --------------------------------------------------------------- payload formulas


def _spec(scheme, bits, shape, dtype, block_size, min_size):
  if not leafwise.takes_float(min_size)(tuple(shape), dtype):
    return leafwise.raw_spec(shape, dtype)
  n = leafwise.size_of(shape)
  b = _block_length(n, bits, _check_block_size(block_size))
  nb = -(-n // b)
  return [((nb, bitpack.num_words(b, bits)), np.dtype(np.uint32)),
          ((nb, _NUM_SCALES[scheme]), np.dtype(np.float32))]


def stochastic_uniform_spec(shape, dtype, bits, *, block_size=None, symmetric=False,
                            min_size=leafwise.DEFAULT_MIN_SIZE, **unused):
  """Payload arrays of one leaf under :func:`stochastic_uniform`."""
  del unused
  return _spec('uniform_symmetric' if symmetric else 'uniform', _check_bits(bits), shape, dtype,
               block_size, min_size)


def deterministic_spec(shape, dtype, bits, *, block_size=None, symmetric=False,
                       min_size=leafwise.DEFAULT_MIN_SIZE, **unused):
  """Payload arrays of one leaf under :func:`deterministic`."""
  del unused
  return _spec('deterministic_symmetric' if symmetric else 'deterministic', _check_bits(bits),
               shape, dtype, block_size, min_size)


def qsgd_spec(shape, dtype, bits=4, *, levels=None, block_size=None,
              min_size=leafwise.DEFAULT_MIN_SIZE, **unused):
  """Payload arrays of one leaf under :func:`qsgd`."""
  del unused
  bits, _ = _qsgd_levels(bits, levels)
  return _spec('qsgd', bits, shape, dtype, block_size, min_size)


def sign_spec(shape, dtype, *, block_size=None, min_size=leafwise.DEFAULT_MIN_SIZE, **unused):
  """Payload arrays of one leaf under :func:`sign`."""
  del unused
  return _spec('sign', 1, shape, dtype, block_size, min_size)


def ternary_spec(shape, dtype, *, block_size=None, min_size=leafwise.DEFAULT_MIN_SIZE,
                 **unused):
  """Payload arrays of one leaf under :func:`ternary`."""
  del unused
  return _spec('ternary', 2, shape, dtype, block_size, min_size)
