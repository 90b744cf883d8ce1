"""Simulated Byzantine clients: a fixed malicious set and update corruptions.

`choose_attackers` fixes, once per experiment, which global client ids are
malicious; inside the round the engine gathers ``is_attacker[client_id]`` and
`apply_attack` replaces those clients' (stacked) updates:

* ``'sign_flip'``: ``-u`` (pushes the model uphill; Damaskinos et al. 2018);
* ``'scale'``: ``scale * u`` (boosting / model replacement; Bagdasaryan et al.
  2020);
* ``'noise'``: ``N(0, scale^2)`` in every coordinate, ignoring ``u`` (Gaussian
  attack; Blanchard et al. 2017);
* ``'nan'``: NaN in every coordinate (a crashed or adversarial client; caught
  by `fedjax_fm.aggregate.finite_mask`).

Honest clients' updates are returned bit for bit. Everything is a pure function
of fixed shapes, so it runs inside the jitted round.

References:
  * Blanchard et al. 2017, https://papers.nips.cc/paper/6617
  * Damaskinos et al. 2018, "Asynchronous Byzantine Machine Learning (the case
    of SGD)", https://arxiv.org/abs/1802.07928
  * Bagdasaryan et al. 2020, "How To Backdoor Federated Learning",
    https://arxiv.org/abs/1807.00459
"""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp

ATTACKS = ('sign_flip', 'scale', 'noise', 'nan')


def apply_attack(updates, is_attacker, kind: str, *, scale: float = 10.0,
                 key=None):
  """Corrupts the attackers' updates in a stack of client updates.

  Args:
    updates: Pytree with a leading clients axis ``[C, ...]`` (float leaves).
    is_attacker: bool ``[C]``.
    kind: One of ``'sign_flip'``, ``'scale'``, ``'noise'``, ``'nan'``.
    scale: Factor for ``'scale'``; noise standard deviation for ``'noise'``.
    key: PRNG key, required for ``'noise'`` (each leaf and client gets
      independent noise).

  Returns:
    The pytree with the attackers' rows replaced.

  Raises:
    ValueError: for an unknown ``kind``, or ``'noise'`` without a key.
  """
  if kind not in ATTACKS:
    raise ValueError(f'kind must be one of {ATTACKS}; got {kind!r}.')
  if kind == 'noise' and key is None:
    raise ValueError("key is required for kind='noise'.")
  is_attacker = jnp.asarray(is_attacker, bool)
  leaves, treedef = jax.tree.flatten(updates)
  keys = (jax.random.split(key, len(leaves)) if kind == 'noise' and leaves
          else [None] * len(leaves))
  out = []
  for x, k in zip(leaves, keys):
    if kind == 'sign_flip':
      bad = -x
    elif kind == 'scale':
      bad = x * jnp.asarray(scale, x.dtype)
    elif kind == 'noise':
      bad = (scale * jax.random.normal(k, x.shape, jnp.float32)).astype(x.dtype)
    else:
      bad = jnp.full(x.shape, jnp.nan, x.dtype)
    mask = is_attacker.reshape(is_attacker.shape + (1,) * (x.ndim - 1))
    out.append(jnp.where(mask, bad, x))
  return jax.tree.unflatten(treedef, out)


def choose_attackers(num_clients_total: int, fraction: float,
                     seed: int) -> np.ndarray:
  """A fixed set of malicious clients: exactly ``round(fraction * N)`` of ``N``.

  Args:
    num_clients_total: Population size ``N`` (>= 1).
    fraction: Fraction of malicious clients in [0, 1].
    seed: Seed of the (NumPy) draw, so the set is reproducible.

  Returns:
    NumPy bool ``[N]``, True for malicious client ids.

  Raises:
    ValueError: naming the offending argument.
  """
  if int(num_clients_total) != num_clients_total or num_clients_total < 1:
    raise ValueError('num_clients_total must be a positive integer; got '
                     f'{num_clients_total!r}.')
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f'fraction must be in [0, 1]; got {fraction!r}.')
  n = int(num_clients_total)
  count = int(round(fraction * n))
  rng = np.random.default_rng(seed)
  out = np.zeros(n, bool)
  out[rng.choice(n, size=count, replace=False)] = True
  return out
