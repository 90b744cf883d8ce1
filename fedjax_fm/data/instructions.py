"""Instruction-tuning data: Alpaca/Dolly JSONL, prompt templates, masking.

Records are normalised to four fields (object arrays of ``str``):

=============  ======================  =====================================
field          Alpaca                  Dolly
=============  ======================  =====================================
instruction    ``instruction``         ``instruction``
input          ``input``               ``context``
output         ``output``              ``response``
category       (``'none'``)            ``category``
=============  ======================  =====================================

:func:`tokenize_instructions` renders ``template(instruction, input)`` as the
prompt and ``output`` (+ EOS) as the response, and marks ONLY the response
tokens in ``loss_mask``; ``models.causal_lm_task(loss_mask_key='loss_mask')``
then trains on the response only. :func:`partition_instructions` makes
non-IID clients: one per category (natural), or Dirichlet over categories::

  ex = load_instructions(sample_path())               # offline Dolly sample
  arrays = tokenize_instructions(ex, tokenizer, 64, template='short')
  clients = partition_instructions(ex, 'dirichlet', num_clients=8, alpha=0.3)
  data = FederatedDataset.from_partition(arrays, clients)

The bundled ``samples/dolly_sample.jsonl`` holds 60 short, synthetic
instruction/response pairs (written for this package) in five categories:
arithmetic, capitals, antonyms, plurals, unit_conversion.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import string
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedjax_fm.data import partition as partition_lib
from fedjax_fm.data.federated import FederatedDataset
from fedjax_fm.data.tokenizers import pad_sequences

__all__ = [
    'ALPACA_TEMPLATE',
    'FIELDS',
    'PARTITIONS',
    'PromptTemplate',
    'SCHEMAS',
    'SHORT_TEMPLATE',
    'TEMPLATES',
    'category_ids',
    'federated_instructions',
    'format_prompts',
    'load_instructions',
    'partition_instructions',
    'sample_path',
    'tokenize_instructions',
    'tokenize_prompts',
]

PathLike = str | os.PathLike[str]

SCHEMAS = ('alpaca', 'dolly', 'auto')
FIELDS = ('instruction', 'input', 'output', 'category')
PARTITIONS = ('natural', 'dirichlet', 'iid')   # natural: one client per category
NO_CATEGORY = 'none'

# Source field of each normalised field, per schema: (name, required).
_SCHEMA_FIELDS = {
    'alpaca': {'instruction': ('instruction', True), 'input': ('input', False),
               'output': ('output', True), 'category': ('category', False)},
    'dolly': {'instruction': ('instruction', True),
              'input': ('context', False), 'output': ('response', True),
              'category': ('category', False)},
}

_SAMPLES = pathlib.Path(__file__).resolve().parent / 'samples'


def sample_path(name: str = 'dolly_sample.jsonl') -> pathlib.Path:
  """Path of a sample file bundled with the package.

  Args:
    name: file name in ``fedjax_fm/data/samples``.

  Returns:
    The path.

  Raises:
    ValueError: if no such sample exists (the message lists them).
  """
  path = _SAMPLES / name
  if not path.is_file():
    available = sorted(p.name for p in _SAMPLES.glob('*.jsonl'))
    raise ValueError(f'unknown sample {name!r}; available: {available}')
  return path


# --------------------------------------------------------------------- loading


def _read_records(path: pathlib.Path) -> list[tuple[int, dict]]:
  """(line number, record) pairs of a JSONL file, or of a JSON list file."""
  text = path.read_text(encoding='utf-8')
  if text.lstrip().startswith('['):
    try:
      data = json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(f'{str(path)!r}: malformed JSON ({e.msg}).') from e
    records = list(enumerate(data, start=1))
  else:
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
      if not line.strip():
        continue
      try:
        records.append((lineno, json.loads(line)))
      except json.JSONDecodeError as e:
        raise ValueError(
            f'{str(path)!r} line {lineno}: malformed JSON ({e.msg}).') from e
  for lineno, record in records:
    if not isinstance(record, dict):
      raise ValueError(
          f'{str(path)!r} record {lineno}: expected a JSON object, got '
          f'{type(record).__name__}.')
  if not records:
    raise ValueError(f'{str(path)!r} holds no records (empty file).')
  return records


def _detect_schema(record: Mapping[str, Any], where: str) -> str:
  if 'response' in record:
    return 'dolly'
  if 'output' in record:
    return 'alpaca'
  raise ValueError(
      f"{where}: cannot detect the schema (no 'output' (alpaca) or "
      f"'response' (dolly) field); fields: {sorted(record)}. Pass "
      "schema='alpaca' or 'dolly'.")


def _object_array(values: Sequence[str]) -> np.ndarray:
  out = np.empty(len(values), dtype=object)
  out[:] = list(values)
  return out


def load_instructions(
    path: PathLike,
    schema: str = 'auto',
    *,
    max_examples: int | None = None,
) -> dict[str, np.ndarray]:
  """Loads Alpaca- or Dolly-style instruction data.

  Reads JSON Lines (one object per line) or a JSON list of objects (like the
  original ``alpaca_data.json``).

  Args:
    path: file path.
    schema: ``'alpaca'`` (instruction, input, output), ``'dolly'``
      (instruction, context, response, category) or ``'auto'`` (Dolly if the
      first record has ``response``, else Alpaca if it has ``output``).
    max_examples: keep at most this many (leading) records.

  Returns:
    ``{'instruction', 'input', 'output', 'category'}`` object arrays of str
    (missing optional fields become ``''``, a missing category ``'none'``).

  Raises:
    FileNotFoundError: if ``path`` does not exist.
    ValueError: on a bad schema, malformed records, missing required fields
      or non-string values (with the record's line number).
  """
  if schema not in SCHEMAS:
    raise ValueError(f'schema must be one of {SCHEMAS}, got {schema!r}')
  if max_examples is not None and (
      isinstance(max_examples, bool) or
      not isinstance(max_examples, (int, np.integer)) or max_examples < 1):
    raise ValueError(
        f'max_examples must be None or an int >= 1, got {max_examples!r}')
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f'No such file: {str(path)!r}.')
  records = _read_records(path)
  if max_examples is not None:
    records = records[:int(max_examples)]
  if schema == 'auto':
    schema = _detect_schema(records[0][1], f'{str(path)!r} record 1')
  spec = _SCHEMA_FIELDS[schema]
  columns = {f: [] for f in FIELDS}
  for lineno, record in records:
    for field, (source, required) in spec.items():
      if source not in record or record[source] is None:
        if required:
          raise ValueError(
              f'{str(path)!r} line {lineno}: missing field {source!r} of '
              f'schema {schema!r}; fields: {sorted(record)}.')
        value = NO_CATEGORY if field == 'category' else ''
      else:
        value = record[source]
      if not isinstance(value, str):
        raise ValueError(
            f'{str(path)!r} line {lineno}: field {source!r} must be a '
            f'string, got {type(value).__name__}.')
      columns[field].append(value)
  return {f: _object_array(v) for f, v in columns.items()}


def _columns(examples: Any, require: Sequence[str] = ('instruction', 'output')
             ) -> dict[str, list[str]]:
  """Normalises a dict of arrays or a sequence of record dicts."""
  if isinstance(examples, Mapping):
    cols = {k: [str(x) for x in np.asarray(v, dtype=object).reshape(-1)]
            for k, v in examples.items()}
  elif isinstance(examples, Sequence) and not isinstance(examples, str):
    cols = {f: [] for f in FIELDS}
    for i, r in enumerate(examples):
      if not isinstance(r, Mapping):
        raise ValueError(
            f'examples[{i}] must be a dict, got {type(r).__name__}')
      for f in FIELDS:
        default = NO_CATEGORY if f == 'category' else ''
        cols[f].append(str(r.get(f, default)))
  else:
    raise ValueError(
        'examples must be a dict of arrays (from load_instructions) or a '
        f'sequence of dicts, got {type(examples).__name__}')
  for f in require:
    if f not in cols:
      raise ValueError(
          f'examples lack the field {f!r}; fields: {sorted(cols)}')
  n = len(next(iter(cols.values()), []))
  cols.setdefault('input', [''] * n)
  cols.setdefault('category', [NO_CATEGORY] * n)
  lengths = {k: len(v) for k, v in cols.items()}
  if len(set(lengths.values())) != 1:
    raise ValueError(f'example fields differ in length: {lengths}')
  if n == 0:
    raise ValueError('examples is empty')
  return cols


# ------------------------------------------------------------------- templates


def _fields_of(template: str) -> set[str]:
  return {name for _, name, _, _ in string.Formatter().parse(template)
          if name is not None}


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
  """A prompt template with and without an input (context) field.

  Attributes:
    with_input: ``str.format`` template with ``{instruction}`` and
      ``{input}``, used when the input is non-empty.
    without_input: template with ``{instruction}`` only.
  """

  with_input: str
  without_input: str

  def __post_init__(self):
    got = _fields_of(self.with_input)
    if got != {'instruction', 'input'}:
      raise ValueError(
          'with_input must use exactly the fields {instruction} and {input}, '
          f'got {sorted(got)}')
    got = _fields_of(self.without_input)
    if got != {'instruction'}:
      raise ValueError(
          'without_input must use exactly the field {instruction}, got '
          f'{sorted(got)}')

  # pylint: disable-next=redefined-builtin
  def format(self, instruction: str, input: str = '') -> str:
    """Renders the prompt (everything before the response)."""
    if input.strip():
      return self.with_input.format(instruction=instruction, input=input)
    return self.without_input.format(instruction=instruction)


# Stanford Alpaca's prompts (Taori et al. 2023).
ALPACA_TEMPLATE = PromptTemplate(
    with_input=(
        'Below is an instruction that describes a task, paired with an input '
        'that provides further context. Write a response that appropriately '
        'completes the request.\n\n### Instruction:\n{instruction}\n\n'
        '### Input:\n{input}\n\n### Response:\n'),
    without_input=(
        'Below is an instruction that describes a task. Write a response that '
        'appropriately completes the request.\n\n### Instruction:\n'
        '{instruction}\n\n### Response:\n'),
)

# The Alpaca layout without the preamble: for small models and short contexts.
SHORT_TEMPLATE = PromptTemplate(
    with_input='### Instruction:\n{instruction}\n### Input:\n{input}\n'
               '### Response:\n',
    without_input='### Instruction:\n{instruction}\n### Response:\n',
)

TEMPLATES = {'alpaca': ALPACA_TEMPLATE, 'short': SHORT_TEMPLATE}


def _template(template: str | PromptTemplate) -> PromptTemplate:
  if isinstance(template, PromptTemplate):
    return template
  if template not in TEMPLATES:
    raise ValueError(
        f'template must be a PromptTemplate or one of {sorted(TEMPLATES)}, '
        f'got {template!r}')
  return TEMPLATES[template]


def format_prompts(
    examples: Any, template: str | PromptTemplate = 'alpaca'
) -> list[str]:
  """Renders the prompt of every example (without the response)."""
  cols = _columns(examples, require=('instruction',))
  tpl = _template(template)
  return [tpl.format(i, x) for i, x in zip(cols['instruction'], cols['input'])]


# ------------------------------------------------------------------ tokenizing


def _raw_encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
  """Token ids of each text, without special tokens and without padding."""
  if not texts:
    return []
  processor = getattr(tokenizer, 'processor', None)
  if processor is not None and hasattr(processor, 'encode'):
    # SentencePieceTokenizer: bypass its BOS/EOS handling.
    return [list(map(int, x)) for x in processor.encode(texts, out_type=int)]
  hf = getattr(tokenizer, 'tokenizer', None)
  if hf is not None and hasattr(hf, 'encode_batch'):
    # HFTokenizer: no post-processor specials, no truncation.
    hf.no_truncation()
    return [list(e.ids)
            for e in hf.encode_batch(texts, add_special_tokens=False)]
  # Any other Tokenizer: encode wide enough not to truncate.
  width = max(len(t.encode('utf-8')) for t in texts) + 8
  enc = tokenizer.encode(texts, width)
  ids, mask = np.asarray(enc['input_ids']), np.asarray(enc['attention_mask'])
  return [row[m.astype(bool)].tolist() for row, m in zip(ids, mask)]


_EOS_TOKENS = ('</s>', '<|endoftext|>', '<|im_end|>', '<eos>', '[SEP]')


def _find_eos(tokenizer: Any) -> int | None:
  eos = getattr(tokenizer, 'eos_id', None)
  if isinstance(eos, (int, np.integer)) and eos >= 0:
    return int(eos)
  processor = getattr(tokenizer, 'processor', None)
  if processor is not None and hasattr(processor, 'eos_id'):
    eos = processor.eos_id()
    return int(eos) if eos >= 0 else None
  hf = getattr(tokenizer, 'tokenizer', None)
  if hf is not None and hasattr(hf, 'token_to_id'):
    for token in _EOS_TOKENS:
      eos = hf.token_to_id(token)
      if eos is not None:
        return int(eos)
  return None


def _find_bos(tokenizer: Any) -> int | None:
  processor = getattr(tokenizer, 'processor', None)
  if getattr(tokenizer, 'add_bos', False) and processor is not None:
    return int(processor.bos_id())
  return None


def _check_id(value: Any, name: str) -> int | None:
  if value is None:
    return None
  if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
      or value < 0):
    raise ValueError(f'{name} must be None or an int >= 0, got {value!r}')
  return int(value)


def _check_max_len(max_len: Any) -> int:
  if (isinstance(max_len, bool) or not isinstance(max_len, (int, np.integer))
      or max_len < 2):
    raise ValueError(f'max_len must be an int >= 2, got {max_len!r}')
  return int(max_len)


def tokenize_instructions(
    examples: Any,
    tokenizer: Any,
    max_len: int,
    *,
    template: str | PromptTemplate = 'alpaca',
    add_eos: bool = True,
    eos_id: int | None = None,
    bos_id: int | None = None,
) -> dict[str, np.ndarray]:
  """Tokenizes prompt + response with a response-only loss mask.

  Each sequence is ``[BOS] prompt_tokens response_tokens [EOS]``, with
  prompt and response tokenized separately (so the boundary is exact),
  right-padded with ``tokenizer.pad_id`` and truncated to ``max_len`` from
  the right (a prompt longer than ``max_len`` leaves no response tokens, and
  such an example contributes no loss).

  Args:
    examples: a dict of arrays from :func:`load_instructions` (or any dict
      with ``instruction``/``output`` and optional ``input``), or a sequence
      of such record dicts.
    tokenizer: a :class:`~fedjax_fm.data.Tokenizer`
      (``SentencePieceTokenizer``, ``HFTokenizer`` or any object with
      ``encode``/``pad_id``).
    max_len: sequence length ``>= 2``.
    template: a :class:`PromptTemplate` or a name in :data:`TEMPLATES`.
    add_eos: append EOS to the response (and mark it in ``loss_mask``).
    eos_id: EOS id; default: the tokenizer's (``eos_id`` attribute,
      SentencePiece ``eos_id()``, or a common HF EOS token).
    bos_id: BOS id to start each sequence with; default: the
      SentencePiece BOS if the tokenizer was built with ``add_bos=True``,
      else none.

  Returns:
    int32 ``[N, max_len]`` arrays ``input_ids``, ``attention_mask`` (real
    tokens) and ``loss_mask`` (1 exactly at the response tokens and EOS).

  Raises:
    ValueError: on bad arguments, or if ``add_eos`` and no EOS id is known.
  """
  max_len = _check_max_len(max_len)
  eos_id, bos_id = _check_id(eos_id, 'eos_id'), _check_id(bos_id, 'bos_id')
  cols = _columns(examples)
  prompts = format_prompts(cols, template)
  if add_eos and eos_id is None:
    eos_id = _find_eos(tokenizer)
    if eos_id is None:
      raise ValueError(
          f'add_eos=True but tokenizer {type(tokenizer).__name__} has no '
          'known EOS token; pass eos_id=... or add_eos=False')
  if bos_id is None:
    bos_id = _find_bos(tokenizer)
  head = [] if bos_id is None else [bos_id]
  tail = [eos_id] if add_eos else []
  prompt_ids = _raw_encode(tokenizer, prompts)
  response_ids = _raw_encode(tokenizer, cols['output'])
  seqs, starts = [], []
  for p, r in zip(prompt_ids, response_ids):
    p = head + p
    seqs.append((p + r + tail)[:max_len])
    starts.append(min(len(p), max_len))
  out = pad_sequences(seqs, max_len, int(tokenizer.pad_id))
  starts = np.asarray(starts, np.int64)
  response = np.arange(max_len)[None, :] >= starts[:, None]
  out['loss_mask'] = (response & (out['attention_mask'] == 1)).astype(
      np.int32)
  return out


def tokenize_prompts(
    examples: Any,
    tokenizer: Any,
    max_len: int,
    *,
    template: str | PromptTemplate = 'alpaca',
    bos_id: int | None = None,
    padding: str = 'left',
) -> dict[str, np.ndarray]:
  """Tokenizes the prompts only, e.g. as inputs of ``models.generate``.

  Prompts longer than ``max_len`` keep their LAST ``max_len`` tokens (so the
  template's response cue survives).

  Args:
    examples: as in :func:`tokenize_instructions` (``output`` is unused).
    tokenizer: the tokenizer.
    max_len: prompt length ``>= 2``.
    template: a :class:`PromptTemplate` or a name in :data:`TEMPLATES`.
    bos_id: BOS id (default as in :func:`tokenize_instructions`).
    padding: ``'left'`` or ``'right'``.

  Returns:
    int32 ``[N, max_len]`` ``input_ids`` and ``attention_mask``.
  """
  max_len = _check_max_len(max_len)
  if padding not in ('left', 'right'):
    raise ValueError(f"padding must be 'left' or 'right', got {padding!r}")
  bos_id = _check_id(bos_id, 'bos_id')
  if bos_id is None:
    bos_id = _find_bos(tokenizer)
  head = [] if bos_id is None else [bos_id]
  seqs = [(head + p)[-max_len:]
          for p in _raw_encode(tokenizer, format_prompts(examples, template))]
  out = pad_sequences(seqs, max_len, int(tokenizer.pad_id))
  if padding == 'left':
    lengths = out['attention_mask'].sum(-1)
    shift = (np.arange(max_len)[None, :] - (max_len - lengths)[:, None]) % (
        max_len)
    rows = np.arange(len(seqs))[:, None]
    out = {k: v[rows, shift] for k, v in out.items()}
  return out


# ---------------------------------------------------------------- partitioning


def category_ids(examples: Any) -> tuple[np.ndarray, np.ndarray]:
  """Integer category ids: ``(ids [N] int64, names [K] sorted)``."""
  cats = np.asarray(_columns(examples, require=())['category'], dtype=object)
  names, ids = np.unique(cats.astype(str), return_inverse=True)
  return ids.reshape(-1).astype(np.int64), names


def partition_instructions(
    examples: Any,
    method: str = 'natural',
    *,
    num_clients: int | None = None,
    alpha: float = 0.5,
    seed: int = 0,
    min_size: int = 1,
) -> list[np.ndarray]:
  """Non-IID client partitions of instruction data.

  Args:
    examples: instruction examples (see :func:`tokenize_instructions`).
    method: ``'natural'`` (one client per category, the natural partition
      :func:`fedjax_fm.data.partition.natural`; clients in sorted category
      order), ``'dirichlet'`` (:func:`fedjax_fm.data.partition.dirichlet`
      over the category ids: smaller ``alpha`` = fewer categories per
      client) or ``'iid'``.
    num_clients: number of clients (``'dirichlet'``, ``'iid'``; must be
      ``None`` or the number of categories for ``'natural'``).
    alpha: Dirichlet concentration ``> 0``.
    seed: seed of the random partitions.
    min_size: ``'dirichlet'``: minimum examples per client.

  Returns:
    One sorted int64 index array per client.

  Raises:
    ValueError: on a bad method or arguments.
  """
  if method not in PARTITIONS:
    raise ValueError(f'method must be one of {PARTITIONS}, got {method!r}')
  ids, names = category_ids(examples)
  if method == 'natural':
    if num_clients is not None and num_clients != names.size:
      raise ValueError(
          f"method='natural' makes one client per category ({names.size}: "
          f'{list(names)}), got num_clients={num_clients}')
    return partition_lib.natural(ids)[0]
  if num_clients is None:
    raise ValueError(f'method={method!r} needs num_clients')
  if method == 'dirichlet':
    return partition_lib.dirichlet(ids, num_clients, alpha, seed,
                                   min_size=min_size)
  return partition_lib.iid(ids.size, num_clients, seed)


def federated_instructions(
    examples: Any,
    tokenizer: Any,
    max_len: int,
    *,
    partition: str = 'natural',
    num_clients: int | None = None,
    alpha: float = 0.5,
    seed: int = 0,
    template: str | PromptTemplate = 'alpaca',
    **tokenize_kwargs: Any,
) -> FederatedDataset:
  """Tokenizes and partitions instruction data into a FederatedDataset.

  Args:
    examples: instruction examples, or a path to load with
      :func:`load_instructions` (schema ``'auto'``).
    tokenizer: the tokenizer.
    max_len: sequence length.
    partition: see :func:`partition_instructions`.
    num_clients: see :func:`partition_instructions`.
    alpha: see :func:`partition_instructions`.
    seed: see :func:`partition_instructions`.
    template: prompt template.
    **tokenize_kwargs: passed to :func:`tokenize_instructions`.

  Returns:
    A dataset with arrays ``input_ids``, ``attention_mask``, ``loss_mask``
    (train with ``causal_lm_task(loss_mask_key='loss_mask')``).
  """
  if isinstance(examples, (str, os.PathLike)):
    examples = load_instructions(examples)
  arrays = tokenize_instructions(examples, tokenizer, max_len,
                                 template=template, **tokenize_kwargs)
  clients = partition_instructions(examples, partition,
                                   num_clients=num_clients, alpha=alpha,
                                   seed=seed)
  return FederatedDataset.from_partition(arrays, clients)
