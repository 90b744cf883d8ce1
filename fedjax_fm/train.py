"""``run(config, workdir)``: build an experiment from its config and train it.

One linear loop, split by banner comments: validate -> data -> model and PEFT
split -> round -> train (progress bar, one log line per round, JSONL metrics)
-> summary. The library never reads flags; `experiments/main.py` turns flags
into the ConfigDict handed to `run`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from fedjax_fm import aggregate as aggregate_lib
from fedjax_fm import checkpoint as checkpoint_lib
from fedjax_fm import compress as compress_lib
from fedjax_fm import config as config_lib
from fedjax_fm import data as data_lib
from fedjax_fm import engine
from fedjax_fm import models
from fedjax_fm import peft
from fedjax_fm import privacy as privacy_lib
from fedjax_fm import prune as prune_lib
from fedjax_fm import sharding
from fedjax_fm import tree_util
from fedjax_fm.data import partition as partition_lib
from fedjax_fm.engine import memory as memory_lib
from fedjax_fm.engine import sampling

logger = logging.getLogger('fedjax_fm')


@dataclasses.dataclass
class TaskData:
  """A task's data, ready for training: clients and a held-out split."""
  train: data_lib.FederatedDataset
  eval: dict[str, np.ndarray]
  num_labels: int = 0
  label_names: tuple[str, ...] = ()
  tokenizer: Any = None
  description: str = ''
  instructions: dict | None = None   # held-out instructions and references, if any
  client_test: Any = None            # per-client local test data (FederatedDataset)


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


# --------------------------------------------------------------------- data

def _tokenizer(config, texts, workdir):
  d = config.data
  if d.tokenizer == 'minilm':
    return data_lib.HFTokenizer.from_pretrained_dir(models.hf.minilm_dir())
  if d.tokenizer == 'hf':
    if not d.tokenizer_path:
      raise config_lib.ConfigError(
          'config.data.tokenizer_path is empty: data.tokenizer="hf" needs a tokenizer.json '
          'file or a directory holding one')
    if os.path.isdir(d.tokenizer_path):
      return data_lib.HFTokenizer.from_pretrained_dir(d.tokenizer_path)
    return data_lib.HFTokenizer.from_file(d.tokenizer_path)
  # sentencepiece: load a model file, or train one on the training texts.
  if d.tokenizer_path:
    return data_lib.SentencePieceTokenizer.load(d.tokenizer_path, add_bos=True)
  os.makedirs(workdir, exist_ok=True)
  prefix = os.path.join(workdir, 'spm')
  return data_lib.SentencePieceTokenizer.train(
      list(texts), vocab_size=d.vocab_size, model_path_prefix=prefix, add_bos=True)


def _load_raw(config) -> tuple[dict[str, np.ndarray], tuple[str, ...], str]:
  """Returns (arrays, label_names, description) before tokenization."""
  d = config.data
  if d.source == 'stdlib_docs':
    raw = data_lib.load_stdlib_docstrings()
    names = tuple(raw['label_names'])
    arrays = {'text': raw['text'], 'label': raw['label'], 'module': raw['module']}
    return arrays, names, (f'docstrings of the Python {len(names)}-package standard library, '
                           f'labelled by package: {", ".join(names)}')
  if d.source == 'synthetic':
    rng = np.random.default_rng(config.seed + 1000)
    centers = rng.normal(size=(d.num_classes, d.num_features)) * 1.5
    label = rng.integers(0, d.num_classes, size=d.num_examples).astype(np.int32)
    x = (centers[label] + rng.normal(size=(d.num_examples, d.num_features))).astype(np.float32)
    names = tuple(f'class_{i}' for i in range(d.num_classes))
    return {'x': x, 'label': label}, names, 'synthetic Gaussian mixture'
  if d.source == 'tfds':
    raw = data_lib.load_tfds(d.name, d.split, max_examples=d.max_examples or None)
    desc = f'TFDS {d.name}[{d.split}]'
  elif d.source == 'jsonl':
    raw = data_lib.load_jsonl(d.path)
    desc = f'JSONL {d.path}'
  elif d.source == 'csv':
    raw = data_lib.load_csv(d.path)
    desc = f'CSV {d.path}'
  else:
    raw = data_lib.load_text(d.path)
    desc = f'text {d.path}'
  arrays = dict(raw)
  names: tuple[str, ...] = ()
  if d.task == 'classification':
    if d.label_key not in arrays:
      raise config_lib.ConfigError(
          f'config.data.label_key={d.label_key!r} is not a field of the data; fields: '
          f'{sorted(arrays)}')
    labels = arrays[d.label_key]
    if labels.dtype.kind == 'f':
      if not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)):
        raise config_lib.ConfigError(
            f'config.data.label_key={d.label_key!r}: labels must be integers or strings, '
            f'got non-integral floats')
      labels = labels.astype(np.int64)
    if labels.dtype.kind in 'iu' and labels.min() < 0:
      raise config_lib.ConfigError(
          f'config.data.label_key={d.label_key!r}: labels must be >= 0, got {labels.min()}')
    if labels.dtype.kind in 'OUS':
      names_arr, labels = np.unique(labels.astype(str), return_inverse=True)
      names = tuple(str(n) for n in names_arr)
    else:
      names = tuple(str(i) for i in range(int(labels.max()) + 1))
    arrays['label'] = labels.astype(np.int32)
  return arrays, names, desc


def _instruction_data(config, workdir):
  """Instruction tuning: prompts + responses, loss on the response tokens only."""
  d = config.data
  path = d.path or str(data_lib.instructions.sample_path())
  ex = data_lib.load_instructions(path, max_examples=d.max_examples or None)
  texts = data_lib.instructions.format_prompts(ex, d.instruction_template)
  tokenizer = _tokenizer(config, [t + ' ' + o for t, o in zip(texts, ex['output'])], workdir)
  enc = data_lib.tokenize_instructions(ex, tokenizer, d.max_len,
                                       template=d.instruction_template)
  arrays = {'input_ids': enc['input_ids'], 'attention_mask': enc['attention_mask'],
            'loss_mask': enc['loss_mask'], 'category': np.asarray(ex['category']).astype(str),
            'row': np.arange(len(texts))}
  return arrays, ex, tokenizer, f'instructions {path} ({len(texts)} examples)'


def build_task_data(config, workdir: str = '.') -> TaskData:
  """Loads, featurizes, splits off the held-out set and partitions the clients."""
  d = config.data
  if d.source == 'instructions':
    return _build_instruction_task_data(config, workdir)
  arrays, names, desc = _load_raw(config)
  if not arrays or len(next(iter(arrays.values()))) == 0:
    raise ValueError(f'the data set is empty: {desc}')
  if d.max_examples and d.source != 'tfds':
    arrays = {k: v[:d.max_examples] for k, v in arrays.items()}
  n = len(next(iter(arrays.values())))
  tokenizer = None
  feats: dict[str, np.ndarray] = {}
  if config.model.kind == 'mlp':
    key = 'x' if 'x' in arrays else 'image'
    if key not in arrays:
      raise config_lib.ConfigError(
          f'config.model.kind="mlp" needs a numeric feature "x" or "image"; the data has '
          f'{sorted(arrays)}')
    if arrays[key].dtype.kind not in 'biuf':
      raise config_lib.ConfigError(
          f'feature {key!r} has dtype {arrays[key].dtype}; the MLP needs numbers')
    x = arrays[key].reshape(n, -1).astype(np.float32)
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
      raise ValueError(f'feature {key!r} has NaN or Inf in {int(bad.sum())} examples '
                       f'(first at index {int(np.argmax(bad))}); clean the data first')
    feats['x'] = x / 255.0 if arrays[key].dtype == np.uint8 else x
  else:
    if d.text_key not in arrays:
      raise config_lib.ConfigError(
          f'config.data.text_key={d.text_key!r} is not a field of the data; fields: '
          f'{sorted(arrays)}')
    texts = [str(t) for t in arrays[d.text_key]]
    tokenizer = _tokenizer(config, texts, workdir)
    enc = tokenizer.encode(texts, d.max_len)
    feats['input_ids'] = enc['input_ids'].astype(np.int32)
    feats['attention_mask'] = enc['attention_mask'].astype(np.int32)
  if d.task == 'classification':
    feats['label'] = arrays['label'].astype(np.int32)

  # Held-out split: a seeded random fraction of all examples, kept in random order
  # so that the leading `eval.max_examples` of it are a random sample too (sources
  # are often sorted by label).
  rng = np.random.default_rng(config.seed)
  perm = rng.permutation(n)
  n_eval = max(1, int(round(n * d.eval_fraction)))
  eval_idx, train_idx = perm[:n_eval], np.sort(perm[n_eval:])
  eval_arrays = {k: v[eval_idx] for k, v in feats.items()}
  train_arrays = {k: v[train_idx] for k, v in feats.items()}
  n_train = len(train_idx)
  if d.num_clients > n_train:
    raise config_lib.ConfigError(
        f'config.data.num_clients={d.num_clients} is invalid: must be <= the number of '
        f'training examples ({n_train})')

  # Partition the training examples over clients.
  if d.partition == 'iid':
    parts = partition_lib.iid(n_train, d.num_clients, seed=config.seed)
  elif d.partition == 'dirichlet':
    parts = partition_lib.dirichlet(train_arrays['label'] if 'label' in train_arrays
                                    else _require_labels(d), d.num_clients, d.alpha,
                                    seed=config.seed, min_size=d.min_client_size)
  elif d.partition == 'shards':
    parts = partition_lib.shards(train_arrays['label'], d.num_clients, d.labels_per_client,
                                 seed=config.seed)
  elif d.partition == 'quantity_skew':
    parts = partition_lib.quantity_skew(n_train, d.num_clients, d.sigma, seed=config.seed,
                                        min_size=max(d.min_client_size, 1))
  else:  # natural
    key = d.client_key or 'module'
    if key not in arrays:
      raise config_lib.ConfigError(
          f'config.data.client_key={key!r} is not a field of the data; fields: '
          f'{sorted(arrays)}')
    parts, _ = partition_lib.natural(np.asarray(arrays[key])[train_idx].astype(str))
    if len(parts) < config.fl.clients_per_round:
      raise config_lib.ConfigError(
          f'config.fl.clients_per_round={config.fl.clients_per_round} is invalid: the natural '
          f'partition by {key!r} has only {len(parts)} clients')
  train = data_lib.FederatedDataset.from_partition(train_arrays, parts)
  return TaskData(train=train, eval=eval_arrays, num_labels=len(names), label_names=names,
                  tokenizer=tokenizer, description=desc)


def _build_instruction_task_data(config, workdir) -> TaskData:
  d = config.data
  arrays, examples, tokenizer, desc = _instruction_data(config, workdir)
  n = len(arrays['row'])
  rng = np.random.default_rng(config.seed)
  perm = rng.permutation(n)
  n_eval = max(1, int(round(n * d.eval_fraction)))
  eval_idx, train_idx = perm[:n_eval], np.sort(perm[n_eval:])   # eval in random order
  feats = ('input_ids', 'attention_mask', 'loss_mask')
  train_arrays = {k: arrays[k][train_idx] for k in feats}
  eval_arrays = {k: arrays[k][eval_idx] for k in feats}
  cats = arrays['category'][train_idx]
  if d.partition == 'natural':
    parts, _ = partition_lib.natural(cats)
  elif d.partition == 'dirichlet':
    _, cat_ids = np.unique(cats, return_inverse=True)
    parts = partition_lib.dirichlet(cat_ids, d.num_clients, d.alpha, seed=config.seed,
                                    min_size=d.min_client_size)
  else:
    parts = partition_lib.iid(len(train_idx), d.num_clients, seed=config.seed)
  if len(parts) < config.fl.clients_per_round:
    raise config_lib.ConfigError(
        f'config.fl.clients_per_round={config.fl.clients_per_round} is invalid: the '
        f'{d.partition} partition has only {len(parts)} clients')
  held_out = {k: np.asarray(examples[k])[eval_idx] for k in ('instruction', 'input', 'output')}
  return TaskData(train=data_lib.FederatedDataset.from_partition(train_arrays, parts),
                  eval=eval_arrays, tokenizer=tokenizer, description=desc,
                  instructions=held_out)


def _require_labels(d):
  raise config_lib.ConfigError(
      f'config.data.partition={d.partition!r} needs labels; use "iid", "quantity_skew" or '
      '"natural" for unlabelled data')


# -------------------------------------------------------------------- model

def _task(config) -> models.Task:
  if config.data.source == 'instructions':
    return models.causal_lm_task(loss_mask_key='loss_mask')
  if config.model.kind in ('minilm', 'encoder'):
    return models.classification_task()
  if config.model.kind == 'mlp':
    return models.features_classification_task()
  return models.causal_lm_task()


def build_model(config, task_data: TaskData):
  """Returns (nnx model, Task) for the config."""
  m = config.model
  rngs = nnx.Rngs(config.seed)
  dtype = jnp.bfloat16 if m.dtype == 'bfloat16' else jnp.float32
  if m.kind == 'minilm':
    model, _ = models.load_minilm_encoder(task_data.num_labels, rngs_seed=config.seed,
                                          pooling=m.pooling, dropout=m.dropout, dtype=dtype)
    return model, models.classification_task()
  if m.kind == 'mlp':
    in_dim = task_data.train.arrays['x'].shape[-1]
    model = models.MLPClassifier(in_dim, tuple(m.hidden), task_data.num_labels, rngs=rngs)
    return model, models.features_classification_task()
  vocab = m.vocab_size or task_data.tokenizer.vocab_size
  if vocab < task_data.tokenizer.vocab_size:
    raise config_lib.ConfigError(
        f'config.model.vocab_size={vocab} is invalid: the tokenizer has '
        f'{task_data.tokenizer.vocab_size} tokens')
  if m.kind == 'encoder':
    cfg = models.EncoderConfig(
        vocab_size=vocab, hidden_size=m.hidden_size, num_layers=m.num_layers,
        num_heads=m.num_heads, intermediate_size=m.mlp_dim,
        max_position=max(config.data.max_len, 16), num_labels=task_data.num_labels,
        pooling=m.pooling, dropout=m.dropout, dtype=dtype)
    return models.Encoder(cfg, rngs=rngs), models.classification_task()
  cfg = models.DecoderConfig(
      vocab_size=vocab, dim=m.hidden_size, num_layers=m.num_layers, num_heads=m.num_heads,
      num_kv_heads=m.num_kv_heads, mlp_dim=m.mlp_dim,
      max_len=config.data.max_len + (config.peft.num_virtual_tokens
                                     if config.peft.method == 'prompt' else 0),
      dtype=dtype)
  return models.Decoder(cfg, rngs=rngs), _task(config)


def build_split(config, model, stage: int = 0) -> peft.Split:
  """The trainable/frozen split of the PEFT route (``stage`` 1 of SLoRA: sparse)."""
  p = config.peft
  extra = tuple(p.extra_trainable)
  rngs = nnx.Rngs(config.seed + 1)
  if p.method == 'slora' and stage == 1:
    return peft.slora.sparse_split(model, tuple(p.target_modules), extra)
  if p.method == 'adapter':
    peft.apply_adapters(model, bottleneck=p.adapter_bottleneck, rngs=rngs)
    return peft.split_model(model, 'adapter', extra_trainable=extra)
  if p.method == 'ia3':
    peft.apply_ia3(model, rngs=rngs)
    return peft.split_model(model, 'ia3', extra_trainable=extra)
  if p.method == 'bitfit':
    return peft.split_model(model, 'bitfit', extra_trainable=extra)
  if p.method == 'prompt':
    peft.apply_prompt_tuning(model, p.num_virtual_tokens, rngs=rngs)
    return peft.split_model(model, 'prompt', extra_trainable=extra)
  if p.method == 'prefix':
    peft.apply_prefix_tuning(model, p.num_virtual_tokens, rngs=rngs)
    return peft.split_model(model, 'prefix', extra_trainable=extra)
  if p.method == 'lora':
    peft.apply_lora(model, rank=p.rank, alpha=p.alpha, dropout=p.dropout,
                    target_modules=tuple(p.target_modules),
                    rngs=nnx.Rngs(config.seed + 1))
    split = peft.split_model(model, 'lora', extra_trainable=tuple(p.extra_trainable))
    if p.lora_aggregation == 'ffa':   # FFA-LoRA: A stays at its shared random init
      split = peft.lora_aggregation.freeze_lora_a(split)
    return split
  return peft.split_model(model, 'full')


# --------------------------------------------------------------- evaluation

def make_evaluator(split: peft.Split, task: models.Task, eval_arrays, batch_size: int,
                   max_examples: int = 0):
  """``evaluate(trainable) -> {metric: value}`` over the held-out split."""
  eval_fn = models.make_eval_fn(split.graphdef, task)
  n = len(next(iter(eval_arrays.values())))
  if max_examples:
    n = min(n, max_examples)
  batch_size = min(batch_size, n)
  num_batches = -(-n // batch_size)
  padded = num_batches * batch_size
  stacked = {k: np.concatenate([v[:n], np.zeros((padded - n,) + v.shape[1:], v.dtype)])
             .reshape((num_batches, batch_size) + v.shape[1:]) for k, v in eval_arrays.items()}
  mask = (np.arange(padded) < n).reshape(num_batches, batch_size).astype(np.float32)

  @jax.jit
  def run_eval(trainable, frozen, stacked, mask):
    def body(sums, xs):
      batch, m = xs
      out = eval_fn(trainable, frozen, batch)
      return jax.tree.map(lambda s, v: s + jnp.sum(v * m), sums, out), None
    zeros = jax.tree.map(lambda s: jnp.zeros((), jnp.float32),
                         jax.eval_shape(eval_fn, trainable, frozen,
                                        jax.tree.map(lambda v: v[0], stacked)))
    sums, _ = jax.lax.scan(body, zeros, (stacked, mask))
    return sums

  def evaluate(trainable, frozen=None):
    frozen = split.frozen if frozen is None else frozen
    sums = jax.device_get(run_eval(trainable, frozen, stacked, mask))
    out = {}
    if 'num_tokens' in sums:   # causal LM: token-weighted loss and perplexity
      tokens = max(float(sums['num_tokens']), 1.0)
      out['loss'] = float(sums['nll_sum']) / tokens
      out['perplexity'] = float(np.exp(min(out['loss'], 50.0)))
      out['token_accuracy'] = float(sums['correct_tokens']) / tokens
    else:
      out['loss'] = float(sums['loss']) / n
      out['accuracy'] = float(sums['correct']) / n
    return out

  return evaluate


# ------------------------------------------------------------------- build

def build_experiment(config: ml_collections.ConfigDict, workdir: str | None = None,
                     mesh=None, *, model=None, stage: int = 0,
                     task_data: TaskData | None = None, validate: bool = True) -> Experiment:
  """Validates the config and builds data, model split, round and evaluator.

  With ``fl.strategy="sharded"`` the clients of a round are split over the
  ``clients`` axis of a ``(clients, model)`` mesh of all (global) devices and
  the frozen base is sharded over ``model`` (``fl.model_axis`` devices).
  """
  f = config.fl
  if f.strategy == 'sharded' and mesh is None:
    config_lib.validate(config, num_devices=max(jax.device_count() // f.model_axis, 1))
    mesh = sharding.make_mesh(model=f.model_axis)
  num_devices = mesh.shape['clients'] if mesh is not None else None
  if validate:
    config_lib.validate(config, num_devices=num_devices)
  if task_data is None:
    task_data = build_task_data(config, workdir or '.')
    if config.eval.federated_test_fraction:
      from fedjax_fm import evaluation  # pylint: disable=g-import-not-at-top
      train_ds, test_ds = evaluation.split_clients(
          task_data.train, config.eval.federated_test_fraction, config.seed)
      task_data = dataclasses.replace(task_data, train=train_ds, client_test=test_ds)
  if model is None:
    model, task = build_model(config, task_data)
    split = build_split(config, model, stage=stage if config.peft.method == 'slora' else 0)
    if config.peft.method == 'slora' and stage == 0:
      stage = 1
  else:   # SLoRA stage 2: the model already carries its LoRA
    task = _task(config)
    split = peft.split_model(model, 'lora', extra_trainable=tuple(config.peft.extra_trainable))
  sparse_masks = None
  if config.peft.method == 'slora' and stage == 1:
    sparse_masks = peft.slora.sparse_masks(split.trainable, config.peft.slora_density,
                                           config.seed, keep_dense=tuple(
                                               config.peft.extra_trainable))
  co, so = config.client_optimizer, config.server_optimizer
  loss_fn = models.make_loss_fn(split.graphdef, task)
  population = task_data.train.num_clients
  dp, adaptive, noise_multiplier = None, None, 0.0
  p = config.privacy
  if p.enabled:
    noise_multiplier = p.noise_multiplier
    if p.target_epsilon:
      noise_multiplier = privacy_lib.noise_multiplier_for_epsilon(
          p.target_epsilon, f.clients_per_round / population, config.num_rounds, p.delta,
          accountant=p.accountant, sampling='fixed', population=population)
    dp = privacy_lib.gaussian_dp(p.clip_norm, noise_multiplier, per_layer=p.per_layer)
    if p.adaptive:
      adaptive = privacy_lib.quantile_adaptive_clip(p.target_quantile,
                                                    learning_rate=p.clip_learning_rate)
  aggregator = _aggregator(config)
  lora = config.peft.method == 'lora' or (config.peft.method == 'slora' and stage != 1)
  if lora and config.peft.lora_aggregation != 'fedit':
    aggregator = peft.lora_aggregation.lora_aggregator(config.peft.lora_aggregation)
  attack = None
  attackers = np.zeros(population, bool)
  if config.attack.kind != 'none':
    attack = (config.attack.kind, config.attack.scale)
    attackers = aggregate_lib.choose_attackers(population, config.attack.fraction,
                                               seed=config.seed)

  uplink, downlink = build_compressors(config)
  p_cfg = config.prune

  client_tx = engine.client_optimizer(co.name, co.learning_rate, momentum=co.momentum,
                                      weight_decay=co.weight_decay)
  if sparse_masks is not None:   # SLoRA stage 1: sparse fine-tuning
    client_tx = optax.chain(client_tx, peft.slora.mask_updates(sparse_masks))

  def make_round(chunk_size):
    return engine.build_round(
        loss_fn, split.trainable,
        client_optimizer=client_tx,
        server_optimizer=engine.server_optimizer(so.name, so.learning_rate,
                                                 momentum=so.momentum, b1=so.b1, b2=so.b2,
                                                 eps=so.eps),
        num_clients=population, strategy=f.strategy, chunk_size=chunk_size,
        mesh=mesh, prox_mu=f.prox_mu, aggregator=aggregator, privacy=dp,
        adaptive_clip=adaptive, attack=attack, compressor=uplink,
        downlink_compressor=downlink, pruning=p_cfg.enabled,
        prune_scores=p_cfg.enabled and p_cfg.regrow_fraction > 0, lora_error=lora)

  if mesh is not None:
    split = split._replace(frozen=sharding.shard_frozen(split.frozen, mesh))
  evaluate = make_evaluator(split, task, task_data.eval, config.eval.batch_size,
                            config.eval.max_examples)
  groups = mesh.shape['clients'] if f.strategy == 'sharded' else 1
  chunk_size = f.chunk_size
  if f.strategy != 'vmap' and chunk_size == 0:
    # Largest chunk whose compiled round fits the memory budget (XLA's analysis).
    per_group = -(-f.clients_per_round // groups)
    sample = task_data.train.round_batch(np.arange(per_group * groups) % task_data.train.num_clients,
                                         f.local_steps, f.batch_size, seed=config.seed)
    like = memory_lib.shapes_of(sample)
    state_like = jax.eval_shape(make_round(1).init, split.trainable, jax.random.key(0))
    budget = (f.memory_budget_mb or 2048) * 2**20
    chunk_size = memory_lib.choose_chunk_size(make_round, state_like,
                                              memory_lib.shapes_of(split.frozen), like,
                                              budget, clients_per_device=per_group)
    _log(f'chunk_size={chunk_size}: the largest fitting {budget / 2**20:.0f} MiB of '
         f'temporaries per device')
  fed_round = make_round(chunk_size)
  if f.strategy == 'vmap':
    multiple = 1
  else:
    multiple = chunk_size * groups
  padded_clients = -(-f.clients_per_round // multiple) * multiple

  def round_data(round_idx: int) -> dict:
    ids = sampling.sample_clients(task_data.train.num_clients, f.clients_per_round,
                                  seed=config.seed, round_idx=round_idx)
    data = task_data.train.round_batch(ids, f.local_steps, f.batch_size, seed=config.seed,
                                       round_idx=round_idx, max_epochs=f.max_epochs,
                                       pad_clients_to=padded_clients)
    if attack is not None:
      data['attacker'] = attackers[data['client_id']] & data['client_mask']
    if mesh is not None and jax.process_count() > 1:
      # Every process derives the same round from the seed and materialises only
      # the clients of its own devices into one global array.
      data = sharding.global_round_data(data, mesh)
    return data

  accountant = None
  if dp is not None:
    accountant = privacy_lib.Accountant(
        noise_multiplier, f.clients_per_round / population, p.delta,
        accountant=p.accountant, sampling='fixed', population=population)
  return Experiment(config=config, data=task_data, split=split, task=task,
                    fed_round=fed_round, evaluate=evaluate, round_data=round_data,
                    mesh=mesh, accountant=accountant)


def build_compressors(config):
  """(uplink, downlink) compressors from ``config.compress`` (None: no compression)."""
  x = config.compress

  def one(name, fraction, bits):
    if name == 'identity':
      return None
    kw = dict(min_size=x.min_size)
    if name in ('top_k', 'random_k'):
      return compress_lib.get_compressor(name, fraction_or_k=fraction, **kw)
    if name in ('stochastic_uniform', 'qsgd', 'deterministic'):
      return compress_lib.get_compressor(name, bits=bits, block_size=x.block_size or None, **kw)
    if name in ('svd', 'powersgd'):
      return compress_lib.get_compressor(name, rank=x.rank, **kw)
    return compress_lib.get_compressor(name, **kw)

  up = one(x.uplink, x.fraction, x.bits)
  if up is not None and x.then != 'none':
    up = compress_lib.chain(up, one(x.then, x.fraction, x.then_bits))
  if up is not None and x.error_feedback:
    up = compress_lib.error_feedback(up)
  return up, one(x.downlink, x.downlink_fraction, x.downlink_bits)


def evaluate_clients(exp: Experiment, trainable, frozen=None):
  """Per-client evaluation on local test data, and the personalisation baseline."""
  from fedjax_fm import evaluation  # pylint: disable=g-import-not-at-top
  cfg = exp.config
  frozen = exp.split.frozen if frozen is None else frozen
  eval_fn = models.make_eval_fn(exp.split.graphdef, exp.task)
  per_client = evaluation.per_client_eval(eval_fn, trainable, frozen, exp.data.client_test,
                                          batch_size=cfg.fl.batch_size)
  federated = {'per_client': {k: np.asarray(v).tolist() for k, v in per_client.items()},
               'distribution': evaluation.summarize(per_client)}
  personal = None
  if cfg.eval.personalize_steps:
    co = cfg.client_optimizer
    out = evaluation.personalize(
        models.make_loss_fn(exp.split.graphdef, exp.task), eval_fn, trainable, frozen,
        exp.data.train, exp.data.client_test, steps=cfg.eval.personalize_steps,
        batch_size=cfg.fl.batch_size,
        optimizer=engine.client_optimizer(co.name, co.learning_rate, momentum=co.momentum),
        seed=cfg.seed)
    personal = {'after_distribution': out['after_distribution'],
                'after': {k: np.asarray(v).tolist() for k, v in out['after'].items()}}
  return federated, personal


def evaluate_generation(exp: Experiment, trainable, frozen=None) -> dict:
  """Greedy responses to held-out instructions, scored by ROUGE-L, EM and token F1."""
  from fedjax_fm import evaluation  # pylint: disable=g-import-not-at-top
  d = exp.config.data
  held = {k: v[:d.generate_examples] for k, v in exp.data.instructions.items()}
  tok = exp.data.tokenizer
  room = d.max_len - d.generate_max_tokens
  if room < 2:
    raise config_lib.ConfigError(
        f'config.data.generate_max_tokens={d.generate_max_tokens} leaves no room for the '
        f'prompt within config.data.max_len={d.max_len}')
  enc = data_lib.instructions.tokenize_prompts(held, tok, room,
                                               template=d.instruction_template)
  frozen = exp.split.frozen if frozen is None else frozen
  eos = getattr(getattr(tok, 'processor', None), 'eos_id', lambda: None)()
  out = models.generate((exp.split.graphdef, trainable, frozen), enc['input_ids'],
                        d.generate_max_tokens, prompt_mask=enc['attention_mask'],
                        eos_id=eos if eos is not None and eos >= 0 else None)
  ids, lengths = np.asarray(out.ids), np.asarray(out.lengths)
  preds = [tok.decode([int(t) for t in row[:n]]) for row, n in zip(ids, lengths)]
  m = evaluation.generative_metrics(preds, [str(r) for r in held['output']])
  return {k: float(v) for k, v in m.items() if k != 'num_examples'}


def _aggregator(config):
  a = config.aggregator
  if a.name == 'mean':
    return None
  if a.name == 'norm_bounded_mean':
    return aggregate_lib.norm_bounded_mean(a.max_norm)
  if a.name == 'median':
    return aggregate_lib.coordinate_median()
  if a.name == 'trimmed_mean':
    return aggregate_lib.trimmed_mean(a.trim_fraction)
  if a.name == 'krum':
    return aggregate_lib.krum(a.num_byzantine)
  if a.name == 'multi_krum':
    return aggregate_lib.multi_krum(a.num_byzantine, a.multi_krum_m or None)
  if a.name == 'secure_mean':
    return privacy_lib.secure_agg.secure_mean(a.secure_clip_range, seed=config.seed)
  return aggregate_lib.geometric_median()


# --------------------------------------------------------------------- run

def _fmt_bytes(n: float) -> str:
  for unit in ('B', 'KiB', 'MiB', 'GiB'):
    if n < 1024 or unit == 'GiB':
      return f'{n:.1f} {unit}' if unit != 'B' else f'{int(n)} B'
    n /= 1024
  return str(n)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains a federated experiment and writes its metrics into ``workdir``.

  Writes ``workdir/metrics.jsonl`` (one JSON object per round) and
  ``workdir/summary.json``.

  Returns:
    The summary: held-out metrics before and after, totals and timings.
  """
  os.makedirs(workdir, exist_ok=True)
  if config.peft.method == 'slora':
    return _run_slora(config, workdir)
  summary, _, _ = train_experiment(build_experiment(config, workdir), workdir)
  return summary


def _run_slora(config, workdir: str) -> dict:
  """SLoRA: sparse fine-tuning first, then LoRA initialised from its update."""
  p = config.peft
  config_lib.validate(config)
  c1 = ml_collections.ConfigDict(config.to_dict())
  c1.num_rounds = p.slora_stage1_rounds
  exp1 = build_experiment(c1, workdir, validate=False)
  _log(f'SLoRA stage 1: sparse fine-tuning ({p.slora_density:.0%} of each target kernel) for '
       f'{c1.num_rounds} rounds')
  s1, state1, _ = train_experiment(exp1, os.path.join(workdir, 'stage1'))
  deltas = tree_util.tree_sub(jax.device_get(state1.params), exp1.split.trainable)
  model = peft.merge(exp1.split.graphdef, exp1.split.trainable, exp1.split.frozen)
  peft.slora.slora_stage2(model, deltas, p.rank, p.alpha,
                          target_modules=tuple(p.target_modules), dropout=p.dropout,
                          rngs=nnx.Rngs(config.seed + 2))
  c2 = ml_collections.ConfigDict(config.to_dict())
  c2.num_rounds = config.num_rounds - p.slora_stage1_rounds
  exp2 = build_experiment(c2, workdir, model=model, stage=2, task_data=exp1.data,
                          validate=False)
  _log(f'SLoRA stage 2: LoRA rank {p.rank} from the SVD of the stage-1 update, '
       f'{c2.num_rounds} rounds')
  s2, _, _ = train_experiment(exp2, os.path.join(workdir, 'stage2'))
  summary = dict(s2, before=s1['before'], stage1_after=s1['after'],
                 rounds=config.num_rounds,
                 uplink_bytes_total=s1['uplink_bytes_total'] + s2['uplink_bytes_total'],
                 downlink_bytes_total=s1['downlink_bytes_total'] + s2['downlink_bytes_total'])
  if sharding.is_main_process():
    with open(os.path.join(workdir, 'summary.json'), 'w') as fh:
      json.dump(summary, fh, indent=2)
  return summary


def train_experiment(exp: Experiment, workdir: str):
  """The training loop of a built experiment; returns (summary, state, frozen)."""
  os.makedirs(workdir, exist_ok=True)
  t_start = time.time()
  main_process = sharding.is_main_process()   # logs, metrics and summary: process 0 only
  cfg, split, fed = exp.config, exp.split, exp.fed_round
  train = exp.data.train
  n_trainable = tree_util.tree_size(split.trainable)
  n_frozen = tree_util.tree_size(split.frozen)
  _log(f'data: {exp.data.description}; {train.num_examples} training examples over '
       f'{train.num_clients} clients (partition={cfg.data.partition}), '
       f'{len(next(iter(exp.data.eval.values())))} held out')
  _log(f'model: {cfg.model.kind}, peft={cfg.peft.method}: {n_trainable:,} trainable params '
       f'({100.0 * n_trainable / max(n_trainable + n_frozen, 1):.2f}% of '
       f'{n_trainable + n_frozen:,}), {_fmt_bytes(fed.uplink_bytes_per_client)} uplink per '
       f'client per round')

  # ---- before, or resume
  state = fed.init(split.trainable, jax.random.key(cfg.seed))
  if exp.mesh is not None:
    state = sharding.replicate(state, exp.mesh)
  frozen = split.frozen
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                     every=cfg.checkpoint.every, keep=cfg.checkpoint.keep)
  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  start = 0
  if ckpt.latest_round() is not None:
    if 'base_delta' in state.aux:
      raise ValueError(
          f'{ckpt.directory} holds a checkpoint, but peft.lora_aggregation="stack" merges '
          'into the frozen base every round, which checkpoints do not hold: use a new workdir')
    state, extras = ckpt.restore(state)
    start = int(state.round)
    before, last_eval = extras['before'], extras['last_eval']
    total_up, total_down = extras['total_up'], extras['total_down']
    if main_process:
      _keep_records(metrics_path, start)
    _log(f'resumed from {ckpt.directory} at round {start}')
    if exp.accountant is not None:
      exp.accountant.step(start)
  else:
    before = exp.evaluate(split.trainable)
    last_eval = before
    total_up = total_down = 0
    if main_process:
      _keep_records(metrics_path, 0)
    _log('held-out before: ' + _fmt_metrics(before))

  # ---- train
  compile_s = 0.0
  rounds = range(start, cfg.num_rounds)
  progress = _progress(rounds, cfg.progress)
  compiled = None
  prune_step = _make_prune_step(cfg) if cfg.prune.enabled else None
  writer = None
  if cfg.tensorboard and main_process:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    writer = SummaryWriter(os.path.join(workdir, 'tensorboard'))
    if start == 0:
      for k, v in before.items():
        writer.add_scalar(f'eval/{k}', v, 0)
  with open(metrics_path if main_process else os.devnull, 'a') as out:
    for r, data in zip(progress, data_lib.prefetch(exp.round_data(r) for r in rounds)):
      mask_down = 0
      if prune_step is not None:
        state, changed = prune_step(state, r)
        if changed:   # new masks go down to every client of this round
          mask_down = prune_lib.mask_nbytes(state.aux['masks'])
      t0 = time.time()
      if compiled is None:
        compiled = fed.apply.lower(state, frozen, data).compile()
        compile_s = time.time() - t0
        t0 = time.time()
      state, m = compiled(state, frozen, data)
      if 'base_delta' in state.aux:   # FLoRA stacking: merge the exact mean product
        frozen = peft.lora_aggregation.merge_into_base(
            frozen, state.aux['base_delta'], scaling=cfg.peft.alpha / cfg.peft.rank)
      m = sharding.to_host(m)
      round_s = time.time() - t0
      n_clients = int(m['num_clients'])
      up = n_clients * fed.uplink_bytes_per_client
      down = n_clients * (fed.downlink_bytes_per_client + mask_down)
      total_up += up
      total_down += down
      cmask = np.asarray(m['client_mask'])
      record = {
          'round': r + 1, 'train_loss': float(m['train_loss']), 'num_clients': n_clients,
          'examples': int(m['examples']), 'uplink_bytes': up, 'downlink_bytes': down,
          'cum_uplink_bytes': total_up, 'update_norm': float(m['update_norm']),
          'param_norm': float(m['param_norm']), 'round_time_s': round_s,
          'client_loss': [float(v) for v in np.asarray(m['client_loss'])[cmask]],
          'client_update_norm': [float(v) for v in np.asarray(m['client_update_norm'])[cmask]],
      }
      if r == start:
        record['compile_time_s'] = compile_s
      if 'lora_aggregation_error' in m:
        record['lora_aggregation_error'] = float(m['lora_aggregation_error'])
      if prune_step is not None:
        record['sparsity'] = float(prune_lib.sparsity_of(state.aux['masks'], state.params,
                                                         min_size=cfg.prune.min_size))
      if exp.accountant is not None:
        record['epsilon'] = exp.accountant.step()
        record['clip_norm'] = float(m['clip_norm'])
      if 'nonfinite_clients' in m and int(m['nonfinite_clients']):
        record['nonfinite_clients'] = int(m['nonfinite_clients'])
      if (r + 1) % cfg.eval.every == 0 or r + 1 == cfg.num_rounds:
        last_eval = exp.evaluate(state.params, frozen)
        record['eval'] = last_eval
      out.write(json.dumps(record) + '\n')
      out.flush()
      if writer is not None:
        _write_tensorboard(writer, record)
      ckpt.maybe_save(state, dict(before=before, last_eval=last_eval, total_up=total_up,
                                  total_down=total_down),
                      force=r + 1 == cfg.num_rounds)
      if hasattr(progress, 'set_postfix'):
        progress.set_postfix(loss=f'{record["train_loss"]:.4f}')
      if (r + 1) % cfg.log_every == 0 or 'eval' in record:
        line = (f'round {r + 1}/{cfg.num_rounds} loss={record["train_loss"]:.4f} '
                f'clients={n_clients} up={_fmt_bytes(up)} time={round_s:.3f}s')
        if 'epsilon' in record:
          line += f' eps={record["epsilon"]:.3g}'
        if r == start:
          line += f' (compile {compile_s:.1f}s)'
        if 'eval' in record:
          line += ' | held-out ' + _fmt_metrics(record['eval'])
        _log(line, progress)
  ckpt.close()
  if writer is not None:
    writer.close()

  federated = personal = None
  if exp.data.client_test is not None:
    federated, personal = evaluate_clients(exp, state.params, frozen)
    if main_process:
      with open(os.path.join(workdir, 'client_eval.json'), 'w') as fh:
        json.dump({'federated': federated, 'personalization': personal}, fh)
    for name, dist in federated['distribution'].items():
      if name not in ('accuracy', 'loss', 'perplexity'):
        continue
      _log(f'per-client {name}: ' + _fmt_metrics({k: v for k, v in dist.items()
                                                  if k in ('mean', 'p10', 'worst')}))
    if personal is not None:
      for name, dist in personal['after_distribution'].items():
        if name not in ('accuracy', 'loss', 'perplexity'):
          continue
        _log(f'personalised ({cfg.eval.personalize_steps} steps) per-client {name}: ' +
             _fmt_metrics({k: v for k, v in dist.items() if k in ('mean', 'p10', 'worst')}))
  generation = None
  if exp.data.instructions is not None and cfg.data.generate_examples:
    generation = evaluate_generation(exp, state.params, frozen)
    _log('generation on held-out instructions: ' + _fmt_metrics(generation))
  summary = {
      'before': before, 'after': last_eval, 'rounds': cfg.num_rounds,
      'trainable_params': n_trainable, 'frozen_params': n_frozen,
      'uplink_bytes_total': total_up, 'downlink_bytes_total': total_down,
      'compile_time_s': compile_s, 'total_time_s': time.time() - t_start,
      'data': exp.data.description, 'final_round': int(state.round),
  }
  if generation is not None:
    summary['generation'] = generation
  if federated is not None:
    summary['client_distribution'] = federated['distribution']
  if personal is not None:
    summary['personalized_distribution'] = personal['after_distribution']
  if exp.accountant is not None:
    summary['epsilon'] = exp.accountant.epsilon
    summary['delta'] = cfg.privacy.delta
    summary['noise_multiplier'] = exp.accountant.noise_multiplier
  if main_process:
    with open(os.path.join(workdir, 'summary.json'), 'w') as fh:
      json.dump(summary, fh, indent=2)
  _log(f'held-out after {cfg.num_rounds} rounds: ' + _fmt_metrics(last_eval) +
       f' (before: {_fmt_metrics(before)}); uplink total {_fmt_bytes(total_up)}; '
       f'{summary["total_time_s"]:.0f}s')
  return summary, state, frozen


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
    old = state.aux['masks']
    if r <= end:
      masks = masks_fn(state.params, jnp.float32(schedule(r)))
      params = prune_lib.apply_masks(state.params, masks)
    elif p.regrow_fraction:
      params, masks = regrow_fn(state.params, old, state.aux['prune_scores'])
    else:
      return state, False
    changed = bool(prune_lib.masks_changed(old, masks))
    return state._replace(params=params, aux=dict(state.aux, masks=masks)), changed

  return step


def _write_tensorboard(writer, record: dict) -> None:
  step = record['round']
  for k in ('train_loss', 'update_norm', 'param_norm', 'round_time_s', 'epsilon', 'sparsity',
            'clip_norm'):
    if k in record:
      writer.add_scalar(f'train/{k}', record[k], step)
  writer.add_scalar('comm/uplink_bytes', record['uplink_bytes'], step)
  writer.add_scalar('comm/cum_uplink_bytes', record['cum_uplink_bytes'], step)
  writer.add_scalar('comm/downlink_bytes', record['downlink_bytes'], step)
  if record['client_loss']:
    writer.add_histogram('train/client_loss', np.asarray(record['client_loss']), step)
  for k, v in record.get('eval', {}).items():
    writer.add_scalar(f'eval/{k}', v, step)
  writer.flush()


def _keep_records(path: str, upto: int) -> None:
  """Keeps the metrics records of rounds <= upto (drops those of a killed run)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  kept = []
  for line in lines:
    try:
      if json.loads(line)['round'] <= upto:
        kept.append(line)
    except (json.JSONDecodeError, KeyError):
      break   # a torn last line from a kill mid-write
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.writelines(kept)
  os.replace(tmp, path)


def _fmt_metrics(m: dict) -> str:
  return ' '.join(f'{k}={v:.4f}' for k, v in m.items())


def _progress(it, enabled: bool):
  if not enabled or not sharding.is_main_process():
    return it
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(it, desc='rounds', unit='round', dynamic_ncols=True)


def _log(msg: str, progress=None):
  logger.info(msg)
  if not sharding.is_main_process():
    return
  if progress is not None and hasattr(progress, 'write'):
    progress.write(msg)
  else:
    print(msg, flush=True)
