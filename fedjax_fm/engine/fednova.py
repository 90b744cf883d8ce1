"""FedNova: normalised averaging of heterogeneous local updates.

Wang, Liu, Liang, Joshi, Poor 2020, "Tackling the Objective Inconsistency
Problem in Heterogeneous Federated Optimization", https://arxiv.org/abs/2007.07481.

A client that runs ``tau_i`` local steps moves by ``Delta_i = -lr G_i a_i``
where ``G_i`` stacks its stochastic gradients and ``a_i`` is the coefficient
vector of its local optimizer. FedNova averages the normalised updates
``d_i = Delta_i / ||a_i||_1`` and rescales them by the effective number of steps::

  Delta = tau_eff * sum_i p_i d_i,     tau_eff = sum_i p_i ||a_i||_1

(the paper's default ``tau_eff``; ``p_i`` the clients' normalised weights), and
the server applies ``x <- x + eta_g Delta`` (``server_optimizer`` ``fedavg``
with learning rate ``eta_g``). ``||a_i||_1`` for the local optimizers the
engine runs (`coefficient_norm`):

* plain SGD: ``tau_i``;
* SGD with heavy-ball momentum ``rho`` (optax ``sgd(lr, momentum=rho)``:
  ``v <- rho v + g``, ``x <- x - lr v``): the gradient of step ``k`` (0-based)
  contributes ``(1 - rho^(tau - k)) / (1 - rho)``, so
  ``||a||_1 = (tau - rho (1 - rho^tau) / (1 - rho)) / (1 - rho)``;
* SGD on the FedProx objective (``mu``): ``a = [(1 - alpha)^(tau - 1), ..., 1]``
  with ``alpha = lr mu``, ``||a||_1 = (1 - (1 - alpha)^tau) / alpha``.

In the compiled round each client sends ``d_i`` and the scalar ``||a_i||_1``
(4 more uplink bytes); the server folds ``sum p_i d_i`` and ``sum p_i ||a_i||_1``
as streaming sums, so ``chunked`` and ``sharded`` keep their memory bound.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class FedNova(NamedTuple):
  """FedNova in `fedjax_fm.engine.build_round`: the client optimizer's coefficients.

  Attributes:
    momentum: heavy-ball momentum ``rho`` of the client's SGD (0: plain SGD).
    prox_alpha: ``lr * mu`` of SGD on the FedProx objective (0: none); not
      with momentum.
  """
  momentum: float = 0.0
  prox_alpha: float = 0.0


def coefficient_norm(steps, momentum: float = 0.0, prox_alpha: float = 0.0) -> jax.Array:
  """``||a_i||_1`` of a client that ran ``steps`` local steps (see the module docstring).

  Args:
    steps: the client's local steps (a scalar or an array; float or int).
    momentum: heavy-ball momentum ``rho`` in [0, 1).
    prox_alpha: ``lr * mu`` in [0, 1) for SGD on the FedProx objective.

  Returns:
    float32 array shaped like ``steps``.
  """
  if momentum and prox_alpha:
    raise ValueError('FedNova coefficients of momentum SGD on the FedProx objective are not '
                     'implemented: use momentum or prox_alpha, not both')
  if not 0.0 <= momentum < 1.0 or not 0.0 <= prox_alpha < 1.0:
    raise ValueError(f'momentum={momentum} and prox_alpha={prox_alpha} must be in [0, 1)')
  tau = jnp.asarray(steps, jnp.float32)
  if momentum:
    rho = jnp.float32(momentum)
    return (tau - rho * (1.0 - rho ** tau) / (1.0 - rho)) / (1.0 - rho)
  if prox_alpha:
    alpha = jnp.float32(prox_alpha)
    return (1.0 - (1.0 - alpha) ** tau) / alpha
  return tau


def normalize(delta: Any, norm: jax.Array) -> Any:
  """``d_i = Delta_i / ||a_i||_1`` (0 for a client with no step)."""
  safe = jnp.where(norm > 0, norm, 1.0)
  return jax.tree.map(lambda d: jnp.where(norm > 0, d / safe.astype(d.dtype),
                                          jnp.zeros_like(d)), delta)


def fednova_aggregate(deltas: Any, weights, norms) -> tuple[Any, jax.Array]:
  """FedNova's aggregate of stacked client updates, for use from plain JAX.

  Args:
    deltas: pytree of ``[C, ...]`` local updates ``Delta_i`` (local - global).
    weights: ``[C]`` non-negative weights (normalised to ``p_i`` here; 0 leaves
      a client out).
    norms: ``[C]`` ``||a_i||_1`` (`coefficient_norm` of each client's steps).

  Returns:
    ``(Delta, tau_eff)``: the update to add to the global model (times the
    server learning rate) and ``tau_eff = sum_i p_i ||a_i||_1``.
  """
  w = jnp.asarray(weights, jnp.float32)
  norms = jnp.asarray(norms, jnp.float32)
  p = w / jnp.maximum(jnp.sum(w), 1e-30)
  tau_eff = jnp.sum(p * norms)
  d = jax.vmap(normalize)(deltas, norms)
  mean_d = jax.tree.map(lambda x: jnp.tensordot(p, x.astype(jnp.float32), axes=1), d)
  return jax.tree.map(lambda m, x: (tau_eff * m).astype(x.dtype), mean_d, deltas), tau_eff
