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

from fedjax_fm import stacking
from fedjax_fm import tree_util
from fedjax_fm.aggregate import base as aggregate_base
from fedjax_fm.aggregate import mean as mean_lib
from fedjax_fm.compress import base as compress_base
from fedjax_fm.engine import client as client_lib
from fedjax_fm.engine import strategies
from fedjax_fm.engine import uplink as uplink_lib
from fedjax_fm.engine import fednova as fednova_lib
from fedjax_fm.engine import scaffold as scaffold_lib


class DownlinkState(NamedTuple):
  """Compressed broadcast: the model the clients hold and the compressor's state."""
  view: Any
  compressor_state: Any


class PruneState(NamedTuple):
  """Federated pruning: boolean masks, and the mean dense scores for regrowth."""
  masks: Any
  scores: Any = ()


class ServerState(NamedTuple):
  """Everything the server carries from round to round (a checkpointed pytree).

  Optional parts are ``()`` when their feature is off.
  """
  params: Any            # trainable params (pytree)
  opt_state: Any         # server optimizer state
  client_store: Any      # per-client uplink state {step: state}, leading axis num_clients
  key: jax.Array         # base PRNG key of the run
  round: jax.Array       # int32 round counter
  clip: Any = ()         # adaptive clipping: privacy.AdaptiveClipState
  downlink: Any = ()     # DownlinkState
  prune: Any = ()        # PruneState
  base_delta: Any = ()   # an aggregator's merged base update (LoRA ``stack``)
  hparams: Any = ()      # {name: float32 scalar} read by optimizer factories
  control: Any = ()      # SCAFFOLD: the server's control variate c (like the params)


class Pruning(NamedTuple):
  """Federated pruning in the round.

  Attributes:
    scores: every client also reports the dense gradient of its first batch at
      the global model (PruneFL-style; counted in the uplink bytes); its weighted
      mean is kept in ``ServerState.prune.scores`` to choose which pruned weights
      to regrow (`fedjax_fm.prune.prune_and_regrow`).
  """
  scores: bool = False


class FederatedRound(NamedTuple):
  """``init`` and the jitted ``apply`` of a round, plus static byte counts."""
  init: Callable[..., ServerState]
  apply: Callable[..., tuple[ServerState, dict]]
  uplink_bytes_per_client: int     # from the compressor's payload arrays
  downlink_bytes_per_client: int   # the broadcast trainable params
  apply_fn: Callable[..., tuple[ServerState, dict]] | None = None   # ``apply``, not jitted
  frozen_view: Callable[[ServerState, Any], Any] | None = None      # the base clients train on
  layout: Any = None   # the `stacking.LayerStack` of ``stack_layers`` (None: canonical)
  # ``ServerState.params`` in the model's own layout (identity unless ``stack_layers``)
  canonical_params: Callable[[Any], Any] = lambda params: params


def client_metrics(cm: dict, mask: jax.Array) -> dict:
  """The metrics every round reports from its clients' outputs.

  Args:
    cm: per-client outputs ``[C]``: ``loss``, ``examples``, ``steps``,
      ``update_norm`` and ``finite`` (the update reached the aggregate).
    mask: bool ``[C]``, False for padding (and dropped) clients.
  """
  fmask = mask.astype(jnp.float32)
  ok = mask & cm['finite'] & jnp.isfinite(cm['loss'])   # clients counted in the loss
  return {
      'train_loss': jnp.sum(jnp.where(ok, cm['loss'], 0.0)) / jnp.maximum(jnp.sum(ok), 1),
      'client_loss': cm['loss'],
      'client_examples': cm['examples'],
      'client_update_norm': cm['update_norm'],
      'client_mask': mask,
      'num_clients': jnp.sum(fmask),
      'examples': jnp.sum(cm['examples'] * fmask),
      'steps': jnp.sum(cm['steps'] * fmask),
      'nonfinite_clients': jnp.sum(fmask * (1.0 - cm['finite'].astype(jnp.float32))),
  }


def _is_transformation(x) -> bool:
  return hasattr(x, 'init') and hasattr(x, 'update')


def _layer_layout(params_like, *, compressor, downlink_compressor, pruning, client_masks,
                  scaffold, privacy, attack, aggregator,
                  strict: bool) -> stacking.LayerStack | None:
  """The `LayerStack` of ``stack_layers`` (None: nothing to stack, or a part that acts
  leaf by leaf without ``strict``), or ValueError."""
  per_leaf = [what for given, what in (
      (compressor, 'compressor'), (downlink_compressor, 'downlink_compressor'),
      (pruning, 'pruning'), (client_masks, 'client_masks'), (scaffold, 'scaffold'))
      if given is not None]
  if privacy is not None and (getattr(privacy, 'distributed', None) is not None
                              or getattr(privacy, 'per_layer', True)):
    per_leaf.append('privacy (per-layer clipping or a distributed mechanism)')
  if attack is not None and attack[0] == 'noise':
    per_leaf.append("attack 'noise'")
  if not aggregator.leafwise:
    per_leaf.append(f'aggregator {aggregator.name or "(unnamed)"!r} (not leafwise)')
  if per_leaf and not strict:
    return None
  if per_leaf:
    raise ValueError('stack_layers=True keeps the layers stacked as one array per leaf; '
                     'these act leaf by leaf and would see a whole stack as one tensor: '
                     + ', '.join(per_leaf) + '. Pass stack_layers=False.')
  layout = stacking.layer_stack(params_like)
  return layout if layout.num_stacked else None


def build_round(loss_fn: client_lib.LossFn,
                params_like: Any,
                *,
                client_optimizer: optax.GradientTransformation | Callable,
                server_optimizer: optax.GradientTransformation | Callable,
                num_clients: int,
                strategy: str = 'chunked',
                chunk_size: int | str | None = None,
                mesh=None,
                prox_mu: float = 0.0,
                aggregator: aggregate_base.Aggregator | None = None,
                compressor: compress_base.Compressor | None = None,
                downlink_compressor: compress_base.Compressor | None = None,
                pruning: Pruning | None = None,
                privacy: Any = None,
                adaptive_clip: Any = None,
                attack: tuple[str, float] | None = None,
                guard_nonfinite: bool = True,
                fednova: fednova_lib.FedNova | None = None,
                scaffold: scaffold_lib.Scaffold | None = None,
                donate: bool = False,
                client_masks: Callable[[jax.Array], Any] | None = None,
                client_regularizer: Callable[[Any, Any], jax.Array] | None = None,
                stack_layers: bool | str = False,
                ) -> FederatedRound:
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
      ``sharded``). ``None`` (the default), ``0`` or ``'auto'``: the automatic
      size, the largest divisor of the clients (per device) within the
      backend's measured sweet spot (`fedjax_fm.engine.memory.auto_chunk_size`;
      `fedjax_fm.train` also bounds it by a memory budget and pads the round).
    mesh: device mesh with a ``clients`` axis for ``sharded`` (default: all
      local devices).
    prox_mu: FedProx coefficient (0 = FedAvg local objective).
    aggregator: an `fedjax_fm.aggregate.Aggregator` (default: the streaming
      weighted mean). A streaming one folds clients chunk by chunk (memory
      O(chunk)); a whole-round one (median, Krum, secure mean) sees all decoded
      updates ``[C, ...]`` at once (memory O(C)). Its ``info`` scalars become
      metrics; one with a ``base`` (LoRA ``stack``) moves the frozen base
      through ``ServerState.base_delta``, inside the round.
    compressor: uplink compressor (default: identity).
    downlink_compressor: compresses the broadcast: the server keeps the model the
      clients hold (``ServerState.downlink.view``) and each round sends the
      encoded difference to its own params; clients train from (and send deltas
      against) that view. The difference not yet sent carries over (error
      feedback on the server). Every client is assumed to hold the latest view.
    pruning: federated pruning (`Pruning`): boolean masks in
      ``ServerState.prune.masks`` (set between rounds, e.g. by
      `fedjax_fm.prune.global_magnitude_masks`) zero the gradients of pruned
      weights in local training and keep them exactly 0.
    privacy: client-level DP: an object with ``clip(delta) -> (delta, norm)``,
      applied per client before encoding, and ``noise(key, mean, num_clients)``
      applied to the aggregate. With privacy, clients are averaged with
      uniform weights (the sensitivity of the mean is clip / clients). When its
      ``distributed`` is set (`fedjax_fm.privacy.distributed.skellam_dp`) the
      mechanism is distributed: each client encodes its clipped update into
      noised ``b``-bit integers (the uplink payload; ``compressor`` must be
      None), the round sums them by the mechanism's secure aggregation (its
      whole-round aggregator; ``aggregator`` must be None) and the server adds
      no noise. The clients and the server share a key per round (the
      `RoundContext` key; clients read it as ``inputs['shared_key']``).
    adaptive_clip: quantile-based adaptive clipping (an ``AdaptiveClip`` from
      `fedjax_fm.privacy`); the clip norm lives in ``ServerState.clip`` and
      follows the target quantile of the clients' update norms.
    attack: ``(kind, scale)`` to simulate malicious clients: the clients with
      ``round_data['attacker']`` set send a corrupted update (``sign_flip``,
      ``scale``, ``noise`` or ``nan``, see `fedjax_fm.aggregate.apply_attack`).
    guard_nonfinite: drop (weight 0) any client whose decoded update has a NaN
      or Inf, so it never reaches the model; counted in the metrics.
    donate: donate the server state's buffers to the round.
    fednova: FedNova normalised averaging (`fedjax_fm.engine.fednova`): each
      client sends ``Delta_i / ||a_i||_1`` (``a_i`` the coefficients of its local
      optimizer over the steps it ran) and ``||a_i||_1``; the mean is rescaled by
      ``tau_eff = sum p_i ||a_i||_1`` (streaming sums).
    scaffold: SCAFFOLD (`fedjax_fm.engine.scaffold`, option II): the client
      variates live in ``client_store['scaffold']``, the server's in
      ``ServerState.control``; clients are averaged uniformly and the local
      optimizer must be SGD with ``scaffold.learning_rate``.
    FedNova and SCAFFOLD are not combined with each other, with privacy,
    compressors, attacks, pruning, whole-round or ``base`` aggregators or
    ``client_masks`` (ValueError).
    client_masks: per-client masks of the trainable params (heterogeneous LoRA
      ranks, `fedjax_fm.peft.hetlora`): ``client_masks(client_id) -> bool tree``
      shaped like the params, traced inside the round. A client starts from the
      global params zeroed outside its mask, trains only inside it (the pruning
      ``masks`` path: no gradient, pinned at 0) and sends only its masked
      entries; the server reads what it did not send as 0 (zero padding), so
      the aggregator sees ``where(mask, update, -global)``. ``uplink_bytes``
      then counts each client's masked entries (``uplink_bytes_dense``: the
      unmasked count). Not with ``privacy`` or a compressor. None: off.
      A `fedjax_fm.peft.hetlora.RankStore` (it has a ``store_key``) instead
      keeps each client's rank in ``client_store[store_key]``: the mask comes
      from the stored rank, and after local training its ``after_training``
      gives the rank written back and the mask of what the client sends
      (HetLoRA's rank self-pruning); a client whose update does not arrive
      keeps its rank. The metric ``client_rank`` is each client's rank after
      the round.
    client_regularizer: ``(params, mask) -> scalar`` added to every client's
      local objective (e.g. HetLoRA's rank self-pruning penalty); needs
      ``client_masks``.
    stack_layers: keep the trainable params with their layers stacked
      (`fedjax_fm.stacking`: ``layers.{i}`` subtrees become leaves
      ``[num_layers, ...]``) in the server state and through the round;
      ``loss_fn`` still receives the canonical params (slices, which a model
      scanning its layers takes back as the stacks). The per-leaf work of the
      round then does not grow with the depth. ``init`` takes the canonical
      params; ``FederatedRound.canonical_params(state.params)`` gives them
      back. The results are those of the canonical layout. Only with parts that act
      element by element or on the whole update: not with a compressor,
      pruning, ``client_masks``, SCAFFOLD, per-layer or distributed DP, a
      ``noise`` attack or an aggregator that is not ``leafwise`` (ValueError).
      ``'auto'``: stack when all parts allow it, else not.

  The per-client path after local training is the uplink chain
  (`fedjax_fm.engine.uplink`): clip (with ``privacy``) -> compress -> clip again
  (with ``privacy`` and a compressor: the decoded update, which is what is
  averaged, stays within the clip norm) -> attack (with ``attack``) ->
  non-finite guard (with ``guard_nonfinite``). With a distributed ``privacy``:
  clip -> attack -> `uplink.distributed_encode` (which re-clips, and sends a
  non-finite update as zeros with its noise share).

  Returns:
    A `FederatedRound`.
  """
  if strategy not in strategies.STRATEGIES:
    raise ValueError(f'strategy {strategy!r} is unknown; allowed: {strategies.STRATEGIES}')
  strategies.resolve_chunk_size(chunk_size, 1, 'cpu')   # validates it
  distributed = getattr(privacy, 'distributed', None) if privacy is not None else None
  if distributed is not None:
    if compressor is not None:
      raise ValueError('a distributed DP mechanism sends its own b-bit integers (they are '
                       'the compressed uplink): compressor must be None')
    if aggregator is not None and aggregator is not distributed.aggregator:
      raise ValueError('a distributed DP mechanism aggregates by its own secure sum: '
                       'aggregator must be None')
    if adaptive_clip is not None:
      raise ValueError('adaptive_clip is not supported with a distributed DP mechanism '
                       '(its scale and sensitivity are fixed by the clip norm)')
    aggregator = distributed.aggregator
  aggregator = aggregator or mean_lib.weighted_mean()
  if not isinstance(aggregator, aggregate_base.Aggregator):
    raise TypeError(f'aggregator must be a fedjax_fm.aggregate.Aggregator, got '
                    f'{type(aggregator).__name__}')
  whole_round = not aggregator.is_streaming
  scores = pruning is not None and pruning.scores
  if scores and whole_round:
    raise ValueError('Pruning(scores=True) needs a streaming aggregator (the scores are '
                     'a streaming mean beside it)')
  if adaptive_clip is not None and privacy is None:
    raise ValueError('adaptive_clip needs privacy (the clipping it adapts)')
  # ---- FedNova / SCAFFOLD: what they are defined and tested with
  if fednova is not None and scaffold is not None:
    raise ValueError('fednova and scaffold are two algorithms: pass one')
  if fednova is not None or scaffold is not None:
    algo = 'fednova' if fednova is not None else 'scaffold'
    for given, what in ((privacy, 'privacy'), (compressor, 'compressor'),
                        (downlink_compressor, 'downlink_compressor'), (attack, 'attack'),
                        (pruning, 'pruning'), (client_masks, 'client_masks')):
      if given is not None:
        raise ValueError(f'{algo} is not supported with {what}')
    if whole_round or aggregator.base is not None:
      raise ValueError(f'{algo} needs a streaming aggregator without a base (e.g. the '
                       'weighted mean)')
  # ---- per-client masks (heterogeneous LoRA ranks)
  if client_masks is not None and (privacy is not None or compressor is not None
                                   or downlink_compressor is not None):
    raise ValueError('client_masks: not with privacy (the zero padding of what a client '
                     'did not send is not bounded by its clip) nor with a compressor (its '
                     'payload is measured on the unmasked arrays)')
  if client_regularizer is not None and client_masks is None:
    raise ValueError('client_regularizer needs client_masks (it is given the client mask)')
  _rank_store = getattr(client_masks, 'store_key', None) is not None   # hetlora.RankStore
  layout = None
  if stack_layers not in (True, False, 'auto'):
    raise ValueError(f"stack_layers must be True, False or 'auto', got {stack_layers!r}")
  if stack_layers:
    layout = _layer_layout(params_like, compressor=compressor,
                           downlink_compressor=downlink_compressor, pruning=pruning,
                           client_masks=client_masks, scaffold=scaffold, privacy=privacy,
                           attack=attack, aggregator=aggregator,
                           strict=stack_layers is True)
  train_loss = layout.wrap_loss(loss_fn) if layout is not None else loss_fn
  compressor_given = compressor is not None
  compressor = compressor or compress_base.identity()
  steps = [uplink_lib.clip(privacy)] if privacy is not None else []
  if distributed is None:
    steps.append(uplink_lib.compress(compressor))
  if attack is not None:
    steps.append(uplink_lib.attack(*attack))
  if privacy is not None and distributed is None and (compressor_given or attack is not None):
    # A compressor may expand what it is given (stochastic rounding, error feedback
    # adding back residuals), and a simulated attacker scales or noises its update:
    # what is averaged is bounded again by the clip norm, so the sensitivity the
    # accountant assumes holds for what the server receives.
    steps.append(uplink_lib.clip(privacy, name='clip_decoded', report=False))
  if distributed is not None:   # the noised integers are the payload (last step)
    steps.append(uplink_lib.distributed_encode(distributed))
  elif guard_nonfinite:
    # Under DP a dropped client keeps its weight: the fixed denominator stays m.
    steps.append(uplink_lib.guard_nonfinite(keep_weight=privacy is not None))
  uplink = uplink_lib.chain(*steps)

  client_factory = None if _is_transformation(client_optimizer) else client_optimizer
  server_factory = None if _is_transformation(server_optimizer) else server_optimizer
  reg_kw = {} if client_regularizer is None else {'regularizer': client_regularizer}
  client_update = (None if client_factory else
                   client_lib.make_client_update(train_loss, client_optimizer, prox_mu,
                                                 **reg_kw))

  def server_tx(hparams):
    return server_factory(hparams) if server_factory else server_optimizer

  params_shape = jax.eval_shape(lambda p: p, params_like)
  uplink_bytes = (distributed.payload_nbytes if distributed is not None else
                  compress_base.payload_nbytes(compressor, params_shape))
  if scores:
    uplink_bytes += tree_util.tree_nbytes(params_shape)
  downlink_bytes = (tree_util.tree_nbytes(params_shape) if downlink_compressor is None else
                    compress_base.payload_nbytes(downlink_compressor, params_shape))
  score_mean = mean_lib.weighted_mean()
  if fednova is not None:   # ||a_i||_1 as a float32 beside the update
    uplink_bytes += 4
  if scaffold is not None:   # Delta c_i up, c down, both dense like the params
    uplink_bytes += tree_util.tree_nbytes(params_shape)
    downlink_bytes += tree_util.tree_nbytes(params_shape)

  def init(params, key, hparams=None) -> ServerState:
    if (client_factory or server_factory) and hparams is None:
      raise ValueError('this round takes its optimizers\' hyperparameters from the state: '
                       'init(params, key, hparams={...})')
    if layout is not None:   # the state keeps the layers stacked
      params = layout.stack(params)
    store = jax.tree.map(
        lambda x: jnp.broadcast_to(x, (num_clients,) + x.shape).copy(), uplink.init(params))
    if _rank_store:   # per-client ranks (peft.hetlora.RankStore)
      store = {**store, client_masks.store_key: client_masks.init(num_clients)}
    if scaffold is not None:   # SCAFFOLD: every client's variate c_i, from 0
      store = {**store, scaffold_lib.STORE_KEY: jax.tree.map(
          lambda p: jnp.zeros((num_clients,) + jnp.shape(p), jnp.result_type(p)), params)}
    hp = () if hparams is None else {k: jnp.asarray(v, jnp.float32)
                                     for k, v in hparams.items()}
    return ServerState(
        params=params, opt_state=server_tx(hp).init(params), client_store=store, key=key,
        round=jnp.zeros((), jnp.int32),
        clip=adaptive_clip.init(privacy.clip_norm) if adaptive_clip is not None else (),
        downlink=(DownlinkState(jax.tree.map(jnp.zeros_like, params),
                                downlink_compressor.init(params))
                  if downlink_compressor is not None else ()),
        prune=(PruneState(jax.tree.map(lambda p: jnp.ones(p.shape, bool), params),
                          jax.tree.map(jnp.zeros_like, params) if scores else ())
               if pruning is not None else ()),
        base_delta=aggregator.base.init(params) if aggregator.base is not None else (),
        hparams=hp,
        control=jax.tree.map(jnp.zeros_like, params) if scaffold is not None else ())

  def frozen_view(state: ServerState, frozen):
    """The frozen base the clients train on (moved by a ``base`` aggregator)."""
    if aggregator.base is None:
      return frozen
    return aggregator.base.apply(frozen, state.base_delta)

  def per_client(broadcast, frozen, x):
    params, masks = broadcast['params'], broadcast['masks']
    train_key, encode_key = jax.random.split(x['key'])
    update_fn = client_update or client_lib.make_client_update(
        train_loss, client_factory(x['hparams']), prox_mu, **reg_kw)
    if client_masks is not None:   # the client's share of the params (e.g. its LoRA rank)
      if _rank_store:   # from its stored rank (peft.hetlora.RankStore)
        stored = x['client_state'][client_masks.store_key]
        cmask = client_masks.masks(stored)
      else:
        cmask = client_masks(x['client_id'])
      params = jax.tree.map(lambda p, m: jnp.where(m, p, 0), params, cmask)
      masks = cmask if masks is None else jax.tree.map(jnp.logical_and, masks, cmask)
    ctrl_kw = {}
    if scaffold is not None:   # SCAFFOLD: local gradients corrected by c - c_i
      c_i = x['client_state'][scaffold_lib.STORE_KEY]
      ctrl_kw['correction'] = scaffold_lib.correction(broadcast['control'], c_i)
    delta, metrics = update_fn(params, frozen, x['data'], train_key, masks, **ctrl_kw)
    metrics['update_norm'] = uplink_lib.tree_norm(delta)
    local_delta = delta
    if _rank_store:   # e.g. HetLoRA's rank self-pruning: the rank kept and what is sent
      new_rank, cmask = client_masks.after_training(stored, params, delta)
    if fednova is not None:   # FedNova: the client sends Delta_i / ||a_i||_1
      nova_norm = fednova_lib.coefficient_norm(metrics['steps'], fednova.momentum,
                                               fednova.prox_alpha)
      delta = fednova_lib.normalize(delta, nova_norm)
    update, weight, client_state, step_metrics = uplink.apply(
        encode_key, delta, x['weight'], x['client_state'], x['inputs'])
    metrics.update(step_metrics)
    metrics.setdefault('finite', jnp.asarray(True))
    if client_masks is not None:   # zero padding: what was not sent reads as 0
      update = jax.tree.map(lambda u, m, p: jnp.where(m, u, -p.astype(u.dtype)),
                            update, cmask, broadcast['params'])
      metrics['uplink_bytes'] = sum(
          jnp.sum(m.astype(jnp.float32)) * p.dtype.itemsize
          for m, p in zip(jax.tree.leaves(cmask), jax.tree.leaves(broadcast['params'])))
    if _rank_store:   # a client whose update does not arrive keeps its rank
      metrics['client_rank'] = jnp.where(weight > 0, new_rank, stored)
      client_state = {**client_state, client_masks.store_key: metrics['client_rank']}
    contrib = {}
    outputs = {'client_state': client_state, 'metrics': metrics}
    if fednova is not None:   # streaming sums of p_i ||a_i||_1 and p_i
      contrib['nova'] = (nova_norm, weight)
    if scaffold is not None:   # option II; a client whose update is dropped keeps c_i
      arrived = weight > 0
      c_new, delta_c = scaffold_lib.control_update(
          c_i, broadcast['control'], local_delta, jnp.where(arrived, metrics['steps'], 0.0),
          scaffold.learning_rate)
      outputs['client_state'] = {**client_state, scaffold_lib.STORE_KEY: c_new}
      contrib['control'] = (delta_c, arrived.astype(jnp.float32))
    if whole_round:   # the aggregator sees all updates after the strategy
      outputs['updates'] = (update, weight)
    else:
      contrib['update'] = (update, weight)
    if scores:   # dense gradient at the global model on the first batch
      first = jax.tree.map(lambda a: a[0], x['data'])
      grads = jax.grad(client_lib.masked_mean_loss, argnums=1)(
          loss_fn, params, frozen, first['batch'], first['example_mask'], train_key)
      ok = metrics['finite'] & uplink_lib.tree_all_finite(grads)
      grads = jax.tree.map(lambda g: jnp.where(ok, g, jnp.zeros_like(g)), grads)
      contrib['scores'] = (grads, jnp.where(ok, weight, 0.0))
    return contrib, outputs

  def make_reducer(params):
    zero = {}
    if not whole_round:
      zero['update'] = aggregator.zero(params)
    if scores:
      zero['scores'] = score_mean.zero(params)
    if fednova is not None:
      zero['nova'] = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    if scaffold is not None:
      zero['control'] = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)

    def accumulate(acc, contribs, broadcast):
      out = dict(acc)
      if 'update' in acc:
        updates, weights = contribs['update']
        out['update'] = aggregator.accumulate(acc['update'], updates, weights,
                                              broadcast['params'])
      if 'scores' in acc:
        grads, weights = contribs['scores']
        out['scores'] = score_mean.accumulate(acc['scores'], grads, weights)
      if 'nova' in acc:
        norms, weights = contribs['nova']
        out['nova'] = (acc['nova'][0] + jnp.sum(weights * norms),
                       acc['nova'][1] + jnp.sum(weights))
      if 'control' in acc:
        delta_c, arrived = contribs['control']
        out['control'] = jax.tree.map(
            lambda a, d: a + jnp.tensordot(arrived, d.astype(jnp.float32), axes=1),
            acc['control'], delta_c)
      return out

    return strategies.Reducer(zero, accumulate)

  def apply(state: ServerState, frozen, round_data) -> tuple[ServerState, dict]:
    weight = jnp.asarray(round_data['weight'], jnp.float32)
    ids = jnp.asarray(round_data['client_id'], jnp.int32)
    mask = round_data.get('client_mask')
    mask = weight > 0 if mask is None else jnp.asarray(mask, bool)
    weight = jnp.where(mask, weight, 0.0)
    if privacy is not None:
      weight = mask.astype(jnp.float32)   # uniform weights bound the mean's sensitivity
    if scaffold is not None:
      weight = mask.astype(jnp.float32)   # SCAFFOLD: the uniform mean over S
    round_key = jax.random.fold_in(state.key, state.round)
    # The round's shared key: a whole-round aggregator's RoundContext key, and, for
    # a distributed DP mechanism, the clients' too (the rotation they all apply).
    context_key = jax.random.fold_in(round_key, jnp.uint32(0xFFFFFFFD))
    keys = jax.vmap(lambda i: jax.random.fold_in(round_key, i))(ids)
    store_ids = jnp.where(mask, ids, num_clients)   # padding clients scatter out of bounds
    client_states = jax.tree.map(lambda s: s.at[store_ids].get(mode='fill', fill_value=0),
                                 state.client_store)
    inputs = {}
    clip_norm = None
    if privacy is not None:
      clip_norm = (state.clip.clip_norm if adaptive_clip is not None
                   else jnp.float32(privacy.clip_norm))
      inputs['clip_norm'] = jnp.broadcast_to(clip_norm, weight.shape)
    if distributed is not None:
      inputs['shared_key'] = jnp.broadcast_to(context_key, weight.shape)
    if attack is not None:
      attacker = round_data.get('attacker')
      inputs['attacker'] = (jnp.zeros(weight.shape, bool) if attacker is None
                            else jnp.asarray(attacker, bool))
    xs = {
        'data': {k: round_data[k] for k in ('batch', 'example_mask', 'step_mask')},
        'weight': weight,
        'key': keys,
        'client_state': client_states,
        'inputs': inputs,
    }
    if client_masks is not None:
      xs['client_id'] = ids
    if client_factory is not None:
      xs['hparams'] = {k: jnp.broadcast_to(v, weight.shape)
                       for k, v in state.hparams.items()}
    new = {}
    # What the clients start from: the server params, or the view they were sent.
    start = state.params
    if downlink_compressor is not None:
      down_key = jax.random.fold_in(round_key, jnp.uint32(0xFFFFFFFE))
      payload, down_state = downlink_compressor.encode(
          down_key, tree_util.tree_sub(state.params, state.downlink.view),
          state.downlink.compressor_state)
      view = tree_util.tree_add(state.downlink.view, downlink_compressor.decode(payload))
      view = jax.tree.map(lambda v, p: v.astype(p.dtype), view, state.params)
      new['downlink'] = DownlinkState(view, down_state)
      start = view
    broadcast = {'params': start,
                 'masks': state.prune.masks if pruning is not None else None}
    if scaffold is not None:
      broadcast['control'] = state.control
    base = frozen_view(state, frozen)
    if layout is not None:   # the frozen layers too, once a round, not in every step
      base_layout = stacking.layer_stack(base)
      if base_layout.num_stacked:
        base = stacking.Stacked(base_layout, base_layout.stack(base))
    acc, outputs = strategies.run_clients(
        strategy, per_client, make_reducer(start), broadcast, base, xs,
        chunk_size=chunk_size, mesh=mesh)
    cm = outputs['metrics']
    if whole_round:
      updates, weights = outputs['updates']
      context = aggregate_base.RoundContext(key=context_key, client_id=ids)
      mean_delta, agg_info = aggregator.aggregate(updates, weights, start, context=context)
    else:
      mean_delta, agg_info = aggregator.finalize(acc['update'], start)
    agg_info = dict(agg_info)
    if fednova is not None:   # Delta = tau_eff * sum p_i d_i
      tau_eff = acc['nova'][0] / jnp.maximum(acc['nova'][1], 1e-30)
      mean_delta = jax.tree.map(lambda d: d * tau_eff.astype(d.dtype), mean_delta)
      agg_info['fednova_tau_eff'] = tau_eff
    if scaffold is not None:   # c <- c + (1/N) sum_{i in S} Delta c_i
      new['control'] = jax.tree.map(lambda c, s: c + (s / num_clients).astype(c.dtype),
                                    state.control, acc['control'])
    if aggregator.base is not None:
      increment = agg_info.pop('base_delta')
      new['base_delta'] = jax.tree.map(jnp.add, state.base_delta, increment)
    if scores:
      mean_scores, _ = score_mean.finalize(acc['scores'])
      new['prune'] = state.prune._replace(scores=mean_scores)
    if privacy is not None:
      noise_key = jax.random.fold_in(round_key, jnp.uint32(0xFFFFFFFF))
      if layout is not None:   # the noise is drawn leaf by leaf of the canonical layout
        mean_delta = layout.stack(privacy.noise(
            noise_key, layout.unstack(mean_delta), jnp.sum(mask.astype(jnp.float32)),
            clip_norm=clip_norm))
      else:
        mean_delta = privacy.noise(noise_key, mean_delta, jnp.sum(mask.astype(jnp.float32)),
                                   clip_norm=clip_norm)
      if adaptive_clip is not None:
        new['clip'] = adaptive_clip.update(
            state.clip, cm['unclipped'], mask.astype(jnp.float32),
            jax.random.fold_in(noise_key, 1))

    server_grad = jax.tree.map(lambda d, p: (-d).astype(p.dtype), mean_delta, state.params)
    updates, opt_state = server_tx(state.hparams).update(server_grad, state.opt_state,
                                                         state.params)
    params = optax.apply_updates(state.params, updates)
    if pruning is not None:
      params = jax.tree.map(lambda p, m: jnp.where(m, p, 0), params, state.prune.masks)
    store = jax.tree.map(lambda s, n: s.at[store_ids].set(n, mode='drop'),
                         state.client_store, outputs['client_state'])

    fmask = mask.astype(jnp.float32)
    n = jnp.sum(fmask)
    update_norm, param_norm = uplink_lib.tree_norms(mean_delta, params)   # one reduction
    metrics = {
        **client_metrics(cm, mask),
        'uplink_bytes': n * float(uplink_bytes),
        'downlink_bytes': n * float(downlink_bytes),
        'update_norm': update_norm,
        'param_norm': param_norm,
    }
    metrics.update(agg_info)
    if 'dropped' in round_data:   # system heterogeneity (engine.heterogeneity)
      metrics['dropped_clients'] = jnp.sum(jnp.asarray(round_data['dropped'], jnp.float32))
      metrics['mean_steps'] = metrics['steps'] / jnp.maximum(n, 1.0)
    if client_masks is not None:   # each client at its own mask (e.g. LoRA rank)
      metrics['uplink_bytes_dense'] = metrics['uplink_bytes']
      metrics['uplink_bytes'] = jnp.sum(cm['uplink_bytes'] * fmask)
      metrics['client_uplink_bytes'] = cm['uplink_bytes'] * fmask
    if _rank_store:
      metrics['client_rank'] = jnp.where(mask, cm['client_rank'], 0)
    if privacy is not None:
      metrics['clip_norm'] = clip_norm
      metrics['unclipped_fraction'] = (jnp.sum(fmask * cm['unclipped'].astype(jnp.float32))
                                       / jnp.maximum(n, 1.0))
    if distributed is not None:   # clients whose rounding fell back to the zero vector
      metrics['dp_rounding_fallbacks'] = jnp.sum(
          fmask * (1.0 - cm['rounding_ok'].astype(jnp.float32)))
    new_state = state._replace(params=params, opt_state=opt_state, client_store=store,
                               round=state.round + 1, **new)
    return new_state, metrics

  jitted = jax.jit(apply, donate_argnums=(0,) if donate else ())
  return FederatedRound(init=init, apply=jitted, uplink_bytes_per_client=uplink_bytes,
                        downlink_bytes_per_client=downlink_bytes, apply_fn=apply,
                        frozen_view=(jax.jit(frozen_view) if aggregator.base is not None
                                     else frozen_view),
                        layout=layout,
                        **({'canonical_params': jax.jit(layout.unstack)} if layout is not None
                           else {}))
