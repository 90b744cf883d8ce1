"""DP-FedAvg: clip each client's update, average uniformly, add Gaussian noise.

User-level differential privacy for federated averaging (McMahan et al. 2018):

  1. every sampled client clips its update to L2 norm ``C`` (flat, or per layer
     with the same total bound, see `fedjax_fm.privacy.clipping`);
  2. the server averages the clipped updates with **uniform** weights and a
     **fixed** denominator, the expected number of clients per round ``m``
     (``m = q N`` for Poisson sampling with rate ``q`` out of ``N`` clients; the
     sample size for fixed-size sampling);
  3. the server adds ``N(0, (z C / m)^2)`` to every coordinate of that mean,
     ``z`` being the noise multiplier.

Why uniform weights: the sensitivity of the aggregate must not depend on the
data. With example-count weights ``w_i / sum_j w_j`` one client holding many
examples could move the mean by up to ``C`` (its weight can approach 1), and the
weights themselves depend on private data. With weight ``1 / m`` adding or
removing one client moves ``sum_i clip(u_i) / m`` by at most ``C / m``, so noise
of standard deviation ``z C / m`` on the mean is the Gaussian mechanism with noise
multiplier ``z`` on the sum (``z C`` on a sum of sensitivity ``C``), which is what
`fedjax_fm.privacy.accounting` accounts for. The denominator is the *expected*
count, not the realised one: under Poisson sampling the realised count is itself
private (McMahan et al.'s fixed-denominator estimator, Section 3). With
fixed-size sampling the two coincide.

Engine wiring::

  dp = gaussian_dp(clip_norm=1.0, noise_multiplier=1.0)
  update, norm = dp.clip(delta)                        # per client, in vmap
  weights = dp.uniform_weights(round_data['weight'])   # 1 per real client
  mean = fixed_denominator_mean(expected_clients)      # a streaming Aggregator
  noisy = dp.noise(key, mean, expected_clients)        # once, on the server

If the engine aggregates a *sum* instead of a mean, call
``dp.noise(key, total, 1)`` (noise ``z C`` on the sum).

The distributed variant, where clients add integer noise under secure
aggregation and the server never sees an update, is
`fedjax_fm.privacy.distributed.skellam_dp` (same clipping and noise multiplier).

References:
  * McMahan, Ramage, Talwar, Zhang 2018, "Learning Differentially Private
    Recurrent Language Models", https://arxiv.org/abs/1710.06963
  * Abadi et al. 2016, "Deep Learning with Differential Privacy",
    https://arxiv.org/abs/1607.00133
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_fm.aggregate import base as aggregate_base
from fedjax_fm.privacy import clipping


class Privacy(NamedTuple):
  """Pure functions of a DP aggregation mechanism (see `gaussian_dp`).

  Attributes:
    clip: ``clip(update, clip_norm=None) -> (clipped, norm)`` for one client;
      ``norm`` is the float32 global norm before clipping. ``clip_norm``
      overrides the configured bound (e.g. a traced adaptive clip).
    noise: ``noise(key, mean_tree, num_clients, clip_norm=None) -> noisy`` adds
      ``N(0, (noise_multiplier * clip_norm / num_clients)^2)`` to every
      coordinate; ``num_clients`` is the expected clients per round (1 when
      ``mean_tree`` is a sum).
    noise_stddev: ``noise_stddev(num_clients, clip_norm=None) -> float`` the
      per-coordinate standard deviation that ``noise`` adds.
    uniform_weights: ``uniform_weights(weights [C]) -> float32 [C]``: 1 for every
      client with a positive weight, 0 for padding or dropped clients.
    clip_norm: The configured clip bound ``C``.
    noise_multiplier: The configured noise multiplier ``z``.
    per_layer: Whether clipping is per leaf (total bound ``C``).
    distributed: ``None`` for the central (server-noised) mechanism; for a
      distributed one (`fedjax_fm.privacy.distributed.skellam_dp`) its
      `DistributedMechanism`: the clients encode their clipped updates into
      noised integers, the round aggregates them by its secure sum, and
      ``noise`` adds nothing.
  """
  clip: Callable[..., tuple[Any, jax.Array]]
  noise: Callable[..., Any]
  noise_stddev: Callable[..., Any]
  uniform_weights: Callable[[jax.Array], jax.Array]
  clip_norm: float
  noise_multiplier: float
  per_layer: bool
  distributed: Any = None


def gaussian_dp(clip_norm: float, noise_multiplier: float, *,
                per_layer: bool = False) -> Privacy:
  """DP-FedAvg's Gaussian mechanism (McMahan et al. 2018).

  Works with Poisson or fixed-size client sampling; the sampling scheme only
  changes the accounting (`fedjax_fm.privacy.accounting.epsilon`) and the
  expected number of clients passed to ``noise``.

  Args:
    clip_norm: L2 bound ``C`` on each client's update (> 0). With
      ``per_layer=True`` it is the total bound, split as ``C / sqrt(L)`` over the
      ``L`` leaves (`clipping.clip_per_layer`), so the sensitivity is still ``C``.
    noise_multiplier: ``z >= 0``; the noise standard deviation on the sum of
      clipped updates is ``z * C`` (0 disables the noise: no privacy).
    per_layer: Clip leaf by leaf instead of over the whole pytree.

  Returns:
    A `Privacy`.

  Raises:
    ValueError: if ``clip_norm <= 0`` or ``noise_multiplier < 0``.

  References:
    McMahan et al. 2018, https://arxiv.org/abs/1710.06963
  """
  if not clip_norm > 0:
    raise ValueError(f'clip_norm must be > 0; got {clip_norm!r}.')
  if not noise_multiplier >= 0:
    raise ValueError(
        f'noise_multiplier must be >= 0; got {noise_multiplier!r}.')
  if not isinstance(per_layer, bool):
    raise ValueError(f'per_layer must be True or False; got {per_layer!r}.')

  default_clip = clip_norm

  def clip(update, clip_norm=None):
    c = default_clip if clip_norm is None else clip_norm
    if per_layer:
      clipped, _ = clipping.clip_per_layer(update, c)
      return clipped, clipping.global_norm(update)
    return clipping.clip_flat(update, c)

  def noise_stddev(num_clients, clip_norm=None):
    c = default_clip if clip_norm is None else clip_norm
    return noise_multiplier * c / num_clients

  def noise(key, mean_tree, num_clients, clip_norm=None):
    if isinstance(num_clients, (int, float)) and not num_clients > 0:
      raise ValueError(f'num_clients must be > 0; got {num_clients!r}.')
    std = jnp.asarray(noise_stddev(num_clients, clip_norm),
                      jnp.float32)
    return add_gaussian_noise(key, mean_tree, std)

  def uniform_weights(weights):
    return (jnp.asarray(weights) > 0).astype(jnp.float32)

  return Privacy(clip=clip, noise=noise, noise_stddev=noise_stddev,
                 uniform_weights=uniform_weights, clip_norm=float(default_clip),
                 noise_multiplier=float(noise_multiplier), per_layer=per_layer)


def add_gaussian_noise(key, tree, stddev):
  """Adds i.i.d. ``N(0, stddev^2)`` to every coordinate of a pytree.

  Every leaf gets its own key (``jax.random.split`` over the leaves); the noise
  is drawn and added in float32 and the sum is cast back to the leaf dtype.

  Args:
    key: A PRNG key.
    tree: Pytree of float arrays.
    stddev: Standard deviation (scalar, may be traced).

  Returns:
    The noisy pytree.
  """
  leaves, treedef = jax.tree.flatten(tree)
  if not leaves:
    return tree
  keys = jax.random.split(key, len(leaves))
  noisy = [
      (x.astype(jnp.float32)
       + stddev * jax.random.normal(k, jnp.shape(x), jnp.float32)).astype(x.dtype)
      for k, x in zip(keys, leaves)
  ]
  return jax.tree.unflatten(treedef, noisy)


def fixed_denominator_mean(expected_clients: float) -> aggregate_base.Aggregator:
  """Streaming ``sum_i [w_i > 0] u_i / expected_clients`` (DP-FedAvg's mean).

  Every participating client (positive weight) counts 1 whatever its weight;
  padding and dropped clients (weight 0) are excluded (their updates are masked
  out, so even non-finite values there do not leak in). The denominator is fixed, so
  the mean's sensitivity is ``C / expected_clients`` (see the module docstring).
  The accumulator is ``(sum, count)``; both add across devices.

  Args:
    expected_clients: Expected number of clients per round (> 0).

  Returns:
    A streaming `Aggregator`; ``finalize`` reports ``num_clients`` (the realised
    count, which is *not* private under Poisson sampling: do not publish it).

  Raises:
    ValueError: if ``expected_clients <= 0``.
  """
  if not expected_clients > 0:
    raise ValueError(
        f'expected_clients must be > 0; got {expected_clients!r}.')

  def zero(params):
    return (jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), jnp.float32), params),
            jnp.zeros((), jnp.float32))

  def accumulate(acc, updates, weights, params=None):
    del params
    total, count = acc
    live = jnp.asarray(weights) > 0
    ones = live.astype(jnp.float32)

    def add(t, u):
      u = u.astype(jnp.float32)
      u = jnp.where(live.reshape((-1,) + (1,) * (u.ndim - 1)), u, 0.0)
      return t + jnp.sum(u, axis=0)

    total = jax.tree.map(add, total, updates)
    return total, count + jnp.sum(ones)

  def finalize(acc, params=None):
    del params
    total, count = acc
    mean = jax.tree.map(lambda t: t / expected_clients, total)
    return mean, {'num_clients': count, 'total_weight': count}

  return aggregate_base.streaming(zero, accumulate, finalize, name='fixed_denominator_mean',
                                  leafwise=True)
