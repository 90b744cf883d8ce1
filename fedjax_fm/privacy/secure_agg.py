"""Simulated secure aggregation with pairwise additive masks (Bonawitz et al. 2017).

The server only ever sees masked integer vectors whose masks cancel in the sum:

1. **Fixed-point encoding.** Each client clips its update to
   ``[-clip_range, clip_range]``, scales it by ``scale`` and rounds
   (stochastically, unbiased, when a key is given) to an integer, stored as
   two's complement in ``uint32``: an element of ``Z_{2^32}``. With
   ``scale = fixed_point_scale(clip_range, num_clients)`` the sum of
   ``num_clients`` encodings stays below ``2^31`` in magnitude, so it decodes
   without ambiguity (`dequantize`).
2. **Pairwise masks.** Every pair of clients ``(i, j)`` shares a seed ``s_ij``
   (in the real protocol, from a Diffie-Hellman key agreement; simulated here by
   `pairwise_seeds`). With clients ordered by ``(client_id, position)``, the
   smaller one adds ``PRG(s_ij)`` and the larger one subtracts it, mod ``2^32``
   (`mask`). Each masked vector is uniformly distributed on ``Z_{2^32}^d``;
   in the sum over all clients every mask appears once with each sign.
3. **Dropouts.** If some clients' masked vectors never arrive, the masks they
   share with the survivors do not cancel. In the protocol the survivors hold
   Shamir shares of each dropped client's key and the server reconstructs the
   seeds ``s_ij`` (``i`` surviving, ``j`` dropped); `unmask_sum` simulates this
   by regenerating exactly those masks and removing them.

All arithmetic is ``uint32`` with wraparound, i.e. exact arithmetic mod
``2^32``; the integer sum after unmasking equals the plain integer sum bit for
bit.

Simplifications (this is a simulation of the arithmetic, not a cryptographic
implementation): seeds come from one PRNG key instead of a key exchange; the
self-mask ("double masking") that protects a slow client wrongly declared
dropped, the Shamir threshold ``t`` and the consistency checks are omitted; the
modulus is a power of two, ``2^b`` with ``b <= 32`` (``mask(...,
modulus_bits=b)``; 32 by default).

Composing with a quantizer: any integer encoding can be masked instead of the
fixed-point one, as long as (a) decoding is linear with parameters shared by all
clients, so that the sum of the codes decodes to the sum of the updates (a shared
fixed-point scale, or stochastic uniform quantization on a shared grid; *not*
per-client norm scales such as QSGD's), and (b) the sum of the codes over the
clients fits in ``[-2^31, 2^31)``. DP noise, if any, must then be added by the
clients in the integer domain (distributed discrete Gaussian, Kairouz et al.
2021; distributed Skellam, Agarwal et al. 2021), since the server only sees the
sum: `fedjax_fm.privacy.distributed` does this in ``Z / 2^b``.

References:
  * Bonawitz et al. 2017, "Practical Secure Aggregation for Privacy-Preserving
    Machine Learning", https://eprint.iacr.org/2017/281
  * Kairouz, Liu, Steinke 2021, "The Distributed Discrete Gaussian Mechanism for
    Federated Learning with Secure Aggregation", https://arxiv.org/abs/2102.06387
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from fedjax_fm.aggregate import base as aggregate_base

MODULUS_BITS = 32


def fixed_point_scale(clip_range: float, num_clients: int, *,
                      max_bits: int = 24) -> float:
  """Largest safe fixed-point scale for summing ``num_clients`` encodings.

  Each encoding lies in ``[-K, K]`` with
  ``K = min(2^max_bits, floor((2^31 - 1) / num_clients))``, so the sum of
  ``num_clients`` encodings lies in ``[-(2^31 - 1), 2^31 - 1]`` and decodes
  exactly from ``Z_{2^32}``. ``max_bits = 24`` keeps every encoding exactly
  representable in float32. The quantization step is ``1 / scale``.

  Args:
    clip_range: Bound ``r > 0`` on each coordinate's magnitude.
    num_clients: Most clients whose encodings are summed (>= 1).
    max_bits: Cap on the per-client integer magnitude, in bits (1..30).

  Returns:
    ``scale = K / clip_range``.

  Raises:
    ValueError: naming the offending argument.
  """
  if not clip_range > 0:
    raise ValueError(f'clip_range must be > 0; got {clip_range!r}.')
  if int(num_clients) != num_clients or num_clients < 1:
    raise ValueError(
        f'num_clients must be a positive integer; got {num_clients!r}.')
  if int(max_bits) != max_bits or not 1 <= max_bits <= 30:
    raise ValueError(f'max_bits must be an integer in [1, 30]; got {max_bits!r}.')
  k = min(2 ** int(max_bits), (2 ** 31 - 1) // int(num_clients))
  if k < 1:
    raise ValueError(f'num_clients={num_clients!r} is too large for 2^32.')
  return float(k) / float(clip_range)


def quantize(tree, clip_range: float, scale: float, key=None):
  """Fixed-point encoding of a float pytree into ``Z_{2^32}`` (``uint32``).

  ``q = round(clip(x, -r, r) * scale)`` stored as two's complement. With a key
  the rounding is stochastic (``floor(y + U[0, 1))``, unbiased); without, to
  nearest. Works elementwise, so it accepts one client's update or a stack.

  Args:
    tree: Pytree of float arrays.
    clip_range: ``r > 0``; coordinates are clipped to ``[-r, r]``.
    scale: Fixed-point scale; ``r * scale`` must be below ``2^31`` (use
      `fixed_point_scale`).
    key: Optional PRNG key for stochastic rounding.

  Returns:
    Pytree of ``uint32`` arrays.

  Raises:
    ValueError: if ``clip_range`` or ``scale`` (Python numbers) is out of
      range; traced values are not checked.
  """
  if isinstance(clip_range, (int, float)) and not clip_range > 0:
    raise ValueError(f'clip_range must be > 0; got {clip_range!r}.')
  if (isinstance(clip_range, (int, float)) and isinstance(scale, (int, float))
      and not 0 < clip_range * scale < 2.0 ** 31):
    raise ValueError(
        f'scale must be > 0 with clip_range * scale < 2^31; got {scale!r}.')
  leaves, treedef = jax.tree.flatten(tree)
  keys = (jax.random.split(key, len(leaves)) if key is not None and leaves
          else [None] * len(leaves))
  out = []
  for x, k in zip(leaves, keys):
    y = jnp.clip(x.astype(jnp.float32), -clip_range, clip_range) * scale
    if k is None:
      y = jnp.round(y)
    else:
      y = jnp.floor(y + jax.random.uniform(k, y.shape, jnp.float32))
    out.append(jax.lax.bitcast_convert_type(y.astype(jnp.int32), jnp.uint32))
  return jax.tree.unflatten(treedef, out)


def dequantize(int_tree, scale: float):
  """Decodes ``uint32`` (two's complement) fixed-point values to float32.

  Linear: ``dequantize(sum of encodings) = sum of dequantize`` as long as the
  integer sum stays in ``[-2^31, 2^31)``.

  Args:
    int_tree: Pytree of ``uint32`` arrays (an encoding, or a sum of them).
    scale: The scale used by `quantize`.

  Returns:
    Pytree of float32 arrays.
  """
  return jax.tree.map(
      lambda q: jax.lax.bitcast_convert_type(
          q.astype(jnp.uint32), jnp.int32).astype(jnp.float32) / scale,
      int_tree)


def pairwise_seeds(key, client_ids) -> jax.Array:
  """Simulated pairwise shared seeds: a symmetric ``[C, C]`` PRNG key array.

  ``seeds[a, b] = fold_in(fold_in(key, min(id_a, id_b)), max(id_a, id_b))``,
  so ``seeds[a, b] == seeds[b, a]`` and a pair's seed depends on the two
  clients' ids only (use a fresh ``key`` every round). Stands in for the key
  agreement of the real protocol.

  Args:
    key: A PRNG key (per round).
    client_ids: int ``[C]`` global client ids.

  Returns:
    A ``[C, C]`` array of PRNG keys.
  """
  ids = jnp.asarray(client_ids)

  def one(a, b):
    return jax.random.fold_in(jax.random.fold_in(key, jnp.minimum(a, b)),
                              jnp.maximum(a, b))

  return jax.vmap(lambda a: jax.vmap(lambda b: one(a, b))(ids))(ids)


def _signs(client_ids):
  """``[C, C]`` uint32 signs: 1 if a precedes b, ``2^32 - 1`` (= -1) if b precedes a.

  The diagonal is 0.

  The order is lexicographic on ``(client_id, position)``: strict and total even
  with repeated ids (e.g. padding clients).
  """
  ids = jnp.asarray(client_ids)
  pos = jnp.arange(ids.shape[0])
  before = (ids[:, None] < ids[None, :]) | (
      (ids[:, None] == ids[None, :]) & (pos[:, None] < pos[None, :]))
  after = (ids[:, None] > ids[None, :]) | (
      (ids[:, None] == ids[None, :]) & (pos[:, None] > pos[None, :]))
  one = jnp.uint32(1)
  return jnp.where(before, one, jnp.where(after, -one, jnp.uint32(0)))


def _masks(coeffs, seeds, shapes):
  """``out[a] = sum_b coeffs[a, b] * PRG(seeds[a, b])`` for every leaf, mod 2^32."""
  num = coeffs.shape[0]

  def for_client(coeff_row, seed_row):
    def body(b, acc):
      c = coeff_row[b]
      return tuple(
          m + c * jax.random.bits(jax.random.fold_in(seed_row[b], leaf), shape,
                                  jnp.uint32)
          for leaf, (m, shape) in enumerate(zip(acc, shapes)))

    zeros = tuple(jnp.zeros(s, jnp.uint32) for s in shapes)
    return jax.lax.fori_loop(0, num, body, zeros)

  return jax.vmap(for_client)(coeffs, seeds)


def _reduce_mod(x, modulus_bits):
  """``x mod 2^modulus_bits`` for uint32 ``x`` (a no-op for 32)."""
  if int(modulus_bits) != modulus_bits or not 1 <= modulus_bits <= MODULUS_BITS:
    raise ValueError(
        f'modulus_bits must be an integer in [1, 32]; got {modulus_bits!r}.')
  if modulus_bits == MODULUS_BITS:
    return x
  return x & jnp.uint32((1 << int(modulus_bits)) - 1)


def mask(updates_int, client_ids, seeds, *, modulus_bits: int = MODULUS_BITS):
  """Adds every client's pairwise masks to its integer update, mod ``2^b``.

  Client ``a`` sends ``x_a + sum_{b != a} sign(a, b) PRG(seeds[a, b])`` with
  ``sign = +1`` when ``a`` precedes ``b`` in ``(client_id, position)`` order and
  ``-1`` otherwise, so every pair's mask cancels in the sum over all clients.
  Each leaf uses its own stream (``fold_in(seed, leaf_index)``). Arithmetic is
  ``uint32`` with wraparound, reduced mod ``2^b`` at the end; since ``2^b``
  divides ``2^32`` this equals computing in ``Z / 2^b`` throughout, and each
  masked vector is uniform on ``Z_{2^b}^d``.

  Args:
    updates_int: Pytree of ``uint32`` arrays with a leading clients axis
      ``[C, ...]`` (e.g. from `quantize`).
    client_ids: int ``[C]`` global client ids.
    seeds: ``[C, C]`` symmetric PRNG keys (`pairwise_seeds`).
    modulus_bits: ``b`` in ``[1, 32]``: the modulus is ``2^b`` (default 32).

  Returns:
    The masked pytree (``uint32`` holding values in ``[0, 2^b)``, same shapes).
  """
  leaves, treedef = jax.tree.flatten(updates_int)
  shapes = [tuple(x.shape[1:]) for x in leaves]
  masks = _masks(_signs(client_ids), seeds, shapes)
  return jax.tree.unflatten(
      treedef, [_reduce_mod(x.astype(jnp.uint32) + m, modulus_bits)
                for x, m in zip(leaves, masks)])


def unmask_sum(masked, dropped, client_ids, seeds, *,
               modulus_bits: int = MODULUS_BITS):
  """Sum of the surviving clients' updates from their masked vectors.

  The server adds the masked vectors of the survivors (``dropped == False``);
  masks between two survivors cancel. For every survivor ``a`` and dropped
  client ``b`` the server has reconstructed ``seeds[a, b]`` (from the
  survivors' shares, in the protocol) and subtracts ``sign(a, b) PRG(seeds[a, b])``.
  Only those seeds enter the result. Padding clients must be marked dropped if
  their masked vectors are not summed.

  Args:
    masked: Pytree of ``uint32`` ``[C, ...]`` from `mask`.
    dropped: bool ``[C]``, True for clients whose masked update never arrived.
    client_ids: int ``[C]`` (as given to `mask`).
    seeds: ``[C, C]`` PRNG keys (as given to `mask`).
    modulus_bits: ``b`` (as given to `mask`).

  Returns:
    Pytree of ``uint32`` (no clients axis): the exact sum mod ``2^b`` of the
    survivors' integer updates.
  """
  alive = ~jnp.asarray(dropped, bool)
  leaves, treedef = jax.tree.flatten(masked)
  shapes = [tuple(x.shape[1:]) for x in leaves]
  pair = alive[:, None] & ~alive[None, :]
  coeffs = jnp.where(pair, _signs(client_ids), jnp.uint32(0))
  leftovers = _masks(coeffs, seeds, shapes)
  out = []
  for x, m in zip(leaves, leftovers):
    keep = alive.reshape((-1,) + (1,) * (x.ndim - 1))
    total = jnp.sum(jnp.where(keep, x.astype(jnp.uint32), jnp.uint32(0)),
                    axis=0, dtype=jnp.uint32)
    out.append(_reduce_mod(total - jnp.sum(m, axis=0, dtype=jnp.uint32), modulus_bits))
  return jax.tree.unflatten(treedef, out)


def secure_sum(key, updates, dropped, *, clip_range: float,
               scale: Optional[float] = None, client_ids=None,
               stochastic_rounding: bool = True):
  """End to end: quantize, mask, drop, unmask and decode the survivors' sum.

  Args:
    key: PRNG key (split into the seed key and the rounding key).
    updates: Pytree of float ``[C, ...]`` client updates.
    dropped: bool ``[C]`` clients whose masked update is lost.
    clip_range: Coordinate bound ``r``.
    scale: Fixed-point scale; default ``fixed_point_scale(r, C)``.
    client_ids: int ``[C]``; default ``arange(C)``.
    stochastic_rounding: Unbiased stochastic rounding (else to nearest).

  Returns:
    Pytree of float32: the sum over surviving clients of the clipped updates,
    within ``(number of survivors) / scale`` per coordinate.
  """
  leaves = jax.tree.leaves(updates)
  num = leaves[0].shape[0]
  if scale is None:
    scale = fixed_point_scale(clip_range, num)
  if client_ids is None:
    client_ids = jnp.arange(num)
  seed_key, round_key = jax.random.split(key)
  q = quantize(updates, clip_range, scale,
               round_key if stochastic_rounding else None)
  seeds = pairwise_seeds(seed_key, client_ids)
  masked = mask(q, client_ids, seeds)
  return dequantize(unmask_sum(masked, dropped, client_ids, seeds), scale)


def secure_mean(clip_range: float, *, seed: int = 0) -> aggregate_base.Aggregator:
  """A whole-round aggregator that averages through simulated secure aggregation.

  Each round the live clients (weight > 0) quantize their updates, add pairwise
  masks and the server unmasks only the sum (`secure_sum`), then divides by the
  number of live clients: a uniform mean, since a client cannot know the total
  weight it would need to pre-scale by. Padding and dropped clients (weight 0)
  are treated as dropped, their masks recovered.

  Args:
    clip_range: coordinate bound of the fixed-point encoding.
    seed: folded into the round's key (`RoundContext`) to seed the pairwise
      masks, which are then fresh every round and tied to the clients' global
      ids (a simulation: real clients agree on them by key exchange).

  Returns:
    A whole-round `fedjax_fm.aggregate.Aggregator`.
  """

  def aggregate(updates, weights, params=None, *, context=None):
    del params
    live = jnp.asarray(weights) > 0
    if context is None:   # outside a round: one fixed key, positional ids
      key, ids = jax.random.key(seed), None
    else:   # masks fresh every round, agreed between clients by their global ids
      key, ids = jax.random.fold_in(context.key, seed), context.client_id
    total = secure_sum(key, updates, ~live, clip_range=clip_range, client_ids=ids)
    count = jnp.maximum(jnp.sum(live.astype(jnp.float32)), 1.0)
    return jax.tree.map(lambda t: t / count, total), {'total_weight': count}

  return aggregate_base.whole_round(aggregate, name='secure_mean')
