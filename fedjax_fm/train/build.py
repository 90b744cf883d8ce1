"""Builds an experiment from its config: the only code that reads the config.

`build_experiment(config, workdir)` validates the config and builds the task
data, the model and its PEFT split, the federated round (aggregator, privacy,
compression, pruning) and the evaluator. Each family of named parts is a
registry (`fedjax_fm.train.registries`) that `config.validate` reads too.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
import optax

from fedjax_fm import aggregate as aggregate_lib
from fedjax_fm import compress as compress_lib
from fedjax_fm import config as config_lib
from fedjax_fm import engine
from fedjax_fm import evaluation
from fedjax_fm import models
from fedjax_fm import peft
from fedjax_fm import privacy as privacy_lib
from fedjax_fm import sharding
from fedjax_fm.engine import memory as memory_lib
from fedjax_fm.engine import sampling
from fedjax_fm.train import registries
from fedjax_fm.train.evaluate import make_evaluator
from fedjax_fm.train.logs import log
from fedjax_fm.train.task_data import TaskData
from fedjax_fm.train.task_data import build_task_data


@dataclasses.dataclass
class Experiment:
  """Everything `run` builds, exposed for tests, notebooks and scripts."""
  config: ml_collections.ConfigDict
  data: TaskData
  split: peft.Split
  task: models.Task
  fed_round: engine.FederatedRound
  evaluate: Callable[[Any], dict[str, float]]
  round_data: Callable[[int], dict]
  mesh: Any = None
  accountant: Any = None    # privacy accountant (host side), when DP is on


# -------------------------------------------------------------------- model

def build_model(config, task_data: TaskData):
  """Returns (nnx model, Task) for the config (`registries.MODELS`)."""
  return registries.MODELS[config.model.kind](config, task_data)


def build_split(config, model) -> peft.Split:
  """The trainable/frozen split of the PEFT route (`registries.PEFT_METHODS`).

  For ``slora`` this is its first stage (sparse fine-tuning). With
  ``model.base_quant`` the frozen projections are quantized first (QLoRA-style).
  """
  m = config.model
  if m.base_quant != 'none':
    report = peft.quantize_base(model, m.base_quant, m.base_quant_block_size)
    log(f'frozen base: {len(report.paths)} projections quantized to {m.base_quant} '
        f'(blocks of {m.base_quant_block_size}), {report.frozen_bytes_before / 2**20:.1f} '
        f'-> {report.frozen_bytes_after / 2**20:.1f} MiB')
  return registries.PEFT_METHODS[config.peft.method](config, model)


# ------------------------------------------------------------------- build

def split_task_data(config, task_data: TaskData) -> TaskData:
  """Each client's local test part (``eval.federated_test_fraction > 0``), seeded.

  The held-out split itself (``data.eval_split``) is drawn in `build_task_data`,
  before the partition; this splits the partitioned clients' examples.
  """
  if config.eval.federated_test_fraction:
    train_ds, test_ds = evaluation.split_clients(
        task_data.train, config.eval.federated_test_fraction, config.seed)
    task_data = dataclasses.replace(task_data, train=train_ds, client_test=test_ds)
  return task_data


def build_experiment(config: ml_collections.ConfigDict, workdir: str | None = None,
                     mesh=None, *, model=None, task_data: TaskData | None = None,
                     validate: bool = True) -> Experiment:
  """Validates the config and builds data, model split, round and evaluator.

  Args:
    config: the experiment config.
    workdir: where a trained tokenizer is written (default: the current directory).
    mesh: a ``(clients, model)`` mesh; with ``fl.strategy="sharded"`` and none
      given, one over all (global) devices, the frozen base sharded over
      ``model`` (``fl.model_axis`` devices).
    model: an nnx model that already carries its LoRA (the second stage of
      SLoRA: LoRA initialised from the first stage's update); its LoRA split is
      trained.
    task_data: reuse already built task data (a later stage of the same run).
    validate: validate the config first.

  Returns:
    An `Experiment`.
  """
  f = config.fl
  if f.strategy == 'sharded' and mesh is None:
    config_lib.validate(config, num_devices=max(jax.device_count() // f.model_axis, 1))
    mesh = sharding.make_mesh(model=f.model_axis)
  num_devices = mesh.shape['clients'] if mesh is not None else None
  if validate:
    config_lib.validate(config, num_devices=num_devices)
  if task_data is None:
    task_data = split_task_data(config, build_task_data(config, workdir or '.'))
  p = config.peft
  sparse_stage = p.method == 'slora' and model is None
  if model is None:
    model, task = build_model(config, task_data)
    split = build_split(config, model)
  else:   # a model that already carries its LoRA (SLoRA's second stage)
    task = registries.task_of(config)
    split = peft.split_model(model, 'lora', extra_trainable=tuple(p.extra_trainable))
    if p.lora_aggregation == 'ffa':
      split = peft.lora_aggregation.freeze_lora_a(split)
  loss_fn = models.make_loss_fn(split.graphdef, task)
  population = task_data.train.num_clients

  # ---- privacy
  dp, adaptive, noise_multiplier = None, None, 0.0
  pv = config.privacy
  skellam = pv.enabled and pv.mechanism == 'skellam'
  if skellam:   # distributed: clients noise b-bit integers, summed by secure aggregation
    dim = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(split.trainable))
    noise_multiplier = pv.noise_multiplier
    if pv.target_epsilon:
      noise_multiplier = privacy_lib.skellam_noise_multiplier_for_epsilon(
          pv.target_epsilon, f.clients_per_round / population, config.num_rounds, pv.delta,
          dim=dim, clip_norm=pv.clip_norm, expected_clients=f.clients_per_round,
          bits=pv.bits, beta=pv.beta)
    dp = privacy_lib.distributed.skellam_dp(
        split.trainable, pv.clip_norm, noise_multiplier, f.clients_per_round, pv.bits,
        beta=pv.beta, per_layer=pv.per_layer)
    sp = dp.distributed.params
    log(f'distributed Skellam DP: {sp.dim:,} coordinates padded to {sp.padded_dim:,}, '
        f'{sp.bits}-bit secure aggregation, scale {sp.scale:.4g}, noise multiplier '
        f'{noise_multiplier:.4g}, rounding inflates the sensitivity by '
        f'{100 * (sp.quantization_inflation - 1):.3g}%')
  elif pv.enabled:
    noise_multiplier = pv.noise_multiplier
    if pv.target_epsilon:   # calibrated over all the run's rounds (every stage)
      noise_multiplier = privacy_lib.noise_multiplier_for_epsilon(
          pv.target_epsilon, f.clients_per_round / population, config.num_rounds, pv.delta,
          accountant=pv.accountant, sampling='fixed', population=population)
    update_z = noise_multiplier
    if pv.adaptive:
      # Andrew et al. 2021: the count of unclipped clients is released with noise
      # sigma_b too, and the budget z is split (Theorem 1): the updates get z_delta
      # with z^-2 = z_delta^-2 + (2 sigma_b)^-2, the accountant keeps z.
      sigma_b = 0.0
      if noise_multiplier:
        sigma_b = pv.clipped_count_stddev or f.clients_per_round / 20.0
        if not 2.0 * sigma_b > noise_multiplier:
          raise config_lib.ConfigError(
              f'config.privacy.clipped_count_stddev={pv.clipped_count_stddev!r} is invalid: '
              f'with privacy.adaptive the count noise (std {sigma_b:g}) must exceed half the '
              f'noise multiplier calibrated for privacy.target_epsilon '
              f'({noise_multiplier:.4g})')
        update_z = privacy_lib.update_noise_multiplier(noise_multiplier, sigma_b)
      adaptive = privacy_lib.quantile_adaptive_clip(
          pv.target_quantile, learning_rate=pv.clip_learning_rate,
          clipped_count_stddev=sigma_b,
          expected_clients=float(f.clients_per_round) if sigma_b else None)
    dp = privacy_lib.gaussian_dp(pv.clip_norm, update_z, per_layer=pv.per_layer)

  # ---- aggregation, attacks, compression, pruning
  aggregator = registries.AGGREGATORS[config.aggregator.name](config.aggregator, config.seed)
  if (p.method in ('lora', 'slora') and not sparse_stage
      and config.aggregator.name == 'mean'):   # a LoRA mode is itself the (streaming) mean
    aggregator = registries.LORA_AGGREGATION[p.lora_aggregation](p)
  if skellam:   # the secure sum of the mechanism is the mean (fedit / ffa: plain means)
    aggregator = None
  attack = None
  attackers = np.zeros(population, bool)
  if config.attack.kind != 'none':
    attack = (config.attack.kind, config.attack.scale)
    attackers = aggregate_lib.choose_attackers(population, config.attack.fraction,
                                               seed=config.seed)
  uplink, downlink = build_compressors(config)
  pruning = None
  if config.prune.enabled:
    pruning = engine.Pruning(scores=config.prune.regrow_fraction > 0)

  # ---- optimizers
  client_tx = registries.CLIENT_OPTIMIZERS[config.client_optimizer.name](
      config.client_optimizer)
  if sparse_stage:   # SLoRA stage 1: sparse fine-tuning
    sparse_masks = peft.slora.sparse_masks(split.trainable, p.slora_density, config.seed,
                                           keep_dense=tuple(p.extra_trainable))
    client_tx = optax.chain(client_tx, peft.slora.mask_updates(sparse_masks))
  server_tx = registries.SERVER_OPTIMIZERS[config.server_optimizer.name](
      config.server_optimizer)
  algo_kw = algorithm_kwargs(config)   # fl.algorithm: FedNova, SCAFFOLD
  system = heterogeneity_of(config)    # step budgets, dropout, deadline
  hetero = {}   # heterogeneous LoRA ranks: per-client rank masks (peft.hetlora)
  if p.method == 'lora' and p.rank_distribution != 'none':
    hetero['client_masks'] = peft.hetlora.client_masks_fn(
        split.trainable, config.seed, tuple(p.ranks),
        tuple(p.rank_fractions) if p.rank_distribution == 'tiers' else None)
    if p.get('hetlora_prune', False):   # ranks in the per-client store, self-pruned
      hetero['client_masks'] = peft.hetlora.rank_store(
          split.trainable, config.seed, tuple(p.ranks),
          tuple(p.rank_fractions) if p.rank_distribution == 'tiers' else None,
          prune_gamma=p.hetlora_gamma)
    if p.hetlora_lambda:
      hetero['client_regularizer'] = peft.hetlora.self_pruning_penalty(
          p.hetlora_gamma, p.hetlora_lambda)

  def make_round(chunk_size):
    if f.algorithm in config_lib.ZO_ALGORITHMS:   # FedKSeed: its own (zeroth-order) round
      return fedkseed_round(config, loss_fn, split.trainable, population, chunk_size, mesh)
    return engine.build_round(
        loss_fn, split.trainable, client_optimizer=client_tx, server_optimizer=server_tx,
        num_clients=population, strategy=f.strategy, chunk_size=chunk_size,
        mesh=mesh, prox_mu=f.prox_mu, aggregator=aggregator, privacy=dp,
        adaptive_clip=adaptive, attack=attack, compressor=uplink,
        downlink_compressor=downlink, pruning=pruning, **hetero, **algo_kw,
        # Layers scanned by the model stay stacked in the round, where every part allows it.
        stack_layers='auto' if config.model.get('scan_layers', False) and not sparse_stage
        else False)

  if mesh is not None:
    split = split._replace(frozen=sharding.shard_frozen(split.frozen, mesh))
  evaluate = make_evaluator(split, task, task_data.eval, config.eval.batch_size,
                            config.eval.max_examples)
  groups = mesh.shape['clients'] if f.strategy == 'sharded' else 1
  chunk_size = f.chunk_size
  if f.strategy != 'vmap' and chunk_size == 0:
    chunk_size = _auto_chunk_size(config, task_data, split, loss_fn, client_tx, make_round,
                                  groups, mesh)
  fed_round = make_round(chunk_size)
  multiple = 1 if f.strategy == 'vmap' else chunk_size * groups
  padded_clients = -(-f.clients_per_round // multiple) * multiple

  def round_data(round_idx: int) -> dict:
    ids = sampling.sample_clients(task_data.train.num_clients, f.clients_per_round,
                                  seed=config.seed, round_idx=round_idx)
    data = task_data.train.round_batch(ids, f.local_steps, f.batch_size, seed=config.seed,
                                       round_idx=round_idx, max_epochs=f.max_epochs,
                                       pad_clients_to=padded_clients,
                                       shuffle=config.data.shuffle)
    data = engine.heterogeneity.apply_to_round(data, system, f.local_steps, seed=config.seed,
                                               round_idx=round_idx)
    if attack is not None:
      data['attacker'] = attackers[data['client_id']] & data['client_mask']
    if mesh is not None and jax.process_count() > 1:
      # Every process derives the same round from the seed and materialises only
      # the clients of its own devices into one global array.
      data = sharding.global_round_data(data, mesh)
    return data

  accountant = None
  if skellam:
    accountant = privacy_lib.SkellamAccountant(
        dp.distributed.params, f.clients_per_round / population, pv.delta)
  elif dp is not None:
    accountant = privacy_lib.Accountant(
        noise_multiplier, f.clients_per_round / population, pv.delta,
        accountant=pv.accountant, sampling='fixed', population=population)
  return Experiment(config=config, data=task_data, split=split, task=task,
                    fed_round=fed_round, evaluate=evaluate, round_data=round_data,
                    mesh=mesh, accountant=accountant)


def _auto_chunk_size(config, task_data, split, loss_fn, client_tx, make_round, groups, mesh):
  """``fl.chunk_size=0``: the backend's sweet spot, within ``fl.memory_budget_mb`` per device.

  `fedjax_fm.engine.memory.auto_chunk_size` with a per-client memory bound
  that costs no compilation (`memory.client_bytes_bound` of one client's local
  training); only when that bound does not fit the sweet spot in the budget
  are the round's exact coefficients measured (two compilations of XLA's
  memory analysis).
  """
  f = config.fl
  per_group = -(-f.clients_per_round // groups)
  platform = (mesh.devices.flat[0].platform if mesh is not None else jax.default_backend())
  budget = (f.memory_budget_mb or 2048) * 2**20
  sample = memory_lib.shapes_of(task_data.train.round_batch(
      np.arange(4 * groups) % task_data.train.num_clients, f.local_steps, f.batch_size,
      seed=config.seed))
  one = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype),
                     {k: sample[k] for k in ('batch', 'example_mask', 'step_mask')})
  bound = memory_lib.client_bytes_bound(
      engine.make_client_update(loss_fn, client_tx, f.prox_mu), split.trainable,
      memory_lib.shapes_of(split.frozen), one, jax.random.key(0))
  bound += 4 * sum(x.size * x.dtype.itemsize   # delta and uplink copies
                   for x in jax.tree.leaves(split.trainable))
  spot = memory_lib.auto_chunk_size(per_group, platform=platform, work_bytes=bound)
  chunk = memory_lib.auto_chunk_size(per_group, platform=platform, work_bytes=bound,
                                     per_client_bytes=bound, budget_bytes=budget)
  how = 'sweet spot' if memory_lib.sweet_spot(platform) else 'all clients'
  if chunk < spot:   # the bound is loose: XLA's own analysis of the compiled round
    state_like = jax.eval_shape(make_round(1).init, split.trainable, jax.random.key(0))
    base, per_client = memory_lib.memory_coefficients(
        make_round, state_like, memory_lib.shapes_of(split.frozen), sample)
    chunk = memory_lib.auto_chunk_size(per_group, platform=platform, work_bytes=bound,
                                       per_client_bytes=per_client, base_bytes=base,
                                       budget_bytes=budget)
    how = f'{budget / 2**20:.0f} MiB of temporaries per device'
  log(f'chunk_size={chunk} (automatic: {how}; {per_group} clients per device)')
  return chunk


def algorithm_kwargs(config) -> dict:
  """``build_round`` arguments of ``fl.algorithm`` (FedNova, SCAFFOLD; FedAvg: none)."""
  f, co = config.fl, config.client_optimizer
  if f.algorithm == 'fednova':
    momentum = co.momentum if co.name == 'momentum' else 0.0
    return {'fednova': engine.fednova.FedNova(momentum=momentum,
                                              prox_alpha=co.learning_rate * f.prox_mu)}
  if f.algorithm == 'scaffold':
    return {'scaffold': engine.scaffold.Scaffold(learning_rate=co.learning_rate)}
  return {}


def heterogeneity_of(config) -> engine.heterogeneity.SystemHeterogeneity:
  """Clients' step budgets, dropout and deadline (``fl.step_budget`` to ``fl.speed_sigma``)."""
  f = config.fl
  return engine.heterogeneity.SystemHeterogeneity(
      step_budget=f.step_budget, step_budget_min=f.step_budget_min,
      step_budget_sigma=float(f.step_budget_sigma),
      step_budget_tiers=tuple(float(t) for t in f.step_budget_tiers),
      dropout=float(f.dropout), deadline=float(f.deadline), speed_sigma=float(f.speed_sigma))


def fedkseed_round(config, loss_fn, trainable, population, chunk_size, mesh):
  """``fl.algorithm="fedkseed"`` / ``"fedkseed_pro"``: `engine.zeroth_order` (``config.zo``)."""
  f, z = config.fl, config.zo
  return engine.zeroth_order.build_fedkseed_round(
      loss_fn, trainable, num_clients=population, num_seeds=z.num_seeds, eps=float(z.eps),
      learning_rate=float(config.client_optimizer.learning_rate),
      probabilities='pro' if f.algorithm == 'fedkseed_pro' else 'uniform',
      payload=z.payload, local_steps=f.local_steps, strategy=f.strategy,
      chunk_size=chunk_size, mesh=mesh)


def build_compressors(config):
  """(uplink, downlink) compressors from ``config.compress`` (None: no compression)."""
  x = config.compress

  def one(name, fraction, bits):
    if name == 'identity':
      return None
    return registries.COMPRESSORS[name](x, fraction, bits)

  up = one(x.uplink, x.fraction, x.bits)
  if up is not None and x.then != 'none':
    up = compress_lib.chain(up, registries.QUANTIZERS[x.then](x, x.fraction, x.then_bits))
  if up is not None and x.error_feedback:
    up = compress_lib.error_feedback(up)
  return up, one(x.downlink, x.downlink_fraction, x.downlink_bits)
