"""``run(config, workdir)``: build an experiment from its config and train it.

One linear loop, split by banner comments: build -> before (or resume) ->
rounds (progress bar, one log line per round, JSONL metrics, checkpoints) ->
per-client and generative evaluation -> summary. SLoRA is a second *stage* of
the same loop: after its sparse rounds, LoRA is initialised from the sparse
update and the rounds go on (one metrics file, one accountant, one summary).
The library never reads flags; `experiments/main.py` turns flags into the
ConfigDict handed to `run`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from fedjax_fm import checkpoint as checkpoint_lib
from fedjax_fm import config as config_lib
from fedjax_fm import data as data_lib
from fedjax_fm import peft
from fedjax_fm import prune as prune_lib
from fedjax_fm import sharding
from fedjax_fm import tree_util
from fedjax_fm.train import logs
from fedjax_fm.train.build import Experiment
from fedjax_fm.train.build import build_experiment
from fedjax_fm.train.evaluate import evaluate_clients
from fedjax_fm.train.evaluate import PREDICTIONS_FILE
from fedjax_fm.train.evaluate import generation_before_after
from fedjax_fm.train.evaluate import record_predictions


@dataclasses.dataclass
class Clock:
  """This process's share of a run's time (the earlier processes' come from the checkpoint)."""
  start: float = dataclasses.field(default_factory=time.time)
  build_s: float = 0.0       # data, tokenizer, model and round building
  compile_s: float = 0.0     # compiling the rounds

  def elapsed(self) -> float:
    return time.time() - self.start


@dataclasses.dataclass
class RunRecord:
  """What a run carries across rounds, stages and resumes (checkpointed as JSON extras).

  ``earlier`` holds the times of the processes that ran the rounds before this
  one (``wall_s``, ``build_s``, ``compile_s``, each up to its last checkpoint);
  `totals` adds this process's `Clock` to them.
  """
  before: dict
  last_eval: dict
  clock: Clock
  total_up: int = 0
  total_down: int = 0
  stage_after: dict = dataclasses.field(default_factory=dict)
  earlier: dict = dataclasses.field(default_factory=dict)

  def totals(self) -> dict:
    """Wall, build and compile seconds of the whole run, over all its processes."""
    e = self.earlier
    return dict(wall_s=e.get('wall_s', 0.0) + self.clock.elapsed(),
                build_s=e.get('build_s', 0.0) + self.clock.build_s,
                compile_s=e.get('compile_s', 0.0) + self.clock.compile_s)

  def extras(self) -> dict:
    return dict(before=self.before, last_eval=self.last_eval, total_up=self.total_up,
                total_down=self.total_down, stage_after=self.stage_after, times=self.totals())

  @classmethod
  def restore(cls, extras: dict, clock: Clock) -> RunRecord:
    """The record of a checkpoint's extras (those without times count them as 0)."""
    return cls(before=extras['before'], last_eval=extras['last_eval'], clock=clock,
               total_up=extras['total_up'], total_down=extras['total_down'],
               stage_after=dict(extras.get('stage_after', {})),
               earlier=dict(extras.get('times', {})))


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains a federated experiment and writes its metrics into ``workdir``.

  Writes ``workdir/metrics.jsonl`` (one JSON object per round),
  ``workdir/summary.json`` and orbax checkpoints under ``workdir/checkpoints``;
  rerunning with the same workdir resumes from the latest checkpoint, and the
  summary's totals (``total_time_s``: wall time from the start of `run`, data,
  tokenizer and model building included; ``build_time_s``, ``compile_time_s``,
  ``rounds``) cover every process of the run, each counted up to its last
  checkpoint. Rerunning a finished run (its summary written at its last
  checkpoint, ``num_rounds`` reached) changes nothing and returns its summary.

  Returns:
    The summary: held-out metrics before and after, totals and timings.
  """
  clock = Clock()
  os.makedirs(workdir, exist_ok=True)
  summary_path = os.path.join(workdir, 'summary.json')
  previous = _read_summary(summary_path)
  finished = _finished_round(config, workdir, previous)
  if finished is not None:
    f = config.fl
    config_lib.validate(config, num_devices=max(jax.device_count() // f.model_axis, 1)
                        if f.strategy == 'sharded' else None)
    logs.log(f'run already finished at round {finished}: nothing to do; summary in '
             f'{summary_path}')
    return previous
  # ---- build
  t0 = time.time()
  exp = build_experiment(config, workdir)
  clock.build_s += time.time() - t0
  _describe(exp)
  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  p = config.peft
  if p.method == 'slora':
    stages = [('sparse', 0, p.slora_stage1_rounds,
               os.path.join(workdir, 'checkpoints_stage1')),
              ('lora', p.slora_stage1_rounds, config.num_rounds,
               os.path.join(workdir, 'checkpoints'))]
  else:
    stages = [('train', 0, config.num_rounds, os.path.join(workdir, 'checkpoints'))]

  record = None
  accountant = exp.accountant
  state = frozen = None
  for i, (name, first, last, ckpt_dir) in enumerate(stages):
    if i:   # SLoRA stage 2: LoRA from the SVD of the sparse update of stage 1
      deltas = tree_util.tree_sub(jax.device_get(state.params), exp.split.trainable)
      model = peft.merge(exp.split.graphdef, exp.split.trainable, exp.split.frozen)
      peft.slora.slora_stage2(model, deltas, p.rank, p.alpha,
                              target_modules=tuple(p.target_modules), dropout=p.dropout,
                              rngs=nnx.Rngs(config.seed + 2))
      t0 = time.time()
      exp = build_experiment(config, workdir, model=model, task_data=exp.data,
                             validate=False)
      clock.build_s += time.time() - t0
      logs.log(f'SLoRA stage 2: LoRA rank {p.rank} from the SVD of the stage-1 update, '
               f'{last - first} rounds')
    elif name == 'sparse':
      logs.log(f'SLoRA stage 1: sparse fine-tuning ({p.slora_density:.0%} of each target '
               f'kernel) for {last - first} rounds')
    state, frozen, record = _train_stage(exp, workdir, metrics_path, first, last, ckpt_dir,
                                         record, accountant, clock, previous)
    if len(stages) > 1:
      record.stage_after[name] = record.last_eval

  # ---- per-client and generative evaluation
  cfg = exp.config
  main_process = sharding.is_main_process()
  federated = personal = None
  if exp.data.client_test is not None:
    federated, personal = evaluate_clients(exp, state.params, frozen)
    if main_process:
      with open(os.path.join(workdir, 'client_eval.json'), 'w') as fh:
        json.dump({'federated': federated, 'personalization': personal}, fh)
    for metric, dist in federated['distribution'].items():
      if metric in ('accuracy', 'loss', 'perplexity'):
        logs.log(f'per-client {metric}: ' + logs.fmt_metrics(
            {k: v for k, v in dist.items() if k in ('mean', 'p10', 'worst')}))
    if personal is not None:
      for metric, dist in personal['after_distribution'].items():
        if metric in ('accuracy', 'loss', 'perplexity'):
          logs.log(f'personalised ({cfg.eval.personalize_steps} steps) per-client {metric}: '
                   + logs.fmt_metrics({k: v for k, v in dist.items()
                                       if k in ('mean', 'p10', 'worst')}))
  generation = heldout = None
  if _generative(exp):
    generation = generation_before_after(exp, state.params, frozen, workdir)
  else:   # classification: the final predictions, per client and group
    heldout = record_predictions(exp, state.params, frozen, workdir, int(state.round))

  # ---- summary
  n_trainable = tree_util.tree_size(exp.split.trainable)
  totals = record.totals()
  summary = {
      'before': record.before, 'after': record.last_eval, 'rounds': int(state.round),
      'trainable_params': n_trainable, 'frozen_params': tree_util.tree_size(exp.split.frozen),
      'uplink_bytes_total': record.total_up, 'downlink_bytes_total': record.total_down,
      'total_time_s': totals['wall_s'], 'build_time_s': totals['build_s'],
      'compile_time_s': totals['compile_s'],
      'data': exp.data.description, 'final_round': int(state.round),
      'num_clients': exp.data.train.num_clients,
      'label_names': list(exp.data.label_names),
  }
  if 'sparse' in record.stage_after:
    summary['stage1_after'] = record.stage_after['sparse']
  if generation is not None:   # {'generation': after, 'generation_before': before, ...}
    summary.update(generation)
  if heldout:   # {'heldout_clients': ..., 'heldout_groups': ...}
    summary.update(heldout)
  if federated is not None:
    summary['client_distribution'] = federated['distribution']
  if personal is not None:
    summary['personalized_distribution'] = personal['after_distribution']
  if accountant is not None:
    summary['epsilon'] = accountant.epsilon
    summary['delta'] = cfg.privacy.delta
    summary['noise_multiplier'] = accountant.noise_multiplier
    summary['dp_mechanism'] = cfg.privacy.mechanism
  if main_process:
    with open(summary_path, 'w') as fh:
      json.dump(summary, fh, indent=2)
  logs.log(f'held-out after {cfg.num_rounds} rounds: ' + logs.fmt_metrics(record.last_eval) +
           f' (before: {logs.fmt_metrics(record.before)}); uplink total '
           f'{logs.fmt_bytes(record.total_up)}; {summary["total_time_s"]:.0f}s')
  return summary


def _generative(exp: Experiment) -> bool:
  return exp.data.instructions is not None and bool(exp.config.data.generate_examples)


def _read_summary(path: str) -> dict | None:
  """The summary.json of an earlier process of the run, or None."""
  try:
    with open(path) as fh:
      summary = json.load(fh)
  except (OSError, json.JSONDecodeError):
    return None
  return summary if isinstance(summary, dict) else None


def _finished_round(config: ml_collections.ConfigDict, workdir: str,
                    previous: dict | None) -> int | None:
  """The last round of a finished run in ``workdir``, or None.

  Finished: its summary was written at its latest checkpoint, and that round
  reaches ``config.num_rounds``. Reads only: nothing in ``workdir`` changes.
  """
  final = (previous or {}).get('final_round')
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  if not isinstance(final, int) or final < config.num_rounds or not os.path.isdir(ckpt_dir):
    return None
  ckpt = checkpoint_lib.Checkpointer(ckpt_dir)
  latest = ckpt.latest_round()
  ckpt.close()
  return final if latest == final else None


def _describe(exp: Experiment) -> None:
  cfg, split, train = exp.config, exp.split, exp.data.train
  n_trainable = tree_util.tree_size(split.trainable)
  n_frozen = tree_util.tree_size(split.frozen)
  logs.log(f'data: {exp.data.description}; {train.num_examples} training examples over '
           f'{train.num_clients} clients (partition={cfg.data.partition}), '
           f'{len(next(iter(exp.data.eval.values())))} held out')
  logs.log(f'model: {cfg.model.kind}, peft={cfg.peft.method}: {n_trainable:,} trainable '
           f'params ({100.0 * n_trainable / max(n_trainable + n_frozen, 1):.2f}% of '
           f'{n_trainable + n_frozen:,}), '
           f'{logs.fmt_bytes(exp.fed_round.uplink_bytes_per_client)} uplink per client per '
           f'round')


def _train_stage(exp: Experiment, workdir: str, metrics_path: str, first: int, last: int,
                 ckpt_dir: str, record: RunRecord | None, accountant, clock: Clock,
                 previous: dict | None):
  """Rounds ``first..last-1`` of a built experiment; returns (state, frozen view, record).

  ``previous`` is the summary an earlier process wrote (or None): resuming at
  its final round (more rounds asked for), its whole wall time counts.
  """
  main_process = sharding.is_main_process()   # logs, metrics and summary: process 0 only
  cfg, split, fed = exp.config, exp.split, exp.fed_round

  # ---- before, or resume
  state = fed.init(split.trainable, jax.random.key(cfg.seed))
  state = state._replace(round=jnp.asarray(first, jnp.int32))
  if exp.mesh is not None:
    state = sharding.replicate(state, exp.mesh)
  ckpt = checkpoint_lib.Checkpointer(ckpt_dir, every=cfg.checkpoint.every,
                                     keep=cfg.checkpoint.keep)
  start = first
  if ckpt.latest_round() is not None:
    try:
      state, extras = ckpt.restore(state)
    except ValueError as e:   # e.g. orbax: the saved tree has another structure
      raise ValueError(
          f'the checkpoint under {ckpt_dir} does not fit this run\'s server state: it was '
          'written with another config that changes the state\'s structure (e.g. '
          'model.scan_layers, which keeps the layers stacked, or the PEFT, compression or '
          'algorithm settings). Resume with the config that wrote it, or use a new '
          f'--workdir. ({str(e).splitlines()[0]})') from e
    start = int(state.round)
    record = RunRecord.restore(extras, clock)
    if previous is not None and previous.get('final_round') == start:
      # The process that wrote the summary went on after this checkpoint (evaluation).
      record.earlier['wall_s'] = max(record.earlier.get('wall_s', 0.0),
                                     float(previous.get('total_time_s', 0.0)))
    logs.log(f'resumed from {ckpt.directory} at round {start}')
    if accountant is not None and start > accountant.rounds:
      accountant.step(start - accountant.rounds)
  elif record is None:   # the first stage of a new run
    logs.log(f'no checkpoint found in {ckpt.directory}, starting fresh')
    before = exp.evaluate(split.trainable)
    record = RunRecord(before=before, last_eval=before, clock=clock)
    logs.log('held-out before: ' + logs.fmt_metrics(before))
  if main_process:   # drop the records of rounds after `start` (a killed run's)
    logs.keep_records(metrics_path, start)
    logs.keep_records(os.path.join(workdir, PREDICTIONS_FILE), start)
  if start == 0 and _generative(exp):   # the untrained model's responses: round 0
    record_predictions(exp, split.trainable, split.frozen, workdir, 0)

  # ---- rounds
  rounds = range(start, last)
  bar = logs.progress(rounds, cfg.progress)
  compiled = None
  prune_step = _make_prune_step(cfg) if cfg.prune.enabled else None
  writer = None
  if cfg.tensorboard and main_process:
    writer = logs.tensorboard_writer(os.path.join(workdir, 'tensorboard'))
  if writer is not None:
    if start == 0:
      for k, v in record.before.items():
        writer.add_scalar(f'eval/{k}', v, 0)
  frozen = split.frozen
  # Per-client values are not private: under DP they are logged only when asked for.
  per_client_logged = not cfg.privacy.enabled or cfg.privacy.log_client_metrics
  with open(metrics_path if main_process else os.devnull, 'a') as out:
    ahead = cfg.data.get('prefetch', 2)   # rounds built and copied while one runs (0: off)
    round_stream = (_on_device(exp, exp.round_data(r)) for r in rounds)
    if ahead:
      round_stream = data_lib.prefetch(round_stream, buffer_size=ahead)
    for r, data in zip(bar, round_stream):
      mask_down = 0
      if prune_step is not None:
        state, changed = prune_step(state, r)
        if changed:   # new masks go down to every client of this round
          mask_down = prune_lib.mask_nbytes(state.prune.masks)
      t0 = time.time()
      if compiled is None:
        compiled = fed.apply.lower(state, frozen, data).compile()
        compile_s = time.time() - t0
        clock.compile_s += compile_s
        t0 = time.time()
      state, m = compiled(state, frozen, data)
      m = sharding.to_host(m)
      round_s = time.time() - t0
      n_clients = int(m['num_clients'])
      # heterogeneous per-client payloads (e.g. LoRA ranks): the round's own count
      up = (float(m['uplink_bytes']) if 'uplink_bytes_dense' in m
            else n_clients * fed.uplink_bytes_per_client)
      down = n_clients * (fed.downlink_bytes_per_client + mask_down)
      record.total_up += up
      record.total_down += down
      cmask = np.asarray(m['client_mask'])
      line = {
          'round': r + 1, 'num_clients': n_clients, 'uplink_bytes': up,
          'downlink_bytes': down,
          'cum_uplink_bytes': record.total_up, 'update_norm': float(m['update_norm']),
          'param_norm': float(m['param_norm']), 'round_time_s': round_s,
      }
      if per_client_logged:   # data-dependent, un-noised: not released under DP
        line['train_loss'] = float(m['train_loss'])
        line['examples'] = int(m['examples'])
        line['client_loss'] = [float(v) for v in np.asarray(m['client_loss'])[cmask]]
        line['client_update_norm'] = [float(v) for v in
                                      np.asarray(m['client_update_norm'])[cmask]]
        for k in ('lora_aggregation_error', 'lora_aggregation_error_se'):
          if k in m:
            line[k] = float(m[k])
      for k in ('dropped_clients', 'mean_steps', 'fednova_tau_eff'):   # system heterogeneity
        # steps done also depend on each client's data size: logged as client metrics are
        if k in m and (per_client_logged or k == 'dropped_clients'):
          line[k] = float(m[k])
      if r == start:
        line['compile_time_s'] = compile_s
      if prune_step is not None:
        line['sparsity'] = float(prune_lib.sparsity_of(state.prune.masks, state.params,
                                                       min_size=cfg.prune.min_size))
      if accountant is not None:
        line['epsilon'] = accountant.step()
        line['clip_norm'] = float(m['clip_norm'])
        if per_client_logged and float(m.get('dp_rounding_fallbacks', 0)):
          line['dp_rounding_fallbacks'] = int(m['dp_rounding_fallbacks'])   # zero updates sent
      if per_client_logged and int(m['nonfinite_clients']):
        line['nonfinite_clients'] = int(m['nonfinite_clients'])
      if (r + 1) % cfg.eval.every == 0 or r + 1 == last:
        params = fed.canonical_params(state.params)   # (the round may keep layers stacked)
        record.last_eval = exp.evaluate(params, fed.frozen_view(state, frozen))
        line['eval'] = record.last_eval
        if _generative(exp):   # generated, saved to predictions.jsonl, scored
          line['generation'] = record_predictions(
              exp, params, fed.frozen_view(state, frozen), workdir, r + 1)['generation']
      out.write(json.dumps(line) + '\n')
      out.flush()
      if writer is not None:
        logs.write_tensorboard(writer, line)
      ckpt.maybe_save(state, record.extras(), force=r + 1 == last)
      loss = f' loss={line["train_loss"]:.4f}' if 'train_loss' in line else ''
      if hasattr(bar, 'set_postfix') and loss:
        bar.set_postfix(loss=loss.split('=')[1])
      if (r + 1) % cfg.log_every == 0 or 'eval' in line:
        msg = (f'round {r + 1}/{cfg.num_rounds}{loss} '
               f'clients={n_clients} up={logs.fmt_bytes(up)} time={round_s:.3f}s')
        if 'epsilon' in line:
          msg += f' eps={line["epsilon"]:.3g}'
        if r == start:
          msg += f' (compile {compile_s:.1f}s)'
        if 'eval' in line:
          msg += ' | held-out ' + logs.fmt_metrics(line['eval'])
        logs.log(msg, bar)
  ckpt.close()
  if writer is not None:
    writer.close()
  # The params in the model's layout (the round may keep its layers stacked).
  return (state._replace(params=fed.canonical_params(state.params)),
          fed.frozen_view(state, frozen), record)


def _on_device(exp: Experiment, data: dict) -> dict:
  """Starts copying a round's data to the devices (on the prefetch thread when it runs)."""
  if jax.process_count() > 1:   # already global arrays (`sharding.global_round_data`)
    return data
  if exp.mesh is not None and exp.config.fl.strategy == 'sharded':
    return jax.device_put(data, jax.sharding.NamedSharding(
        exp.mesh, jax.sharding.PartitionSpec(sharding.CLIENTS)))
  return jax.device_put(data)


def _make_prune_step(cfg):
  """Host-side pruning between rounds: schedule, masks, optional regrowth."""
  p = cfg.prune
  end = p.end_round or max(cfg.num_rounds // 2, p.begin_round)
  schedule = prune_lib.polynomial_schedule(p.initial_sparsity, p.final_sparsity,
                                           p.begin_round, end)
  masks_fn = jax.jit(lambda params, sparsity: prune_lib.global_magnitude_masks(
      params, sparsity, min_size=p.min_size))
  regrow_fn = jax.jit(lambda params, masks, scores: prune_lib.prune_and_regrow(
      params, masks, scores, p.regrow_fraction))

  def step(state, r):
    if r < p.begin_round or (r - p.begin_round) % p.every:
      return state, False
    old = state.prune.masks
    if r <= end:
      masks = masks_fn(state.params, jnp.float32(schedule(r)))
      params = prune_lib.apply_masks(state.params, masks)
    elif p.regrow_fraction:
      params, masks = regrow_fn(state.params, old, state.prune.scores)
    else:
      return state, False
    changed = bool(prune_lib.masks_changed(old, masks))
    return state._replace(params=params, prune=state.prune._replace(masks=masks)), changed

  return step
