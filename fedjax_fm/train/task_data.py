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
from fedjax_fm.data import instructions as instructions_lib
from fedjax_fm.data import partition as partition_lib
from fedjax_fm.data import tokenizers as tokenizers_lib
from fedjax_fm.evaluation import heldout
from fedjax_fm.hf import hub as hf_hub
from fedjax_fm.train import logs


CHAR_VOCAB_FILE = 'char_vocab.json'   # data.tokenizer="char": the vocabulary, under workdir


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
  client_names: tuple[str, ...] = ()  # natural partition: the name of each training client
  eval_clients: Any = None           # [n_eval] client field value of each held-out example
  eval_groups: Any = None            # [n_eval] data.eval_group_key value of each one
  eval_inputs: Any = None            # [n_eval] held-out input texts (text classification)


# --------------------------------------------------------------------- data

def _trains_tokenizer(d) -> bool:
  """Whether the tokenizer is trained on the data (then on the training rows only)."""
  return d.tokenizer in ('sentencepiece', 'char') and not d.tokenizer_path


def _check_sentencepiece_vocab(d, texts) -> None:
  """Raises a ConfigError before training when data.vocab_size cannot hold the characters."""
  texts = [t for t in texts if t.strip()]
  need = tokenizers_lib.sentencepiece_min_vocab(
      texts, character_coverage=d.character_coverage, byte_fallback=d.byte_fallback)
  if not texts or d.vocab_size >= need.min_vocab_size:
    return
  lo = tokenizers_lib.SPM_COVERAGE_RANGE[0]
  at_lo = tokenizers_lib.sentencepiece_min_vocab(
      texts, character_coverage=lo, byte_fallback=d.byte_fallback).min_vocab_size
  fallback = (', plus 256 byte pieces (config.data.byte_fallback=True)' if d.byte_fallback
              else '')
  raise config_lib.ConfigError(
      f'config.data.vocab_size={d.vocab_size} is invalid: SentencePiece needs at least '
      f'{need.min_vocab_size} pieces for the training rows. They hold {need.distinct_chars} '
      f'distinct characters (spaces count as one), config.data.character_coverage='
      f'{d.character_coverage} keeps {need.required_chars} of them, plus '
      f'{need.special_pieces} special pieces'
      f'{fallback}. Raise config.data.vocab_size to >= {need.min_vocab_size}, lower '
      f'config.data.character_coverage (at {lo}: {at_lo} pieces), or use '
      'data.tokenizer="char" (one token per character)')


def _tokenizer(config, texts, workdir):
  """The tokenizer of ``config.data``; one trained on the data reads ``texts`` only."""
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
  if d.tokenizer == 'char':
    if d.tokenizer_path:
      return tokenizers_lib.CharTokenizer.load(d.tokenizer_path, add_bos=True)
    os.makedirs(workdir, exist_ok=True)
    return tokenizers_lib.CharTokenizer.train(
        list(texts), add_bos=True, path=os.path.join(workdir, CHAR_VOCAB_FILE))
  # sentencepiece: load a model file, or train one on the training texts.
  if d.tokenizer_path:
    return data_lib.SentencePieceTokenizer.load(d.tokenizer_path, add_bos=True)
  texts = list(texts)
  _check_sentencepiece_vocab(d, texts)
  os.makedirs(workdir, exist_ok=True)
  prefix = os.path.join(workdir, 'spm')
  return data_lib.SentencePieceTokenizer.train(
      texts, vocab_size=d.vocab_size, model_path_prefix=prefix, add_bos=True,
      character_coverage=float(d.character_coverage), byte_fallback=bool(d.byte_fallback))


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
    if labels.dtype.kind == 'O':
      # Strings mixed with numbers are strings throughout (as `data.load_jsonl` makes them).
      labels = np.asarray([_label_text(v) for v in labels], dtype=object)
      bad = [(i, v) for i, v in enumerate(arrays[d.label_key]) if labels[i] is None]
      if bad:
        raise config_lib.ConfigError(
            f'config.data.label_key={d.label_key!r}: labels must be integers or strings; '
            f'{len(bad)} are not, e.g. row {bad[0][0]}: {bad[0][1]!r} '
            f'({type(bad[0][1]).__name__})')
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


def _load_instructions(config) -> tuple[dict[str, np.ndarray], str, str]:
  """The instruction records of ``config.data``, a description and the client key.

  The records hold the normalised fields (`data.instructions.FIELDS`) and the
  fields that ``data.client_key`` and ``data.prompt_template`` name.
  """
  d = config.data
  key = d.client_key or 'category'
  names = (instructions_lib.template_fields(d.prompt_template) if d.prompt_template
           else ())
  keep = tuple(dict.fromkeys([key, *names] + ([d.eval_group_key] if d.eval_group_key else [])))
  if d.source == 'stdlib_instructions':
    ex = data_lib.load_stdlib_instructions(packages=tuple(d.packages) or None,
                                           include_topics=d.stdlib_topics)
    if d.max_examples:
      ex = {k: v[:d.max_examples] for k, v in ex.items()}
    for name in keep:
      if name not in ex:
        field = ('client_key' if name == key else 'eval_group_key'
                 if name == d.eval_group_key else 'prompt_template')
        raise config_lib.ConfigError(
            f'config.data.{field}={d[field]!r} is invalid: {name!r} is not a field of the '
            f'standard library records; fields: {sorted(ex)}')
    packages = len(set(ex['category']))
    desc = (f'descriptions of the Python {sys.version_info.major}.{sys.version_info.minor} '
            f'standard library\'s functions ({len(ex["output"])} examples, {packages} '
            f'top-level packages)')
    return ex, desc, key
  path = d.path or str(data_lib.instructions.sample_path())
  try:
    ex = data_lib.load_instructions(path, max_examples=d.max_examples or None,
                                    input_key=d.input_key or None,
                                    target_key=d.target_key or None, keep=keep)
  except instructions_lib.MissingFieldError as e:
    if e.field == d.input_key:
      field = 'input_key'
    elif e.field == d.target_key:
      field = 'target_key'
    elif e.field == key:
      field = 'client_key'
    else:
      field = 'eval_group_key' if e.field == d.eval_group_key else 'prompt_template'
    raise config_lib.ConfigError(
        f'config.data.{field}={d[field]!r} is invalid: no record of {path!r} has the field '
        f'{e.field!r}; fields: {list(e.available)}') from None
  return ex, f'instructions {path} ({len(ex["output"])} examples)', key


def _instruction_split(config, clients: np.ndarray,
                       groups: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, str]:
  """(train, eval, description) indices of the held-out split (`evaluation.heldout`)."""
  split = heldout.heldout_split(config, len(clients), clients=clients, groups=groups,
                                client_key=_client_key(config.data))
  return split.train, split.eval, split.description


def _build_instruction_task_data(config, workdir) -> TaskData:
  """Instruction tuning: prompts + responses, loss on the response tokens only.

  The held-out split is drawn first when the tokenizer is trained on the data
  (it reads the training rows only). With ``data.source="stdlib_instructions"``
  the examples whose prompt and response do not fit ``data.max_len`` tokens are
  dropped (they would train on a cut response and be generated from a cut prompt).
  """
  d = config.data
  ex, desc, key = _load_instructions(config)
  clients = np.asarray(ex[key]).astype(str)
  groups = (np.asarray(ex[d.eval_group_key]).astype(str) if d.eval_group_key else None)
  n = len(clients)
  template = (instructions_lib.PromptTemplate(d.prompt_template) if d.prompt_template
              else d.instruction_template)
  tokenizer, eos_id, split = None, None, None
  if d.tokenizer == 'model':
    from fedjax_fm.train import registries  # pylint: disable=g-import-not-at-top
    pretrained = registries.load_pretrained_decoder(config)
    tokenizer, eos_id = pretrained.tokenizer, pretrained.eos_id
    if d.instruction_template == 'chat' and not d.prompt_template:
      if pretrained.prompt_template is None:
        raise config_lib.ConfigError(
            f'config.data.instruction_template="chat" is invalid: {pretrained.description} '
            'has no chat template')
      template = pretrained.prompt_template
  elif _trains_tokenizer(d):
    split = _instruction_split(config, clients, groups)
    prompts = data_lib.instructions.format_prompts(ex, template)
    outputs = ex['output']
    tokenizer = _tokenizer(config, [prompts[i] + ' ' + outputs[i] for i in split[0]],
                           workdir)
  else:
    tokenizer = _tokenizer(config, (), workdir)
  if eos_id is None and isinstance(getattr(tokenizer, 'eos_id', None), int):
    eos_id = tokenizer.eos_id
  width = d.max_len + (d.source == 'stdlib_instructions')
  enc = data_lib.tokenize_instructions(ex, tokenizer, width, template=template, eos_id=eos_id)
  keep = np.arange(n)
  if d.source == 'stdlib_instructions':
    fits = enc['attention_mask'][:, -1] == 0
    if not fits.any():
      raise config_lib.ConfigError(
          f'config.data.max_len={d.max_len} is invalid: no example fits it')
    keep = np.flatnonzero(fits)
    enc = {k: v[:, :d.max_len] for k, v in enc.items()}
    desc += f'; {int(fits.sum())} fit {d.max_len} tokens'
  if split is None:
    train_idx, eval_idx, split_desc = _instruction_split(
        config, clients[keep], None if groups is None else groups[keep])
    train_idx, eval_idx = keep[train_idx], keep[eval_idx]
  else:
    train_idx, eval_idx, split_desc = split
    train_idx = train_idx[np.isin(train_idx, keep)]
    eval_idx = eval_idx[np.isin(eval_idx, keep)]
    if not len(eval_idx):
      raise config_lib.ConfigError(
          f'config.data.max_len={d.max_len} is invalid: no held-out example fits it')
  desc += split_desc
  feats = ('input_ids', 'attention_mask', 'loss_mask')
  train_arrays = {k: enc[k][train_idx] for k in feats}
  eval_arrays = {k: enc[k][eval_idx] for k in feats}
  n_train = len(train_idx)
  values = clients[train_idx]
  natural = d.partition == 'natural'
  if not natural:
    _check_partition_sizes(config, n_train)
  try:
    parts = data_lib.partition_instructions(
        {key: values}, d.partition, num_clients=None if natural else d.num_clients,
        alpha=d.alpha, seed=config.seed, min_size=d.min_client_size, key=key)
  except partition_lib.MinSizeError as e:
    raise _min_size_error(config, e, values, f'distinct values of {key!r}') from None
  if natural:
    _check_natural(config, key, values, len(parts), default_key='category')
  elif len(parts) < config.fl.clients_per_round:
    raise config_lib.ConfigError(
        f'config.fl.clients_per_round={config.fl.clients_per_round} is invalid: the '
        f'{d.partition} partition has only {len(parts)} clients')
  names = ('instruction', 'input', 'output')
  if d.prompt_template:
    names += tuple(f for f in instructions_lib.template_fields(d.prompt_template)
                   if f not in names and f != 'category')
  held_out = {k: np.asarray(ex[k])[eval_idx] for k in names}
  held_out['category'] = clients[eval_idx]
  eval_groups = None
  if groups is not None:
    held_out['group'] = eval_groups = groups[eval_idx]
  client_names = tuple(str(v) for v in np.unique(values)) if natural else ()
  return TaskData(train=data_lib.FederatedDataset.from_partition(train_arrays, parts),
                  eval=eval_arrays, tokenizer=tokenizer, description=desc,
                  instructions=held_out, prompt_template=template, eos_id=eos_id,
                  client_names=client_names, eval_clients=clients[eval_idx],
                  eval_groups=eval_groups)


# ----------------------------------------------------------- partition checks

def _client_key(d) -> str:
  if d.client_key:
    return d.client_key
  return 'category' if d.source in config_lib.INSTRUCTION_SOURCES else 'module'


def _check_natural(config, key: str, values: np.ndarray, num_clients: int,
                   default_key: str) -> None:
  """A natural partition must give at least ``fl.clients_per_round`` clients."""
  cpr = config.fl.clients_per_round
  if num_clients >= cpr:
    return
  distinct = np.unique(values)
  shown = ', '.join(repr(str(v)) for v in distinct[:5]) + (', ...' if len(distinct) > 5 else '')
  origin = ('config.data.client_key' if config.data.client_key
            else f'config.data.client_key is empty: the default {default_key!r}')
  why = ''
  if list(distinct) == [instructions_lib.NO_CATEGORY] and key == 'category':
    why = (f' (records without a {key!r} field all fall in the client '
           f'{instructions_lib.NO_CATEGORY!r})')
  raise config_lib.ConfigError(
      f'config.fl.clients_per_round={cpr} is invalid: the natural partition makes one client '
      f'per distinct value of the field {key!r} ({origin}), and its {len(values)} training '
      f'examples have {len(distinct)} ({shown}){why}. Set config.data.client_key to a field '
      f'with at least {cpr} distinct values, lower config.fl.clients_per_round to '
      f'<= {len(distinct)}, or use config.data.partition="iid" or "dirichlet" with '
      'config.data.num_clients')


def _check_partition_sizes(config, n_train: int) -> None:
  """The sizes a random partition needs, named by their config fields."""
  d = config.data
  if d.num_clients > n_train:
    raise config_lib.ConfigError(
        f'config.data.num_clients={d.num_clients} is invalid: must be <= the number of '
        f'training examples ({n_train})')
  min_size = max(d.min_client_size, 1) if d.partition == 'quantity_skew' else d.min_client_size
  if d.partition in ('dirichlet', 'quantity_skew') and min_size * d.num_clients > n_train:
    raise config_lib.ConfigError(
        f'config.data.min_client_size={d.min_client_size} is invalid: '
        f'{min_size} x config.data.num_clients={d.num_clients} exceeds the {n_train} '
        'training examples; lower config.data.min_client_size or config.data.num_clients')
  if d.partition == 'shards' and d.labels_per_client * d.num_clients > n_train:
    raise config_lib.ConfigError(
        f'config.data.labels_per_client={d.labels_per_client} is invalid: '
        f'{d.labels_per_client} x config.data.num_clients={d.num_clients} shards exceed the '
        f'{n_train} training examples; lower config.data.labels_per_client or '
        'config.data.num_clients')


def _min_size_error(config, e, labels: np.ndarray, what: str) -> config_lib.ConfigError:
  """The Dirichlet partition's failure to meet its minimum, in config fields."""
  d = config.data
  n_labels = len(np.unique(labels))
  works = None
  num = d.num_clients // 2
  while num >= 1 and works is None:
    try:
      partition_lib.dirichlet(labels, num, d.alpha, config.seed, min_size=d.min_client_size)
      works = num
    except ValueError:
      num //= 2
  hint = f' (config.data.num_clients={works} works with this seed)' if works else ''
  return config_lib.ConfigError(
      f'config.data.partition="dirichlet" could not give each of config.data.num_clients='
      f'{d.num_clients} clients at least config.data.min_client_size={d.min_client_size} of '
      f'the {len(labels)} training examples ({n_labels} {what}, config.data.alpha={d.alpha}; '
      f'the smallest client of the last of {e.attempts} random draws got {e.smallest}). '
      f'Lower config.data.num_clients{hint}, raise config.data.alpha, set '
      'config.data.min_client_size=0, or use config.data.partition="iid"')


def _label_text(value) -> str | None:
  """A str or number label as text (integral floats as integers); None otherwise."""
  if isinstance(value, (str, np.str_)):
    return str(value)
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
    return None
  return str(int(value)) if float(value).is_integer() else str(value)


def _log_labels(names) -> None:
  """The label of each class index, in the log (`TaskData.label_names` keeps them)."""
  if not names:
    return
  shown = ', '.join(f'{i}={name}' for i, name in enumerate(names[:50]))
  more = f', ... ({len(names)} in all)' if len(names) > 50 else ''
  logs.log(f'labels ({len(names)} classes): {shown}{more}')


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
  # Held-out split (data.eval_split: examples | clients | group; `evaluation.heldout`),
  # held-out examples in random order so that the leading `eval.max_examples` of it are
  # a random sample too (sources are often sorted by label). A tokenizer trained on the
  # data reads the training rows only.
  client_key = _client_key(d) if d.partition == 'natural' or d.client_key else ''
  clients = groups = None
  if client_key and (client_key in arrays or d.eval_split == 'clients'):
    clients = heldout.field_values(arrays, client_key, 'data.client_key')
  if d.eval_group_key:
    groups = heldout.field_values(arrays, d.eval_group_key, 'data.eval_group_key')
  split = heldout.heldout_split(config, n, clients=clients, groups=groups,
                                client_key=client_key)
  eval_idx, train_idx = split.eval, split.train
  desc += split.description
  tokenizer, eval_inputs, client_names = None, None, ()
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
    eval_inputs = [texts[i] for i in eval_idx]
    tokenizer = _tokenizer(config, [texts[i] for i in train_idx], workdir)
    enc = tokenizer.encode(texts, d.max_len)
    feats['input_ids'] = enc['input_ids'].astype(np.int32)
    feats['attention_mask'] = enc['attention_mask'].astype(np.int32)
  if d.task == 'classification':
    feats['label'] = arrays['label'].astype(np.int32)
    _log_labels(names)

  eval_arrays = {k: v[eval_idx] for k, v in feats.items()}
  train_arrays = {k: v[train_idx] for k, v in feats.items()}
  n_train = len(train_idx)

  # Partition the training examples over clients (`data.partition`'s registry).
  if d.partition == 'natural':
    key = d.client_key or 'module'
    if key not in arrays:
      raise config_lib.ConfigError(
          f'config.data.client_key={key!r} is not a field of the data; fields: '
          f'{sorted(arrays)}')
    values = np.asarray(arrays[key])[train_idx].astype(str)
    parts, unique_values = partition_lib.natural(values)
    client_names = tuple(str(v) for v in unique_values)
    _check_natural(config, key, values, len(parts), default_key='module')
  else:
    if d.partition in ('dirichlet', 'shards') and 'label' not in train_arrays:
      _require_labels(d)
    _check_partition_sizes(config, n_train)
    kwargs = {
        'iid': dict(num_examples=n_train),
        'dirichlet': dict(labels=train_arrays.get('label'), alpha=d.alpha,
                          min_size=d.min_client_size),
        'shards': dict(labels=train_arrays.get('label'),
                       labels_per_client=d.labels_per_client),
        'quantity_skew': dict(num_examples=n_train, sigma=d.sigma,
                              min_size=max(d.min_client_size, 1)),
    }[d.partition]
    try:
      parts = partition_lib.partition(d.partition, num_clients=d.num_clients, seed=config.seed,
                                      **kwargs)
    except partition_lib.MinSizeError as e:
      raise _min_size_error(config, e, train_arrays['label'], 'labels') from None
  train = data_lib.FederatedDataset.from_partition(train_arrays, parts)
  return TaskData(train=train, eval=eval_arrays, num_labels=len(names), label_names=names,
                  tokenizer=tokenizer, description=desc, client_names=client_names,
                  eval_clients=None if clients is None else clients[eval_idx],
                  eval_groups=None if groups is None else groups[eval_idx],
                  eval_inputs=eval_inputs)


def _require_labels(d):
  raise config_lib.ConfigError(
      f'config.data.partition={d.partition!r} needs labels; use "iid", "quantity_skew" or '
      '"natural" for unlabelled data')


