"""Task data from the config: load, featurize, hold out, partition the clients.

`build_task_data(config, workdir)` returns a `TaskData`: the clients'
`FederatedDataset`, a held-out split, and what the model and the evaluation
need (label names, tokenizer, held-out instructions).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any

import numpy as np

from fedjax_fm import config as config_lib
from fedjax_fm import data as data_lib
from fedjax_fm.data import partition as partition_lib
from fedjax_fm.hf import hub as hf_hub


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
  prompt_template: Any = None        # instructions: a data.PromptTemplate (None: by name)
  eos_id: int | None = None          # instructions: the id that ends a response


# --------------------------------------------------------------------- data

def _tokenizer(config, texts, workdir):
  d = config.data
  if d.tokenizer == 'model':
    from fedjax_fm.train import registries  # pylint: disable=g-import-not-at-top
    return registries.load_pretrained_decoder(config).tokenizer
  if d.tokenizer == 'minilm':
    return data_lib.HFTokenizer.from_pretrained_dir(hf_hub.minilm_dir())
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


def load_raw(config) -> tuple[dict[str, np.ndarray], tuple[str, ...], str]:
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


def _load_instructions(config) -> tuple[dict[str, np.ndarray], str]:
  """The instruction records of ``config.data`` and a description of them."""
  d = config.data
  if d.source == 'stdlib_instructions':
    ex = data_lib.load_stdlib_instructions(packages=tuple(d.packages) or None,
                                           include_topics=d.stdlib_topics)
    if d.max_examples:
      ex = {k: v[:d.max_examples] for k, v in ex.items()}
    packages = len(set(ex['category']))
    desc = (f'descriptions of the Python {sys.version_info.major}.{sys.version_info.minor} '
            f'standard library\'s functions ({len(ex["output"])} examples, {packages} '
            f'top-level packages)')
    return ex, desc
  path = d.path or str(data_lib.instructions.sample_path())
  ex = data_lib.load_instructions(path, max_examples=d.max_examples or None)
  return ex, f'instructions {path} ({len(ex["output"])} examples)'


def _instruction_data(config, workdir):
  """Instruction tuning: prompts + responses, loss on the response tokens only.

  Returns (arrays, examples, tokenizer, template, eos_id, description). With
  ``data.source="stdlib_instructions"`` the examples whose prompt and response
  do not fit ``data.max_len`` tokens are dropped (they would train on a cut
  response and be generated from a cut prompt).
  """
  d = config.data
  ex, desc = _load_instructions(config)
  template, eos_id = d.instruction_template, None
  if d.tokenizer == 'model':
    from fedjax_fm.train import registries  # pylint: disable=g-import-not-at-top
    pretrained = registries.load_pretrained_decoder(config)
    tokenizer, eos_id = pretrained.tokenizer, pretrained.eos_id
    if d.instruction_template == 'chat':
      if pretrained.prompt_template is None:
        raise config_lib.ConfigError(
            f'config.data.instruction_template="chat" is invalid: {pretrained.description} '
            'has no chat template')
      template = pretrained.prompt_template
  else:
    texts = data_lib.instructions.format_prompts(ex, template)
    tokenizer = _tokenizer(config, [t + ' ' + o for t, o in zip(texts, ex['output'])],
                           workdir)
  width = d.max_len + (d.source == 'stdlib_instructions')
  enc = data_lib.tokenize_instructions(ex, tokenizer, width, template=template, eos_id=eos_id)
  if d.source == 'stdlib_instructions':
    fits = enc['attention_mask'][:, -1] == 0
    if not fits.any():
      raise config_lib.ConfigError(
          f'config.data.max_len={d.max_len} is invalid: no example fits it')
    ex = {k: np.asarray(v)[fits] for k, v in ex.items()}
    enc = {k: v[fits, :d.max_len] for k, v in enc.items()}
    desc += f'; {int(fits.sum())} fit {d.max_len} tokens'
  arrays = {'input_ids': enc['input_ids'], 'attention_mask': enc['attention_mask'],
            'loss_mask': enc['loss_mask'], 'category': np.asarray(ex['category']).astype(str),
            'row': np.arange(len(enc['input_ids']))}
  return arrays, ex, tokenizer, template, eos_id, desc


def build_task_data(config, workdir: str = '.') -> TaskData:
  """Loads, featurizes, splits off the held-out set and partitions the clients."""
  d = config.data
  if d.source in config_lib.INSTRUCTION_SOURCES:
    return _build_instruction_task_data(config, workdir)
  arrays, names, desc = load_raw(config)
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

  # Partition the training examples over clients (`data.partition`'s registry).
  if d.partition == 'natural':
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
  else:
    if d.partition in ('dirichlet', 'shards') and 'label' not in train_arrays:
      _require_labels(d)
    kwargs = {
        'iid': dict(num_examples=n_train),
        'dirichlet': dict(labels=train_arrays.get('label'), alpha=d.alpha,
                          min_size=d.min_client_size),
        'shards': dict(labels=train_arrays.get('label'),
                       labels_per_client=d.labels_per_client),
        'quantity_skew': dict(num_examples=n_train, sigma=d.sigma,
                              min_size=max(d.min_client_size, 1)),
    }[d.partition]
    parts = partition_lib.partition(d.partition, num_clients=d.num_clients, seed=config.seed,
                                    **kwargs)
  train = data_lib.FederatedDataset.from_partition(train_arrays, parts)
  return TaskData(train=train, eval=eval_arrays, num_labels=len(names), label_names=names,
                  tokenizer=tokenizer, description=desc)


def _build_instruction_task_data(config, workdir) -> TaskData:
  d = config.data
  arrays, examples, tokenizer, template, eos_id, desc = _instruction_data(config, workdir)
  n = len(arrays['row'])
  rng = np.random.default_rng(config.seed)
  if d.eval_split == 'clients':
    # Whole clients held out: a seeded eval_fraction of the categories.
    names = np.unique(arrays['category'])
    n_eval = max(1, int(round(len(names) * d.eval_fraction)))
    if len(names) - n_eval < config.fl.clients_per_round:
      raise config_lib.ConfigError(
          f'config.data.eval_fraction={d.eval_fraction} is invalid: holding out {n_eval} of '
          f'{len(names)} clients leaves fewer than config.fl.clients_per_round='
          f'{config.fl.clients_per_round} to train')
    held = np.sort(rng.permutation(names)[:n_eval])
    is_eval = np.isin(arrays['category'], held)
    eval_idx = rng.permutation(np.flatnonzero(is_eval))      # random order across clients
    train_idx = np.flatnonzero(~is_eval)
    desc += f'; {n_eval} of {len(names)} clients held out ({", ".join(held)})'
  else:
    perm = rng.permutation(n)
    n_eval = max(1, int(round(n * d.eval_fraction)))
    eval_idx, train_idx = perm[:n_eval], np.sort(perm[n_eval:])   # eval in random order
  feats = ('input_ids', 'attention_mask', 'loss_mask')
  train_arrays = {k: arrays[k][train_idx] for k in feats}
  eval_arrays = {k: arrays[k][eval_idx] for k in feats}
  parts = data_lib.partition_instructions(
      {'category': np.asarray(examples['category'])[train_idx]}, d.partition,
      num_clients=None if d.partition == 'natural' else d.num_clients,
      alpha=d.alpha, seed=config.seed, min_size=d.min_client_size)
  if len(parts) < config.fl.clients_per_round:
    raise config_lib.ConfigError(
        f'config.fl.clients_per_round={config.fl.clients_per_round} is invalid: the '
        f'{d.partition} partition has only {len(parts)} clients')
  held_out = {k: np.asarray(examples[k])[eval_idx]
              for k in ('instruction', 'input', 'output', 'category')}
  return TaskData(train=data_lib.FederatedDataset.from_partition(train_arrays, parts),
                  eval=eval_arrays, tokenizer=tokenizer, description=desc,
                  instructions=held_out, prompt_template=template, eos_id=eos_id)


def _require_labels(d):
  raise config_lib.ConfigError(
      f'config.data.partition={d.partition!r} needs labels; use "iid", "quantity_skew" or '
      '"natural" for unlabelled data')


