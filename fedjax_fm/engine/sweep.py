"""Vectorised hyperparameter search: N settings as one more array axis.

Every member of a sweep runs the same round on the same clients and data with
its own hyperparameters (e.g. client and server learning rates) and its own
seed; the N rounds are ONE compiled program (``jax.vmap`` of the round over the
server states), so a sweep costs one compilation and fills the device with N
times the work.

  fed = engine.build_round(loss_fn, params,
                           client_optimizer=lambda h: optax.sgd(h['client_lr']),
                           server_optimizer=lambda h: optax.adam(h['server_lr']), ...)
  sweep = engine.build_sweep(fed)
  states = sweep.init(params, jax.random.split(key, 3),
                      {'client_lr': jnp.array([.1, .1, .3]),
                       'server_lr': jnp.array([1e-3, 1e-2, 1e-2])})
  states, metrics = sweep.apply(states, frozen, round_data)   # metrics leaves: [N, ...]

The round must read its hyperparameters from the state (optimizers given as
functions of ``hparams``, see `build_round`). Strategies ``vmap`` and
``chunked`` are supported.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax

from fedjax_fm.engine.round import FederatedRound


class Sweep(NamedTuple):
  init: Callable
  apply: Callable


def build_sweep(fed_round: FederatedRound) -> Sweep:
  """Lifts a round over a leading sweep axis of server states."""
  if fed_round.apply_fn is None:
    raise ValueError('fed_round has no apply_fn; build it with engine.build_round')

  def init(params, keys, hparams):
    return jax.vmap(lambda k, h: fed_round.init(params, k, hparams=h))(keys, hparams)

  apply = jax.jit(jax.vmap(fed_round.apply_fn, in_axes=(0, None, None)))
  return Sweep(init=init, apply=apply)
