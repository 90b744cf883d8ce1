"""Client and server optimizers, all optax transformations.

The server treats the negated aggregated delta as a gradient, so every server
optimizer is an ``optax.GradientTransformation`` applied to ``g = -mean_delta``:

======================  ==============================================================
name                    transformation
======================  ==============================================================
``fedavg``              ``sgd(lr)`` (lr = 1 is plain FedAvg)
``fedavgm``             ``sgd(lr, momentum)``
``fedadam``             Reddi et al. 2021, Algorithm 2 (`reddi`): no bias correction,
``fedyogi``             ``m`` with ``b1`` for all three, ``v`` from ``tau^2``, step
``fedadagrad``          ``lr * m / (sqrt(v) + tau)``
``fedadam_optax``       ``optax.adam(lr, b1, b2, eps)`` (bias-corrected, eps outside)
``fedyogi_optax``       ``optax.yogi(lr, b1, b2, eps)`` (accumulators from 1e-6)
``fedadagrad_optax``    ``optax.adagrad(lr, eps=eps)`` (no momentum)
======================  ==============================================================

References:
  Reddi, Charles, Zaheer, Garrett, Rush, Konecny, Kumar, McMahan 2021,
  "Adaptive Federated Optimization", https://arxiv.org/abs/2003.00295
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

SERVER_OPTIMIZERS = ('fedavg', 'fedavgm', 'fedadam', 'fedyogi', 'fedadagrad',
                     'fedadam_optax', 'fedyogi_optax', 'fedadagrad_optax')
CLIENT_OPTIMIZERS = ('sgd', 'momentum', 'adam')
_RULES = ('adam', 'yogi', 'adagrad')


class ReddiState(NamedTuple):
  """First and second moments of `reddi` (``m`` from 0, ``v`` from ``tau^2``)."""
  m: Any
  v: Any


def reddi(rule: str, learning_rate: float, *, b1: float = 0.9, b2: float = 0.99,
          tau: float = 1e-3) -> optax.GradientTransformation:
  """FedAdam, FedYogi or FedAdagrad exactly as Reddi et al. 2021, Algorithm 2.

  With ``g`` the server's pseudo-gradient (``-Delta_t``)::

    m_t = b1 m_{t-1} + (1 - b1) g
    v_t = v_{t-1} + g^2                                   (adagrad)
    v_t = v_{t-1} - (1 - b2) g^2 sign(v_{t-1} - g^2)      (yogi)
    v_t = b2 v_{t-1} + (1 - b2) g^2                       (adam)
    update = -learning_rate * m_t / (sqrt(v_t) + tau)

  with ``m_{-1} = 0`` and ``v_{-1} = tau^2``, and no bias correction.

  Args:
    rule: ``'adam'``, ``'yogi'`` or ``'adagrad'``.
    learning_rate: server learning rate ``eta`` (a float or a traced scalar).
    b1: first-moment decay ``beta_1``.
    b2: second-moment decay ``beta_2`` (adam, yogi).
    tau: adaptivity ``tau > 0``.

  Returns:
    An ``optax.GradientTransformation``.
  """
  if rule not in _RULES:
    raise ValueError(f'rule must be one of {_RULES}, got {rule!r}')

  def init(params):
    zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
    return ReddiState(m=zeros, v=jax.tree.map(lambda z: z + tau ** 2, zeros))

  def update(grads, state, params=None):
    del params
    g = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), grads)
    m = jax.tree.map(lambda m, g: b1 * m + (1.0 - b1) * g, state.m, g)
    if rule == 'adagrad':
      v = jax.tree.map(lambda v, g: v + g * g, state.v, g)
    elif rule == 'yogi':
      v = jax.tree.map(lambda v, g: v - (1.0 - b2) * g * g * jnp.sign(v - g * g), state.v, g)
    else:
      v = jax.tree.map(lambda v, g: b2 * v + (1.0 - b2) * g * g, state.v, g)
    updates = jax.tree.map(
        lambda m, v, x: (-learning_rate * m / (jnp.sqrt(v) + tau)).astype(jnp.result_type(x)),
        m, v, grads)
    return updates, ReddiState(m=m, v=v)

  return optax.GradientTransformation(init, update)


def server_optimizer(name: str, learning_rate: float = 1.0, *, momentum: float = 0.9,
                     b1: float = 0.9, b2: float = 0.99, eps: float = 1e-3,
                     initial_accumulator_value: float = 0.0) -> optax.GradientTransformation:
  """Server optimizer by name (see the module docstring).

  Args:
    name: one of `SERVER_OPTIMIZERS`.
    learning_rate: server learning rate.
    momentum: FedAvgM momentum.
    b1: first-moment decay of FedAdam/FedYogi/FedAdagrad.
    b2: second-moment decay of FedAdam/FedYogi.
    eps: adaptivity (tau in Reddi et al.), 1e-3 by default as in the paper.
    initial_accumulator_value: ``fedadagrad_optax``'s initial accumulator.

  Returns:
    An ``optax.GradientTransformation`` applied to ``-mean_delta``.
  """
  if name == 'fedavg':
    return optax.sgd(learning_rate)
  if name == 'fedavgm':
    return optax.sgd(learning_rate, momentum=momentum)
  if name in ('fedadam', 'fedyogi', 'fedadagrad'):
    return reddi(name[len('fed'):], learning_rate, b1=b1, b2=b2, tau=eps)
  if name == 'fedadam_optax':
    return optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)
  if name == 'fedyogi_optax':
    return optax.yogi(learning_rate, b1=b1, b2=b2, eps=eps)
  if name == 'fedadagrad_optax':
    return optax.adagrad(learning_rate, initial_accumulator_value=initial_accumulator_value,
                         eps=eps)
  raise ValueError(f'server optimizer {name!r} is unknown; allowed: {SERVER_OPTIMIZERS}')


def client_optimizer(name: str, learning_rate: float, *, momentum: float = 0.9,
                     b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                     weight_decay: float = 0.0) -> optax.GradientTransformation:
  """Client (local) optimizer by name: ``sgd``, ``momentum`` or ``adam``.

  The optimizer state is created fresh on every client in every round.
  """
  if name == 'sgd':
    tx = optax.sgd(learning_rate)
  elif name == 'momentum':
    tx = optax.sgd(learning_rate, momentum=momentum)
  elif name == 'adam':
    tx = optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)
  else:
    raise ValueError(f'client optimizer {name!r} is unknown; allowed: {CLIENT_OPTIMIZERS}')
  if weight_decay:
    tx = optax.chain(optax.add_decayed_weights(weight_decay), tx)
  return tx
