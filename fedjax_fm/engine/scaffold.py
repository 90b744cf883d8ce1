"""SCAFFOLD: stochastic controlled averaging with control variates.

Karimireddy, Kale, Mohri, Reddi, Stich, Suresh 2020, "SCAFFOLD: Stochastic
Controlled Averaging for Federated Learning", https://arxiv.org/abs/1910.06378,
Algorithm 1 with option II for the control variates.

Every client ``i`` keeps a control variate ``c_i`` (in the round's per-client
store, gathered and scattered by client id inside the compiled round) and the
server keeps ``c`` (``ServerState.control``). A round over the sampled set
``S`` of a population of ``N`` clients::

  client i:  y_i <- x;  K_i times:  y_i <- y_i - eta_l (g_i(y_i) - c_i + c)
             c_i+ = c_i - c + (x - y_i) / (K_i eta_l)                    (option II)
             sends Delta y_i = y_i - x and Delta c_i = c_i+ - c_i;  c_i <- c_i+
  server:    x <- x + eta_g mean_{i in S} Delta y_i
             c <- c + (1 / N) sum_{i in S} Delta c_i     (= |S|/N times the mean)

The local step is plain SGD with learning rate ``eta_l`` (the paper defines
SCAFFOLD for SGD; option II divides by ``K_i eta_l``, which has no meaning for
an adaptive optimizer, so only SGD is accepted). ``K_i`` is the number of steps
the client completed (heterogeneous budgets give each client its own ``K_i``).
The mean over ``S`` is uniform as in the paper; a client whose update does not
arrive keeps its ``c_i``. Both messages cross the uplink (twice the dense
bytes) and the server sends ``x`` and ``c`` (twice the downlink bytes).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

STORE_KEY = 'scaffold'   # the client variate's entry in ServerState.client_store


class Scaffold(NamedTuple):
  """SCAFFOLD in `fedjax_fm.engine.build_round`.

  Attributes:
    learning_rate: the clients' SGD learning rate ``eta_l`` (option II).
  """
  learning_rate: float


def correction(c: Any, c_i: Any) -> Any:
  """``c - c_i``: added to every local gradient of client ``i``."""
  return jax.tree.map(jnp.subtract, c, c_i)


def control_update(c_i: Any, c: Any, delta_y: Any, steps, learning_rate) -> tuple[Any, Any]:
  """Option II: ``c_i+ = c_i - c + (x - y_i) / (K_i eta_l)``; returns ``(c_i+, Delta c_i)``.

  A client with no step (``steps == 0``) keeps its variate (``Delta c_i = 0``).
  """
  k = jnp.asarray(steps, jnp.float32)
  ok = k > 0
  scale = 1.0 / (jnp.where(ok, k, 1.0) * jnp.float32(learning_rate))
  new = jax.tree.map(lambda ci, cc, dy: jnp.where(ok, ci - cc - dy * scale.astype(dy.dtype), ci),
                     c_i, c, delta_y)
  return new, jax.tree.map(jnp.subtract, new, c_i)


def server_update(x: Any, c: Any, mean_delta_y: Any, sum_delta_c: Any, num_clients: int,
                  server_learning_rate: float = 1.0) -> tuple[Any, Any]:
  """``x + eta_g mean Delta y``, ``c + sum Delta c / N`` (for use from plain JAX)."""
  new_x = jax.tree.map(lambda p, d: p + server_learning_rate * d, x, mean_delta_y)
  new_c = jax.tree.map(lambda cc, s: cc + s / num_clients, c, sum_delta_c)
  return new_x, new_c
