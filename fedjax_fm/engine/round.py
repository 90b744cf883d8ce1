"""One federated round as one compiled program.

``build_round`` returns ``FederatedRound(init, apply)``::

  state = fed_round.init(trainable_params, key)
  state, metrics = fed_round.apply(state, frozen, round_data)   # one jax.jit

``round_data`` is the padded array form of a round (see
`fedjax_fm.data.FederatedDataset.round_batch`)::

  batch          pytree of [C, S, B, ...]    client x local step x example
  example_mask   bool [C, S, B]
  step_mask      bool [C, S]
  weight         float [C]                   aggregation weight (e.g. examples)
  client_id      int [C]                     global client index
  client_mask    bool [C] (optional)         False for padding clients

Only the trainable pytree is per client, compressed and aggregated; the frozen
pytree is broadcast to every client and is never modified.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_fm import tree_util
from fedjax_fm.aggregate import attacks as attacks_lib
from fedjax_fm.aggregate import mean as mean_lib
from fedjax_fm.aggregate.base import StreamingAggregator
from fedjax_fm.compress import base as compress_base
from fedjax_fm.engine import client as client_lib
from fedjax_fm.engine import strategies


class ServerState(NamedTuple):
  """Everything the server carries from round to round."""
  params: Any            # trainable params (pytree)
  opt_state: Any         # server optimizer state
  client_store: Any      # per-client persistent state, leading axis num_clients; () if none
  key: jax.Array         # base PRNG key of the run
  round: jax.Array       # int32 round counter
  aux: Any = ()          # state of optional parts (e.g. adaptive clipping); () if none


class FederatedRound(NamedTuple):
  """``init`` and the jitted ``apply`` of a round, plus static byte counts."""
  init: Callable[..., ServerState]
  apply: Callable[..., tuple[ServerState, dict]]
  uplink_bytes_per_client: int     # from the compressor's payload arrays
  downlink_bytes_per_client: int   # the broadcast trainable params
  apply_fn: Callable[..., tuple[ServerState, dict]] | None = None   # ``apply``, not jitted


def _is_transformation(x) -> bool:
  return hasattr(x, 'init') and hasattr(x, 'update')


def build_round(loss_fn: client_lib.LossFn,
                params_like: Any,
                *,
                client_optimizer: optax.GradientTransformation,
                server_optimizer: optax.GradientTransformation,
                num_clients: int,
                strategy: str = 'chunked',
                chunk_size: int | None = None,
                mesh=None,
                prox_mu: float = 0.0,
                aggregator: StreamingAggregator | Any | None = None,
                compressor: compress_base.Compressor | None = None,
                downlink_compressor: compress_base.Compressor | None = None,
                pruning: bool = False,
                prune_scores: bool = False,
                privacy: Any = None,
                adaptive_clip: Any = None,
                attack: tuple[str, float] | None = None,
                guard_nonfinite: bool = True,
                lora_error: bool = False,
                donate: bool = False) -> FederatedRound:
  """Builds a federated round.

  Args:
    loss_fn: ``loss_fn(trainable, frozen, batch, key) -> per-example loss [B]``.
    params_like: the trainable params (or their ShapeDtypeStructs); fixes the
      structure the round is built for.
    client_optimizer: local optax optimizer (fresh state every round), or a
      function ``hparams -> optax.GradientTransformation`` whose hyperparameters
      (e.g. ``{'client_lr': ...}``) are arrays in the server state: rounds with
      different values then share one compiled program, and
      `fedjax_fm.engine.sweep` vmaps them.
    server_optimizer: optax optimizer applied to ``-mean_delta``, or a function
      of the same ``hparams``.
    num_clients: total clients in the population (size of the per-client store).
    strategy: ``vmap``, ``chunked`` or ``sharded``.
    chunk_size: clients per vmapped chunk (``chunked`` / per device for
      ``sharded``); default all clients (per device).
    mesh: device mesh with a ``clients`` axis for ``sharded`` (default: all
      local devices).
    prox_mu: FedProx coefficient (0 = FedAvg local objective).
    aggregator: a streaming aggregator (default: weighted mean), or a stacked
      one (an object with ``aggregate(updates [C, ...], weights [C])``, e.g.
      median or Krum) which sees all updates at once (memory O(C)).
    compressor: uplink compressor (default: identity).
    downlink_compressor: compresses the broadcast: the server keeps the model the
      clients hold (``aux['client_view']``) and each round sends the encoded
      difference to its own params; clients train from (and send deltas against)
      that view. The difference not yet sent carries over (error feedback on the
      server). Every client is assumed to hold the latest view.
    pruning: federated pruning: boolean masks in ``aux['masks']`` (set between
      rounds, e.g. by `fedjax_fm.prune.global_magnitude_masks`) zero the
      gradients of pruned weights in local training and keep them exactly 0.
    prune_scores: with pruning, every client also reports the dense gradient of
      its first batch at the global model (PruneFL-style; counted in the uplink
      bytes); its weighted mean is kept in ``aux['prune_scores']`` to choose
      which pruned weights to regrow (`fedjax_fm.prune.prune_and_regrow`).
    privacy: client-level DP: an object with ``clip(delta) -> (delta, norm)``,
      applied per client before encoding, and ``noise(key, mean, num_clients)``
      applied to the aggregate. With privacy, clients are averaged with
      uniform weights (the sensitivity of the mean is clip / clients).
    adaptive_clip: quantile-based adaptive clipping (an ``AdaptiveClip`` from
      `fedjax_fm.privacy`); the clip norm lives in ``ServerState.aux`` and
      follows the target quantile of the clients' update norms.
    attack: ``(kind, scale)`` to simulate malicious clients: the clients with
      ``round_data['attacker']`` set send a corrupted update (``sign_flip``,
      ``scale``, ``noise`` or ``nan``, see `fedjax_fm.aggregate.apply_attack`).
    lora_error: report each round ``lora_aggregation_error``, the Frobenius
      distance between the exact weighted mean of the clients' LoRA products
      ``mean_i(A_i B_i)`` and the product of the aggregated factors (0 for
      ``ffa``; the SVD tail for ``product``; see `fedjax_fm.peft.lora_aggregation`).
      Collects the updates ``[C, ...]`` (memory O(C)).
    guard_nonfinite: drop (weight 0) any client whose decoded update has a NaN
      or Inf, so it never reaches the model; counted in the metrics.
    donate: donate the server state's buffers to the round.

  Returns:
    A `FederatedRound`.
  """
  if strategy not in strategies.STRATEGIES:
    raise ValueError(f'strategy {strategy!r} is unknown; allowed: {strategies.STRATEGIES}')
  aggregator = aggregator or mean_lib.weighted_mean()
  stacked = hasattr(aggregator, 'aggregate')
  collect = stacked or lora_error
  products = getattr(aggregator, 'products', None)
  compressor = compressor or compress_base.identity()
  client_factory = None if _is_transformation(client_optimizer) else client_optimizer
  server_factory = None if _is_transformation(server_optimizer) else server_optimizer
  client_update = (None if client_factory else
                   client_lib.make_client_update(loss_fn, client_optimizer, prox_mu))

  def server_tx(aux):
    return server_factory(aux['hparams']) if server_factory else server_optimizer
  params_shape = jax.eval_shape(lambda p: p, params_like)
  uplink = compress_base.payload_nbytes(compressor, params_shape)
  if prune_scores and (not pruning or stacked):
    raise ValueError('prune_scores needs pruning=True and a streaming aggregator')
  if prune_scores:
    uplink += tree_util.tree_nbytes(params_shape)
  downlink = (tree_util.tree_nbytes(params_shape) if downlink_compressor is None else
              compress_base.payload_nbytes(downlink_compressor, params_shape))

  if adaptive_clip is not None and privacy is None:
    raise ValueError('adaptive_clip needs privacy (the clipping it adapts)')

  def init(params, key, hparams=None) -> ServerState:
    if (client_factory or server_factory) and hparams is None:
      raise ValueError('this round takes its optimizers\' hyperparameters from the state: '
                       'init(params, key, hparams={...})')
    client_state = compressor.init(params)
    store = jax.tree.map(
        lambda x: jnp.broadcast_to(x, (num_clients,) + x.shape).copy(), client_state)
    aux = {}
    if adaptive_clip is not None:
      aux['clip'] = adaptive_clip.init(privacy.clip_norm)
    if downlink_compressor is not None:
      aux['client_view'] = jax.tree.map(jnp.zeros_like, params)
      aux['downlink_state'] = downlink_compressor.init(params)
    if pruning:
      aux['masks'] = jax.tree.map(lambda p: jnp.ones(p.shape, bool), params)
    if prune_scores:
      aux['prune_scores'] = jax.tree.map(jnp.zeros_like, params)
    if products is not None:   # FLoRA-style stacking: dense update merged into the base
      like = jax.eval_shape(products, jax.tree.map(lambda p: p[None], params),
                            jnp.ones((1,), jnp.float32), params)
      aux['base_delta'] = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), like)
    if hparams is not None:
      aux['hparams'] = {k: jnp.asarray(v, jnp.float32) for k, v in hparams.items()}
    return ServerState(params=params, opt_state=server_tx(aux).init(params),
                       client_store=store, key=key, round=jnp.zeros((), jnp.int32),
                       aux=aux)

  def per_client(params, frozen, x):
    if pruning:
      params, masks = params
    else:
      masks = None
    train_key, encode_key = jax.random.split(x['key'])
    update_fn = client_update or client_lib.make_client_update(
        loss_fn, client_factory(x['hparams']), prox_mu)
    delta, metrics = update_fn(params, frozen, x['data'], train_key, masks)
    metrics['update_norm'] = tree_util.tree_norm(delta)
    if privacy is not None:
      delta, norm = privacy.clip(delta, clip_norm=x['clip_norm'])
      metrics['unclipped'] = norm <= x['clip_norm']
    payload, client_state = compressor.encode(encode_key, delta, x['client_state'])
    update = compressor.decode(payload)
    if attack is not None:
      kind, scale = attack
      bad = attacks_lib.apply_attack(jax.tree.map(lambda u: u[None], update),
                                     x['attacker'][None], kind, scale=scale,
                                     key=jax.random.fold_in(encode_key, 1))
      update = jax.tree.map(lambda u: u[0], bad)
    weight = x['weight']
    finite = jnp.asarray(True)
    if guard_nonfinite:
      finite = tree_util.tree_all_finite(update)
      update = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), update)
      weight = jnp.where(finite, weight, 0.0)
    metrics['finite'] = finite
    if prune_scores:   # dense gradient at the global model on the first batch
      first = jax.tree.map(lambda a: a[0], x['data'])
      scores = jax.grad(client_lib.masked_mean_loss, argnums=1)(
          loss_fn, params, frozen, first['batch'], first['example_mask'], train_key)
      ok = finite & tree_util.tree_all_finite(scores)
      scores = jax.tree.map(lambda g: jnp.where(ok, g, jnp.zeros_like(g)), scores)
      update = (update, scores)
    outputs = (client_state, metrics, (update, weight) if collect else ())
    if stacked:   # the stacked aggregator sees all updates after the strategy
      return jax.tree.map(jnp.zeros_like, update), jnp.zeros_like(weight), outputs
    return update, weight, outputs

  def apply(state: ServerState, frozen, round_data) -> tuple[ServerState, dict]:
    weight = jnp.asarray(round_data['weight'], jnp.float32)
    ids = jnp.asarray(round_data['client_id'], jnp.int32)
    mask = round_data.get('client_mask')
    mask = weight > 0 if mask is None else jnp.asarray(mask, bool)
    weight = jnp.where(mask, weight, 0.0)
    if privacy is not None:
      weight = mask.astype(jnp.float32)   # uniform weights bound the mean's sensitivity
    round_key = jax.random.fold_in(state.key, state.round)
    keys = jax.vmap(lambda i: jax.random.fold_in(round_key, i))(ids)
    store_ids = jnp.where(mask, ids, num_clients)   # padding clients scatter out of bounds
    client_states = jax.tree.map(lambda s: s.at[store_ids].get(mode='fill', fill_value=0),
                                 state.client_store)
    xs = {
        'data': {k: round_data[k] for k in ('batch', 'example_mask', 'step_mask')},
        'weight': weight,
        'key': keys,
        'client_state': client_states,
    }
    if client_factory is not None:
      xs['hparams'] = {k: jnp.broadcast_to(v, weight.shape)
                       for k, v in state.aux['hparams'].items()}
    clip_norm = None
    if privacy is not None:
      clip_norm = (state.aux['clip'].clip_norm if adaptive_clip is not None
                   else jnp.float32(privacy.clip_norm))
      xs['clip_norm'] = jnp.broadcast_to(clip_norm, weight.shape)
    if attack is not None:
      attacker = round_data.get('attacker')
      xs['attacker'] = (jnp.zeros(weight.shape, bool) if attacker is None
                        else jnp.asarray(attacker, bool))
    aux = state.aux
    # What the clients start from: the server params, or the view they were sent.
    start = state.params
    if downlink_compressor is not None:
      down_key = jax.random.fold_in(round_key, jnp.uint32(0xFFFFFFFE))
      payload, down_state = downlink_compressor.encode(
          down_key, tree_util.tree_sub(state.params, aux['client_view']),
          aux['downlink_state'])
      view = tree_util.tree_add(aux['client_view'], downlink_compressor.decode(payload))
      view = jax.tree.map(lambda v, p: v.astype(p.dtype), view, state.params)
      aux = dict(aux, client_view=view, downlink_state=down_state)
      start = view
    broadcast = (start, aux['masks']) if pruning else start
    run_aggregator = mean_lib.weighted_mean() if stacked else aggregator
    acc, (new_client_states, cm, collected) = strategies.run_clients(
        strategy, per_client, run_aggregator, broadcast, frozen, xs,
        chunk_size=chunk_size, mesh=mesh,
        update_like=(state.params, state.params) if prune_scores else state.params)
    if stacked:
      updates, weights = collected
      if getattr(aggregator, 'needs_params', False):
        mean_delta = aggregator.aggregate(updates, weights, state.params)
      else:
        mean_delta = aggregator.aggregate(updates, weights)
      agg_info = {'total_weight': jnp.sum(weights)}
      if products is not None:
        aux = dict(aux, base_delta=products(updates, weights, state.params))
    else:
      mean_delta, agg_info = aggregator.finalize(acc)
    lora_err = None
    if lora_error and products is None:   # `stack` is exact by construction
      from fedjax_fm.peft import lora_aggregation  # pylint: disable=g-import-not-at-top
      updates, weights = collected
      lora_err = lora_aggregation.aggregation_error(updates, weights, state.params,
                                                    aggregate=mean_delta, frozen=frozen)
    if prune_scores:
      mean_delta, mean_scores = mean_delta
      aux = dict(aux, prune_scores=mean_scores)
    if privacy is not None:
      noise_key = jax.random.fold_in(round_key, jnp.uint32(0xFFFFFFFF))
      mean_delta = privacy.noise(noise_key, mean_delta, jnp.sum(mask.astype(jnp.float32)),
                                 clip_norm=clip_norm)
      if adaptive_clip is not None:
        aux = dict(aux, clip=adaptive_clip.update(
            aux['clip'], cm['unclipped'], mask.astype(jnp.float32),
            jax.random.fold_in(noise_key, 1)))

    server_grad = jax.tree.map(lambda d, p: (-d).astype(p.dtype), mean_delta, state.params)
    updates, opt_state = server_tx(aux).update(server_grad, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if pruning:
      params = jax.tree.map(lambda p, m: jnp.where(m, p, 0), params, aux['masks'])
    store = jax.tree.map(lambda s, n: s.at[store_ids].set(n, mode='drop'),
                         state.client_store, new_client_states)

    fmask = mask.astype(jnp.float32)
    ok = mask & cm['finite'] & jnp.isfinite(cm['loss'])   # clients counted in the loss
    n = jnp.sum(fmask)
    metrics = {
        'train_loss': jnp.sum(jnp.where(ok, cm['loss'], 0.0)) / jnp.maximum(jnp.sum(ok), 1),
        'client_loss': cm['loss'],
        'client_examples': cm['examples'],
        'client_update_norm': cm['update_norm'],
        'client_mask': mask,
        'num_clients': n,
        'examples': jnp.sum(cm['examples'] * fmask),
        'steps': jnp.sum(cm['steps'] * fmask),
        'uplink_bytes': n * float(uplink),
        'downlink_bytes': n * float(downlink),
        'update_norm': tree_util.tree_norm(mean_delta),
        'param_norm': tree_util.tree_norm(params),
        'total_weight': agg_info['total_weight'],
        'nonfinite_clients': jnp.sum(fmask * (1.0 - cm['finite'].astype(jnp.float32))),
    }
    if lora_err is not None:
      metrics['lora_aggregation_error'] = lora_err
    if privacy is not None:
      metrics['clip_norm'] = clip_norm
      metrics['unclipped_fraction'] = (jnp.sum(fmask * cm['unclipped'].astype(jnp.float32))
                                       / jnp.maximum(n, 1.0))
    new_state = ServerState(params=params, opt_state=opt_state, client_store=store,
                            key=state.key, round=state.round + 1, aux=aux)
    return new_state, metrics

  jitted = jax.jit(apply, donate_argnums=(0,) if donate else ())
  return FederatedRound(init=init, apply=jitted, uplink_bytes_per_client=uplink,
                        downlink_bytes_per_client=downlink, apply_fn=apply)
