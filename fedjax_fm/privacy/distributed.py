"""Distributed DP under secure aggregation: the distributed Skellam mechanism.

With DP-FedAvg's Gaussian mechanism (`fedjax_fm.privacy.gaussian_dp`) the server
sees the clipped updates and adds the noise itself, so it must be trusted. Here
every client adds its own share of *integer* noise to an *integer* encoding of
its update and sends it masked through secure aggregation in ``Z / 2^b``: the
server only learns the modular sum, which already carries the full noise
(Kairouz, Liu, Steinke 2021; Agarwal, Kairouz, Liu 2021). The noise is Skellam,
``Sk(mu) = Poisson(mu / 2) - Poisson(mu / 2)`` (variance ``mu``), which is
closed under summation: ``n`` clients adding ``Sk(mu / n)`` give exactly
``Sk(mu)`` on the sum.

Per client (jitted, vmappable; `quantize` and `encode`):

1. clip the update to L2 norm ``C`` and flatten it to ``d`` float32 values;
2. zero-pad to ``d_pad = 2^ceil(log2 d)`` and rotate: ``y = H D x / sqrt(d_pad)``
   with ``D`` random signs from the round's *shared* key and ``H`` the Sylvester
   Hadamard matrix, applied by a fast Walsh-Hadamard transform (`fwht`,
   ``O(d log d)``). The rotation spreads the mass evenly over the coordinates, so
   a coordinate of ``gamma y`` is of order ``gamma C / sqrt(d_pad)``;
3. scale by ``gamma`` and round each coordinate to ``floor`` or ``ceil`` at random,
   unbiasedly (`conditional_round`), re-drawing until the rounded vector's norm is
   within the bound ``B`` (below). After ``max_tries`` failed draws the client
   sends the zero vector (the fallback: it still has norm <= ``B``, so the
   sensitivity holds, and the round reports it as ``dp_rounding_fallbacks``);
4. add ``Sk(mu_local)`` to every coordinate (`skellam_noise`);
5. wrap into ``Z / 2^b`` (`wrap`; ``uint32`` words holding ``b``-bit values).

The server sums the masked vectors mod ``2^b`` (`fedjax_fm.privacy.secure_agg`
masks, fresh every round), maps the sum back to centred integers (`unwrap`),
divides by ``gamma``, rotates back (`unrotate`), drops the padding and divides
by the *fixed* denominator ``n`` (the expected clients per round, as in
DP-FedAvg), giving the DP mean (`decode_sum`, `secure_dp_mean`).

The rounded-norm bound (Kairouz et al. 2021, Section 4.1 / Theorem 1): a vector
``x`` with ``||x|| <= c`` rounded coordinate-wise at random has
``||round(x)|| <= c + sqrt(d)`` always, and, with probability >= ``1 - beta``,
``||round(x)||^2 <= c^2 + d/4 + sqrt(2 log(1/beta)) (c + sqrt(d)/2)``. The bound is
``B = c + sqrt(d)`` for ``beta = 0`` (plain randomized rounding, never re-drawn)
and the smaller of the two for ``beta > 0``, with
``c = gamma C (1 + 1e-5)`` (leeway for float32 rounding of the clip and the
rotation). Since every vector a client sends passes the check (or is zero),
``B`` bounds the L2 sensitivity of the integer sum per client, and because the
rounded vector is an integer vector, ``||round(x)||_1 <= min(B^2, sqrt(d_pad) B)``
bounds its L1 norm. `fedjax_fm.privacy.accounting` turns these into the Skellam
RDP bound of Agarwal et al. 2021. The check is exact: the squared norm of the
integer vector is summed in 64-bit integer arithmetic (`squared_norm`).

Choosing ``gamma`` (`skellam_params`): the aggregate of ``n`` clients must stay in
``[-2^(b-1), 2^(b-1))`` with high probability, else it wraps. Treating a
coordinate of the sum as sub-Gaussian with variance at most
``gamma^2 (n^2 C^2 / d_pad + z^2 C^2) + n / 4`` (all clients aligned, the noise,
the rounding), ``k`` standard deviations (``k`` for the two-sided tail
``modclip_prob``, 1e-4 by default) must fit in ``2^(b-1)``. ``gamma`` is capped so
that (a) ``gamma C <= 2^22`` (integers stay exact in float32) and (b) each Poisson
mean is at most ``2^22``. The noise multiplier ``z`` is that of DP-FedAvg: the
noise on the sum has standard deviation ``z C`` in the units of the updates,
i.e. ``mu = (gamma z C)^2`` in integer units, ``mu_local = mu / n`` per client.

Noise sampling: `jax.random.poisson` computes its transformed-rejection sampler
in float32, whose log-probabilities lose their integer part for large means
(from a mean of about 1e5 its samples fail a chi-square test against the
Poisson distribution). `poisson` uses it for means below 10 and otherwise the
same algorithm (Hoermann 1993) with the proposal offset from ``floor(lam)`` and
the log-probability computed around the mean (`_poisson_log_pmf`), within 3e-5
of scipy's over +-6 standard deviations up to a mean of 4e6. Like every
floating-point sampler it is not exact, which the privacy analysis (of exact
Skellam noise) does not cover.

Trust model (of the simulation): clients are honest; a client whose update is
not finite sends a zero update with its noise share, so the noise on the sum is
that of all sampled clients. Secure aggregation is simulated
(`fedjax_fm.privacy.secure_agg`). The pure functions below are usable from plain
JAX; `skellam_dp` packages them for `fedjax_fm.engine.build_round`.

References:
  * Kairouz, Liu, Steinke 2021, "The Distributed Discrete Gaussian Mechanism for
    Federated Learning with Secure Aggregation", https://arxiv.org/abs/2102.06387
  * Agarwal, Kairouz, Liu 2021, "The Skellam Mechanism for Differentially
    Private Federated Learning", https://arxiv.org/abs/2110.04995
  * Hoermann 1993, "The transformed rejection method for generating Poisson
    random variables", Insurance: Mathematics and Economics 12(1).
"""

from __future__ import annotations

import math
import statistics
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_fm.aggregate import base as aggregate_base
from fedjax_fm.privacy import clipping
from fedjax_fm.privacy import dp_fedavg
from fedjax_fm.privacy import secure_agg

BITS = tuple(range(8, 25))          # allowed b: 2^(b-1) is exact in float32
DEFAULT_BITS = 16
DEFAULT_BETA = math.exp(-0.5)       # Kairouz et al.'s recommended beta
DEFAULT_MODCLIP_PROB = 1e-4         # target probability of a wrapped coordinate
DEFAULT_MAX_TRIES = 100
MAX_SCALED_NORM = 2.0 ** 22         # gamma * C: integer coordinates exact in float32
MAX_POISSON_MEAN = 2.0 ** 22        # each Poisson's mean (the samples stay < 2^23)
NORM_LEEWAY = 1e-5                  # float32 leeway on ||gamma R x|| <= gamma C

_ROTATION_STREAM = 1
_MASK_STREAM = 2
_ROUND_STREAM = 1
_NOISE_STREAM = 2


# --------------------------------------------------------------------- rotation

def padded_dim(dim: int) -> int:
  """``2^ceil(log2 dim)``: the length of the rotated vector (``dim >= 1``)."""
  if int(dim) != dim or dim < 1:
    raise ValueError(f'dim must be a positive integer; got {dim!r}.')
  return 1 << (int(dim) - 1).bit_length()


def fwht(x: jax.Array) -> jax.Array:
  """Orthonormal fast Walsh-Hadamard transform over the last axis.

  Returns ``x @ H / sqrt(n)`` with ``H`` the Sylvester Hadamard matrix of order
  ``n`` (``H[i, j] = (-1)^popcount(i & j)``), in ``O(n log n)``: ``log2 n``
  identical butterfly stages ``y -> [y[0::2] + y[1::2], y[0::2] - y[1::2]]``
  (the constant-geometry form, one ``lax.fori_loop``; ``log2 n`` of them give
  ``H``). The transform is symmetric and orthogonal, hence its own inverse.

  Args:
    x: float array ``[..., n]`` with ``n`` a power of two.

  Returns:
    float32 array of the same shape.
  """
  x = jnp.asarray(x, jnp.float32)
  n = x.shape[-1]
  if n < 1 or n & (n - 1):
    raise ValueError(f'the last axis must be a power of two; got {n}.')

  def stage(_, y):
    pairs = y.reshape(y.shape[:-1] + (n // 2, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    return jnp.concatenate([a + b, a - b], axis=-1)

  if n > 1:
    x = jax.lax.fori_loop(0, n.bit_length() - 1, stage, x)
  return x * np.float32(1.0 / math.sqrt(n))


def rotation_signs(key: jax.Array, n: int) -> jax.Array:
  """The diagonal of ``D``: ``n`` independent uniform signs (float32 +-1)."""
  return jnp.where(jax.random.bernoulli(key, 0.5, (n,)), 1.0, -1.0).astype(jnp.float32)


def rotate(x: jax.Array, key: jax.Array) -> jax.Array:
  """Randomized Hadamard rotation ``H D x / sqrt(n)`` over the last axis.

  Args:
    x: float ``[..., n]``, ``n`` a power of two.
    key: the shared key of the signs ``D`` (the same for every client of a round
      and for the server's `unrotate`).

  Returns:
    float32 ``[..., n]``; ``||rotate(x)|| = ||x||``.
  """
  x = jnp.asarray(x, jnp.float32)
  return fwht(x * rotation_signs(key, x.shape[-1]))


def unrotate(y: jax.Array, key: jax.Array) -> jax.Array:
  """Inverse of `rotate` with the same key: ``D H y / sqrt(n)``."""
  y = jnp.asarray(y, jnp.float32)
  return fwht(y) * rotation_signs(key, y.shape[-1])


# --------------------------------------------------------------------- rounding

def _square_u64(v):
  """``v^2`` as ``(hi, lo)`` uint32 words of a 64-bit integer, for int32 ``|v| < 2^23``."""
  a = jnp.abs(v).astype(jnp.uint32)
  h, l = a >> 16, a & jnp.uint32(0xFFFF)          # a = h 2^16 + l, h < 2^7
  ll = l * l                                      # < 2^32
  m = jnp.uint32(2) * h * l                       # < 2^24
  lo = ll + ((m & jnp.uint32(0xFFFF)) << 16)
  hi = h * h + (m >> 16) + (lo < ll).astype(jnp.uint32)
  return hi, lo


def _add_u64(a, b):
  (a_hi, a_lo), (b_hi, b_lo) = a, b
  lo = a_lo + b_lo
  return a_hi + b_hi + (lo < a_lo).astype(jnp.uint32), lo


def squared_norm(v: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Exact ``sum(v^2)`` over the last axis as ``(hi, lo)`` uint32 words.

  64-bit integer arithmetic on pairs of uint32 words (JAX's default has no
  64-bit integers); the addition with carry is exactly associative, so the
  reduction is exact in any order. `conditional_round`'s norm check is
  therefore exact, not a float32 approximation.

  Args:
    v: int32 ``[..., n]`` with ``|v| < 2^23`` and ``sum(v^2) < 2^64``.

  Returns:
    ``(hi, lo)``: ``sum(v^2) = hi * 2^32 + lo``.
  """
  v = jnp.asarray(v, jnp.int32)
  hi, lo = _square_u64(v)
  return jax.lax.reduce((hi, lo), (jnp.uint32(0), jnp.uint32(0)), _add_u64,
                        (v.ndim - 1,))


def _at_most(hi, lo, threshold: int):
  """``hi * 2^32 + lo <= threshold`` for a Python integer ``0 <= threshold < 2^64``."""
  t_hi, t_lo = jnp.uint32(threshold >> 32), jnp.uint32(threshold & 0xFFFFFFFF)
  return (hi < t_hi) | ((hi == t_hi) & (lo <= t_lo))


def rounded_norm_bound(scaled_norm: float, dim: int, beta: float) -> float:
  """``B``: the L2 bound on a randomly rounded vector of norm <= ``scaled_norm``.

  ``min(c + sqrt(d), sqrt(c^2 + d/4 + sqrt(2 log(1/beta)) (c + sqrt(d)/2)))``, the
  second term only for ``beta > 0`` (Kairouz et al. 2021, Section 4.1).

  Args:
    scaled_norm: ``c``, the norm bound of the vector before rounding (integer
      units).
    dim: ``d``, its length.
    beta: in ``[0, 1)``; larger means a tighter bound and more re-draws.

  Returns:
    ``B`` (float).
  """
  if not 0.0 <= beta < 1.0:
    raise ValueError(f'beta must be in [0, 1); got {beta!r}.')
  c, sd = float(scaled_norm), math.sqrt(dim)
  bound = c + sd
  if beta > 0:
    sq = c * c + dim / 4.0 + math.sqrt(2.0 * math.log(1.0 / beta)) * (c + sd / 2.0)
    bound = min(bound, math.sqrt(sq))
  return bound


def conditional_round(key: jax.Array, x: jax.Array, bound: float,
                      max_tries: int = DEFAULT_MAX_TRIES
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Randomized rounding of ``x [n]`` to integers, re-drawn until its norm fits.

  Each try rounds every coordinate up with probability equal to its fractional
  part (``floor(x + U[0, 1))``: unbiased) with key ``fold_in(key, try)``, and
  accepts when ``||rounded||^2 <= floor(bound^2)``, checked exactly in integer
  arithmetic (`squared_norm`). A ``lax.while_loop`` stops at the first accepted
  try or after ``max_tries``; then the result is the zero vector (the fallback:
  norm 0, within any bound). Conditioning on acceptance biases the result only
  when the bound rejects often; with `rounded_norm_bound`'s bound a try is
  rejected with probability at most ``beta``.

  Args:
    key: PRNG key (per client).
    x: float ``[n]`` (already scaled; ``|x_i| < 2^22``).
    bound: the L2 bound ``B`` of the accepted vectors (``B^2 < 2^64``).
    max_tries: the most draws (>= 1).

  Returns:
    ``(rounded int32 [n], tries int32, accepted bool)``.
  """
  x = jnp.asarray(x, jnp.float32)
  if int(max_tries) != max_tries or max_tries < 1:
    raise ValueError(f'max_tries must be a positive integer; got {max_tries!r}.')
  if not 0 <= bound < 2.0 ** 32:
    raise ValueError(f'bound must be in [0, 2^32); got {bound!r}.')
  threshold = math.floor(float(bound) ** 2)
  base = jnp.floor(x)
  frac = x - base

  def draw(i):
    up = jax.random.uniform(jax.random.fold_in(key, i), x.shape, jnp.float32) < frac
    return (base + up.astype(jnp.float32)).astype(jnp.int32)

  def cond(state):
    tries, ok, _ = state
    return (~ok) & (tries < max_tries)

  def body(state):
    tries, _, _ = state
    r = draw(tries)
    return tries + 1, _at_most(*squared_norm(r), threshold), r

  tries, ok, r = jax.lax.while_loop(
      cond, body, (jnp.int32(0), jnp.asarray(False), jnp.zeros(x.shape, jnp.int32)))
  return jnp.where(ok, r, 0), tries, ok


# ------------------------------------------------------------------------ noise

def _poisson_log_pmf(k, lam, lam_int, lam_frac):
  """log P(k) for Poisson(lam), accurate in float32 for k, lam < 2^24.

  With ``t = (k - lam) / lam`` and Stirling's series for ``log k!``:
  ``log P(k) = -lam g(t) - log(2 pi k) / 2 - corr(k)``, ``g(t) = (1 + t) log1p(t) - t``
  (by its Taylor series for ``|t| < 0.1``), so no term is of the size of ``lam``.
  """
  delta = (k - lam_int) - lam_frac                        # k - lam, exactly
  t = delta / lam
  series = t * t * (1 / 2 - t * (1 / 6 - t * (1 / 12 - t * (1 / 20 - t * (
      1 / 30 - t * (1 / 42 - t * (1 / 56 - t / 72)))))))
  g = jnp.where(jnp.abs(t) < 0.1, series, (1.0 + t) * jnp.log1p(jnp.maximum(t, -1.0)) - t)
  kk = jnp.maximum(k, 1.0)
  inv = 1.0 / kk
  corr = inv * (1.0 / 12.0 - inv * inv * (1.0 / 360.0 - inv * inv / 1260.0))
  around_mean = -lam * g - 0.5 * jnp.log(2.0 * math.pi * kk) - corr
  direct = -lam + k * np.float32(math.log(lam)) - jax.lax.lgamma(k + 1.0)
  return jnp.where(k < 10.0, direct, around_mean)


def _poisson_ptrs(key, lam: float, shape):
  """Hoermann's transformed rejection (PTRS) for a static mean ``lam >= 10``."""
  lam_int = float(math.floor(lam))
  lam_frac = np.float32(lam - lam_int)
  lam_int = np.float32(lam_int)
  lam32 = np.float32(lam)
  b = 0.931 + 2.53 * math.sqrt(lam)
  a = -0.059 + 0.02483 * b
  inv_alpha = 1.1239 + 1.1328 / (b - 3.4)
  v_r = 0.9277 - 3.6224 / (b - 2.0)

  def body(state):
    out, done, key = state
    key, ku, kv = jax.random.split(key, 3)
    u = jax.random.uniform(ku, shape, jnp.float32) - 0.5
    v = jax.random.uniform(kv, shape, jnp.float32)
    us = 0.5 - jnp.abs(u)
    w = (2.0 * a / us + b) * u + 0.43
    k = lam_int + jnp.floor(w + lam_frac)
    squeeze = (us >= 0.07) & (v <= v_r)
    reject = (k < 0) | ((us < 0.013) & (v > us))
    s = jnp.log(v * inv_alpha / (a / (us * us) + b))
    accept = squeeze | (~reject & (s <= _poisson_log_pmf(k, lam32, lam_int, lam_frac)))
    take = accept & ~done
    return jnp.where(take, k, out), done | accept, key

  out, _, _ = jax.lax.while_loop(
      lambda state: ~jnp.all(state[1]), body,
      (jnp.zeros(shape, jnp.float32), jnp.zeros(shape, bool), key))
  return out.astype(jnp.int32)


def poisson(key: jax.Array, lam: float, shape) -> jax.Array:
  """Poisson(``lam``) samples (int32) for a static mean ``0 <= lam <= 2^22``.

  Means below 10 use `jax.random.poisson` (Knuth's product of uniforms); larger
  ones Hoermann's PTRS with the log-probability computed around the mean (see
  the module docstring). The loop runs until every entry is accepted
  (acceptance probability above 0.85 per try for ``lam >= 10``).

  Args:
    key: PRNG key.
    lam: the mean (a Python number).
    shape: output shape.

  Returns:
    int32 array of ``shape``.
  """
  lam = float(lam)
  if not 0.0 <= lam <= MAX_POISSON_MEAN:
    raise ValueError(f'lam must be in [0, 2^22]; got {lam!r}.')
  shape = tuple(shape)
  if lam == 0.0:
    return jnp.zeros(shape, jnp.int32)
  if lam < 10.0:
    return jax.random.poisson(key, lam, shape, jnp.int32)
  return _poisson_ptrs(key, lam, shape)


def skellam_noise(key: jax.Array, shape, variance: float) -> jax.Array:
  """Symmetric Skellam noise ``Poisson(variance/2) - Poisson(variance/2)`` (int32).

  Mean 0, variance ``variance``; the sum of independent draws with variances
  ``v_i`` is Skellam with variance ``sum_i v_i``.

  Args:
    key: PRNG key.
    shape: output shape.
    variance: ``mu >= 0`` (a Python number; ``mu / 2 <= 2^22``).
  """
  pair = poisson(key, variance / 2.0, (2,) + tuple(shape))
  return pair[0] - pair[1]


# --------------------------------------------------------------- modular domain

def _check_bits(bits):
  if int(bits) != bits or not 1 <= bits <= 31:
    raise ValueError(f'bits must be an integer in [1, 31]; got {bits!r}.')
  return int(bits)


def wrap(ints: jax.Array, bits: int) -> jax.Array:
  """Integers (int32) to ``Z / 2^bits``: ``ints mod 2^bits`` as uint32 words."""
  bits = _check_bits(bits)
  words = jax.lax.bitcast_convert_type(jnp.asarray(ints, jnp.int32), jnp.uint32)
  return words & jnp.uint32((1 << bits) - 1)


def unwrap(words: jax.Array, bits: int) -> jax.Array:
  """``Z / 2^bits`` to centred integers in ``[-2^(bits-1), 2^(bits-1))`` (int32).

  Inverse of `wrap` for values in that range; applied to a modular sum it gives
  the integer sum exactly when the sum did not overflow the range.
  """
  bits = _check_bits(bits)
  v = (jnp.asarray(words, jnp.uint32) & jnp.uint32((1 << bits) - 1)).astype(jnp.int32)
  return jnp.where(v >= (1 << (bits - 1)), v - (1 << bits), v)


# ------------------------------------------------------------------ parameters

class SkellamParams(NamedTuple):
  """Static parameters of the distributed Skellam mechanism (`skellam_params`).

  Integer units are those of the scaled, rounded vectors.
  """
  dim: int                 # d: coordinates of the update
  padded_dim: int          # d_pad = 2^ceil(log2 d): the payload has d_pad words
  bits: int                # b: secure aggregation in Z / 2^b
  clip_norm: float         # C
  noise_multiplier: float  # z: noise std on the sum is z C (update units)
  expected_clients: int    # n: noise shares and the fixed denominator
  beta: float              # conditional rounding parameter
  scale: float             # gamma
  local_variance: float    # mu / n: each client's Skellam variance (integer units)
  norm_bound: float        # B: L2 bound of one client's rounded vector (integer units)
  l1_bound: float          # min(B^2, sqrt(d_pad) B)
  max_tries: int           # conditional rounding draws before the zero fallback
  k_stddevs: float         # standard deviations of the aggregate fitted in 2^(b-1)

  @property
  def variance(self) -> float:
    """``mu``: the Skellam variance of the noise on the sum (integer units)."""
    return self.local_variance * self.expected_clients

  @property
  def payload_bits(self) -> int:
    """Wire bits per client: ``d_pad * b``."""
    return self.padded_dim * self.bits

  @property
  def quantization_inflation(self) -> float:
    """``B / (gamma C)``: how much rounding inflates the L2 sensitivity."""
    return self.norm_bound / (self.scale * self.clip_norm)


def k_stddevs_for(modclip_prob: float) -> float:
  """Standard deviations of a normal variable outside which lies ``modclip_prob``."""
  if not 0.0 < modclip_prob < 1.0:
    raise ValueError(f'modclip_prob must be in (0, 1); got {modclip_prob!r}.')
  return statistics.NormalDist().inv_cdf(1.0 - modclip_prob / 2.0)


def min_bits(expected_clients: int, modclip_prob: float = DEFAULT_MODCLIP_PROB) -> int:
  """Smallest ``b`` leaving room for the signal: ``4^(b-1) > k^2 n / 4``.

  Below it the rounding variance of ``n`` clients alone fills the range.
  """
  k = k_stddevs_for(modclip_prob)
  b = 1
  while 4.0 ** (b - 1) / k ** 2 <= expected_clients / 4.0:
    b += 1
  return b


def skellam_params(dim: int, clip_norm: float, noise_multiplier: float,
                   expected_clients: int, bits: int = DEFAULT_BITS, *,
                   beta: float = DEFAULT_BETA,
                   modclip_prob: float = DEFAULT_MODCLIP_PROB,
                   max_tries: int = DEFAULT_MAX_TRIES) -> SkellamParams:
  """Chooses ``gamma`` and derives the sensitivities (see the module docstring).

  Args:
    dim: ``d``, coordinates of the (trainable) update.
    clip_norm: ``C > 0``.
    noise_multiplier: ``z >= 0``; the noise on the sum has std ``z C``.
    expected_clients: ``n >= 1``, clients per round (fixed-size sampling).
    bits: ``b`` in `BITS`.
    beta: conditional rounding parameter in ``[0, 1)`` (0: plain randomized
      rounding, bound ``c + sqrt(d)``).
    modclip_prob: target probability that a coordinate of the sum wraps.
    max_tries: conditional rounding draws before the zero fallback.

  Returns:
    `SkellamParams`.

  Raises:
    ValueError: naming the argument (e.g. ``bits`` too small for ``n`` clients).
  """
  if not clip_norm > 0:
    raise ValueError(f'clip_norm must be > 0; got {clip_norm!r}.')
  if not noise_multiplier >= 0:
    raise ValueError(f'noise_multiplier must be >= 0; got {noise_multiplier!r}.')
  if int(expected_clients) != expected_clients or expected_clients < 1:
    raise ValueError(
        f'expected_clients must be a positive integer; got {expected_clients!r}.')
  if bits not in BITS:
    raise ValueError(f'bits must be one of {BITS}; got {bits!r}.')
  if not 0.0 <= beta < 1.0:
    raise ValueError(f'beta must be in [0, 1); got {beta!r}.')
  if int(max_tries) != max_tries or max_tries < 1:
    raise ValueError(f'max_tries must be a positive integer; got {max_tries!r}.')
  n, c, z = int(expected_clients), float(clip_norm), float(noise_multiplier)
  d_pad = padded_dim(dim)
  k = k_stddevs_for(modclip_prob)
  budget = 4.0 ** (bits - 1) / k ** 2 - n / 4.0
  if budget <= 0:
    raise ValueError(
        f'bits={bits} is too small for {n} clients per round: the rounding alone '
        f'fills the range at {k:.2f} standard deviations; use bits >= '
        f'{min_bits(n, modclip_prob)}.')
  gamma = math.sqrt(budget / (c * c * n * n / d_pad + (z * c) ** 2))
  gamma = min(gamma, MAX_SCALED_NORM / c)
  if z > 0:
    gamma = min(gamma, math.sqrt(2.0 * n * MAX_POISSON_MEAN) / (z * c))
  # (the min only absorbs float rounding at the Poisson cap)
  local_variance = min((gamma * z * c) ** 2 / n, 2.0 * MAX_POISSON_MEAN)
  bound = rounded_norm_bound(gamma * c * (1.0 + NORM_LEEWAY), d_pad, beta)
  l1 = min(bound * bound, math.sqrt(d_pad) * bound)
  return SkellamParams(
      dim=int(dim), padded_dim=d_pad, bits=int(bits), clip_norm=c, noise_multiplier=z,
      expected_clients=n, beta=float(beta), scale=gamma, local_variance=local_variance,
      norm_bound=bound, l1_bound=l1, max_tries=int(max_tries), k_stddevs=k)


# -------------------------------------------------------------- client, server

def _shapes(tree_like):
  leaves, treedef = jax.tree.flatten(tree_like)
  shapes = [tuple(jnp.shape(x)) for x in leaves]
  sizes = [int(np.prod(s, dtype=np.int64)) for s in shapes]
  return treedef, shapes, sizes


def flatten(tree) -> jax.Array:
  """A pytree's leaves as one float32 vector (``jax.tree.leaves`` order)."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros((0,), jnp.float32)
  return jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in leaves])


def unflatten(vec: jax.Array, tree_like):
  """Inverse of `flatten` for the structure and shapes of ``tree_like`` (float32)."""
  treedef, shapes, sizes = _shapes(tree_like)
  out, start = [], 0
  for shape, size in zip(shapes, sizes):
    out.append(vec[start:start + size].reshape(shape))
    start += size
  return jax.tree.unflatten(treedef, out)


def rotation_key(shared_key: jax.Array) -> jax.Array:
  """The key of the rotation's signs, from the round's shared key."""
  return jax.random.fold_in(shared_key, _ROTATION_STREAM)


def quantize(params: SkellamParams, key: jax.Array, shared_key: jax.Array, update
             ) -> tuple[jax.Array, dict]:
  """Client side before the noise: clip, flatten, pad, rotate, scale, round.

  A non-finite update is replaced by zeros (the client still takes part).

  Args:
    params: `SkellamParams`.
    key: the client's PRNG key (rounding uses ``fold_in(key, 1)``).
    shared_key: the round's key shared by all clients and the server.
    update: the client's update (pytree of ``d`` floats).

  Returns:
    ``(rounded int32 [d_pad], info)`` with ``info = {'finite', 'rounding_ok',
    'rounding_tries'}``.
  """
  x = flatten(update)
  if x.shape[0] != params.dim:
    raise ValueError(f'the update has {x.shape[0]} coordinates; the mechanism was '
                     f'built for {params.dim}.')
  finite = jnp.all(jnp.isfinite(x))
  x = jnp.where(finite, x, 0.0)
  x, _ = clipping.clip_flat(x, params.clip_norm)
  x = jnp.pad(x, (0, params.padded_dim - params.dim))
  y = rotate(x, rotation_key(shared_key)) * np.float32(params.scale)
  rounded, tries, ok = conditional_round(jax.random.fold_in(key, _ROUND_STREAM), y,
                                         params.norm_bound, params.max_tries)
  return rounded, {'finite': finite, 'rounding_ok': ok, 'rounding_tries': tries}


def encode(params: SkellamParams, key: jax.Array, shared_key: jax.Array, update
           ) -> tuple[jax.Array, dict]:
  """Client side: `quantize`, add ``Sk(mu / n)`` (key ``fold_in(key, 2)``), `wrap`.

  Returns:
    ``(payload uint32 [d_pad] holding b-bit values, info)`` (see `quantize`).
  """
  rounded, info = quantize(params, key, shared_key, update)
  if params.local_variance > 0:
    rounded = rounded + skellam_noise(jax.random.fold_in(key, _NOISE_STREAM),
                                      rounded.shape, params.local_variance)
  return wrap(rounded, params.bits), info


def decode_sum(params: SkellamParams, shared_key: jax.Array, total: jax.Array
               ) -> jax.Array:
  """Server side: the modular sum ``[d_pad]`` to the float32 sum ``[d]`` of updates.

  ``unrotate(unwrap(total) / gamma)[:d]``; exact up to the rounding and the noise
  when the integer sum did not wrap.
  """
  s = unwrap(total, params.bits).astype(jnp.float32) / np.float32(params.scale)
  return unrotate(s, rotation_key(shared_key))[:params.dim]


def secure_dp_mean(params: SkellamParams, params_like) -> aggregate_base.Aggregator:
  """Whole-round aggregator: secure sum in ``Z / 2^b``, decoded to the DP mean.

  ``aggregate(payloads uint32 [C, d_pad], weights [C], params, *, context)``:
  clients with weight > 0 mask their payloads with pairwise masks mod ``2^b``
  (`secure_agg.mask`, seeds from ``fold_in(context.key, 2)`` and the global ids);
  the server unmasks only the sum of the live ones (the others are dropped, their
  masks recovered), `decode_sum`s it with the rotation of ``context.key`` (the
  round's shared key, which the clients used) and divides by the fixed
  denominator ``n``. ``info``: ``total_weight`` (live clients, not private under
  Poisson sampling) and ``secure_sum_overflow``, the fraction of coordinates whose
  sum of the clients' centred values leaves ``[-2^(b-1), 2^(b-1))`` (a simulation
  diagnostic of wrapping).

  Args:
    params: `SkellamParams`.
    params_like: the update's structure (the mean is returned in it, float32).

  Returns:
    A whole-round `fedjax_fm.aggregate.Aggregator`.
  """
  treedef, shapes, _ = _shapes(params_like)
  like = jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes])

  def aggregate(updates, weights, params_tree=None, *, context=None):
    del params_tree
    live = jnp.asarray(weights) > 0
    num = live.shape[0]
    if context is None:
      key, ids = jax.random.key(0), jnp.arange(num)
    else:
      key, ids = context.key, context.client_id
    seeds = secure_agg.pairwise_seeds(jax.random.fold_in(key, _MASK_STREAM), ids)
    masked = secure_agg.mask(updates, ids, seeds, modulus_bits=params.bits)
    total = secure_agg.unmask_sum(masked, ~live, ids, seeds, modulus_bits=params.bits)
    mean = decode_sum(params, key, total) / np.float32(params.expected_clients)
    centred = jnp.where(live[:, None], unwrap(updates, params.bits), 0).astype(jnp.float32)
    plain = jnp.sum(centred, axis=0)
    half = float(1 << (params.bits - 1))
    overflow = jnp.mean(((plain >= half) | (plain < -half)).astype(jnp.float32))
    count = jnp.sum(live.astype(jnp.float32))
    return unflatten(mean, like), {'total_weight': count, 'secure_sum_overflow': overflow}

  return aggregate_base.whole_round(aggregate, name='secure_dp_mean')


class DistributedMechanism(NamedTuple):
  """A distributed DP mechanism, as `fedjax_fm.engine.build_round` uses it.

  Attributes:
    params: its `SkellamParams`.
    encode: ``encode(key, update, shared_key) -> (payload, info)`` for one client
      (`encode`); ``info`` holds ``finite``, ``rounding_ok``, ``rounding_tries``.
    aggregator: the whole-round `secure_dp_mean`.
    payload_nbytes: wire bytes per client, ``ceil(d_pad * b / 8)``.
  """
  params: SkellamParams
  encode: Callable[..., tuple[jax.Array, dict]]
  aggregator: aggregate_base.Aggregator
  payload_nbytes: int


def skellam_mechanism(params_like, clip_norm: float, noise_multiplier: float,
                      expected_clients: int, bits: int = DEFAULT_BITS, *,
                      beta: float = DEFAULT_BETA,
                      modclip_prob: float = DEFAULT_MODCLIP_PROB,
                      max_tries: int = DEFAULT_MAX_TRIES) -> DistributedMechanism:
  """The distributed Skellam mechanism for updates shaped like ``params_like``.

  Args:
    params_like: the trainable params (arrays or ShapeDtypeStructs).
    clip_norm, noise_multiplier, expected_clients, bits, beta, modclip_prob,
      max_tries: see `skellam_params`.

  Returns:
    A `DistributedMechanism`.
  """
  _, _, sizes = _shapes(params_like)
  p = skellam_params(sum(sizes), clip_norm, noise_multiplier, expected_clients, bits,
                     beta=beta, modclip_prob=modclip_prob, max_tries=max_tries)

  def encode_one(key, update, shared_key):
    return encode(p, key, shared_key, update)

  return DistributedMechanism(params=p, encode=encode_one,
                              aggregator=secure_dp_mean(p, params_like),
                              payload_nbytes=-(-p.payload_bits // 8))


def skellam_dp(params_like, clip_norm: float, noise_multiplier: float,
               expected_clients: int, bits: int = DEFAULT_BITS, *,
               beta: float = DEFAULT_BETA, per_layer: bool = False,
               modclip_prob: float = DEFAULT_MODCLIP_PROB,
               max_tries: int = DEFAULT_MAX_TRIES) -> dp_fedavg.Privacy:
  """A `Privacy` for `fedjax_fm.engine.build_round` with distributed Skellam noise.

  Its ``clip`` is DP-FedAvg's (flat or per layer, total bound ``C``); its
  ``noise`` adds nothing (the clients added it); ``noise_stddev`` is the
  equivalent standard deviation ``z C / m`` of the noise on the mean; its
  ``distributed`` (`skellam_mechanism`) makes the round encode every client's
  update into ``b``-bit integers (the uplink payload: no other compressor) and
  aggregate them by `secure_dp_mean`.

  Args:
    params_like: the trainable params.
    clip_norm, noise_multiplier, expected_clients, bits, beta, modclip_prob,
      max_tries: see `skellam_params`.
    per_layer: clip leaf by leaf (total bound ``C``) in the clip step.

  Returns:
    A `fedjax_fm.privacy.Privacy` with ``distributed`` set.
  """
  gauss = dp_fedavg.gaussian_dp(clip_norm, noise_multiplier, per_layer=per_layer)
  mech = skellam_mechanism(params_like, clip_norm, noise_multiplier, expected_clients,
                           bits, beta=beta, modclip_prob=modclip_prob,
                           max_tries=max_tries)

  def noise(key, mean_tree, num_clients, clip_norm=None):
    del key, num_clients, clip_norm
    return mean_tree

  return gauss._replace(noise=noise, distributed=mech)

