"""Local training of one client: a `lax.scan` over its local steps.

The function built here sees a single client; the execution strategies in
`fedjax_fm.engine.strategies` map it over the clients axis.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from fedjax_fm import tree_util

# loss_fn(trainable, frozen, batch, key) -> per-example loss [B]
LossFn = Callable[[Any, Any, Any, jax.Array], jax.Array]


def masked_mean_loss(loss_fn: LossFn, params, frozen, batch, example_mask, key):
  """Mean of the per-example losses over the real (unmasked) examples."""
  per_example = loss_fn(params, frozen, batch, key)
  mask = example_mask.astype(per_example.dtype)
  count = jnp.maximum(jnp.sum(mask), 1.0)
  return jnp.sum(per_example * mask) / count


def make_client_update(loss_fn: LossFn, client_optimizer: optax.GradientTransformation,
                       prox_mu: float = 0.0, regularizer: Callable | None = None):
  """Builds ``client_update(global_params, frozen, data, key) -> (delta, metrics)``.

  Args:
    loss_fn: per-example loss of the trainable params given the frozen ones.
    client_optimizer: optax transformation; its state starts fresh each round.
    prox_mu: FedProx proximal coefficient: the local objective gets
      ``prox_mu / 2 * ||params - global_params||^2`` (Li et al. 2020,
      https://arxiv.org/abs/1812.06127). 0 gives FedAvg.
    regularizer: optional ``regularizer(params, masks) -> scalar`` added to the
      local objective (e.g. `fedjax_fm.peft.hetlora.self_pruning_penalty`).

  Returns:
    The client update. ``data`` holds ``batch`` (leaves ``[S, B, ...]``),
    ``example_mask [S, B]`` and ``step_mask [S]``; a masked step leaves the
    params and optimizer state untouched, so padding never changes the result.
    ``delta = local_params - global_params``; metrics are the mean training
    loss over real steps (summed in float32), the number of real steps and
    examples.
  """

  def objective(params, global_params, frozen, batch, example_mask, key, masks=None):
    loss = masked_mean_loss(loss_fn, params, frozen, batch, example_mask, key)
    total = loss
    if prox_mu:
      diff = tree_util.tree_sub(params, global_params)
      total = loss + 0.5 * prox_mu * tree_util.tree_vdot(diff, diff)
    if regularizer is not None:
      total = total + regularizer(params, masks)
    return total, loss

  grad_fn = jax.value_and_grad(objective, has_aux=True)

  def client_update(global_params, frozen, data, key, masks=None, correction=None):
    """One client's local training; ``masks`` (bool tree) pins pruned weights to 0.

    ``correction`` (a tree like the params, optional): added to every local
    gradient before the optimizer (SCAFFOLD's ``c - c_i``).
    """
    opt_state = client_optimizer.init(global_params)
    num_steps = data['step_mask'].shape[0]
    steps_data = jax.tree.map(jnp.asarray,
                              (data['batch'], data['example_mask'], data['step_mask']))

    def step(carry, s):
      params, opt_state, loss_sum = carry
      # The step indexes its data rather than scanning over it: under vmap the
      # clients axis stays leading, and the round's data is never transposed.
      batch, example_mask, step_mask = jax.tree.map(lambda a: a[s], steps_data)
      (_, loss), grads = grad_fn(params, global_params, frozen, batch, example_mask,
                                 jax.random.fold_in(key, s), masks)
      if correction is not None:   # SCAFFOLD: g - c_i + c
        grads = jax.tree.map(lambda g, c: g + c.astype(g.dtype), grads, correction)
      if masks is not None:   # federated pruning: pruned weights get no gradient...
        grads = jax.tree.map(lambda g, m: jnp.where(m, g, 0), grads, masks)
      updates, new_opt_state = client_optimizer.update(grads, opt_state, params)
      new_params = optax.apply_updates(params, updates)
      if masks is not None:   # ... and stay exactly zero whatever the optimizer does
        new_params = jax.tree.map(lambda p, m: jnp.where(m, p, 0), new_params, masks)
      params = tree_util.tree_select(step_mask, new_params, params)
      opt_state = tree_util.tree_select(step_mask, new_opt_state, opt_state)
      loss_sum = loss_sum + jnp.where(step_mask, loss, 0.0).astype(jnp.float32)
      return (params, opt_state, loss_sum), None

    carry = (global_params, opt_state, jnp.zeros((), jnp.float32))
    (params, _, loss_sum), _ = jax.lax.scan(step, carry, jnp.arange(num_steps))
    delta = tree_util.tree_sub(params, global_params)
    real_steps = jnp.sum(data['step_mask'].astype(jnp.float32))
    metrics = {
        'loss': loss_sum / jnp.maximum(real_steps, 1.0),
        'steps': real_steps,
        'examples': jnp.sum(data['example_mask'].astype(jnp.float32)),
    }
    return delta, metrics

  return client_update
