"""Client and server optimizers, all plain optax transformations.

The server treats the negated aggregated delta as a gradient (Reddi et al.,
"Adaptive Federated Optimization", https://arxiv.org/abs/2003.00295), so every
server optimizer is an ``optax.GradientTransformation``:

====================  ==============================================
name                  transformation
====================  ==============================================
``fedavg``            ``sgd(lr)`` (lr = 1 is plain FedAvg)
``fedavgm``           ``sgd(lr, momentum)``
``fedadam``           ``adam(lr, b1, b2, eps)``
``fedyogi``           ``yogi(lr, b1, b2, eps)``
``fedadagrad``        ``adagrad(lr, initial_accumulator_value, eps)``
====================  ==============================================
"""

from __future__ import annotations

import optax

SERVER_OPTIMIZERS = ('fedavg', 'fedavgm', 'fedadam', 'fedyogi', 'fedadagrad')
CLIENT_OPTIMIZERS = ('sgd', 'momentum', 'adam')


def server_optimizer(name: str, learning_rate: float = 1.0, *, momentum: float = 0.9,
                     b1: float = 0.9, b2: float = 0.99, eps: float = 1e-3,
                     initial_accumulator_value: float = 0.0) -> optax.GradientTransformation:
  """Server optimizer by name (see the module docstring).

  Args:
    name: one of `SERVER_OPTIMIZERS`.
    learning_rate: server learning rate.
    momentum: FedAvgM momentum.
    b1: first-moment decay of FedAdam/FedYogi.
    b2: second-moment decay of FedAdam/FedYogi.
    eps: adaptivity (tau in Reddi et al.), 1e-3 by default as in the paper.
    initial_accumulator_value: FedAdagrad's initial accumulator.

  Returns:
    An ``optax.GradientTransformation`` applied to ``-mean_delta``.
  """
  if name == 'fedavg':
    return optax.sgd(learning_rate)
  if name == 'fedavgm':
    return optax.sgd(learning_rate, momentum=momentum)
  if name == 'fedadam':
    return optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)
  if name == 'fedyogi':
    return optax.yogi(learning_rate, b1=b1, b2=b2, eps=eps)
  if name == 'fedadagrad':
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
