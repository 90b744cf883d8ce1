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

Other record layouts name their fields: ``load_instructions(path,
input_key='word', target_key='phonemes', keep=('letter',))`` reads
``{"word": ..., "phonemes": ..., "letter": ...}`` records (``input`` is the
word, ``output`` the phonemes, ``letter`` kept under its own name), a
:class:`PromptTemplate` may be one format string with any of those fields
(``PromptTemplate('{input} ->')``), and ``partition_instructions(ex,
'natural', key='letter')`` makes one client per letter.

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
    'MissingFieldError',
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
    'template_fields',
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


class MissingFieldError(ValueError):
  """A field asked for is in no record.

  Attributes:
    field: the field asked for.
    available: the fields the records have (sorted).
  """

  def __init__(self, message: str, *, field: str, available: Sequence[str]):
    super().__init__(message)
    self.field = field
    self.available = tuple(available)


def _scalar_str(value: Any) -> str | None:
  """A string, number or bool as str (1.0 -> '1'); None for anything else."""
  if isinstance(value, str):
    return value
  if not isinstance(value, (int, float)):
    return None
  if isinstance(value, float) and value.is_integer():
    return str(int(value))
  return str(value)


def load_instructions(
    path: PathLike,
    schema: str = 'auto',
    *,
    max_examples: int | None = None,
    input_key: str | None = None,
    target_key: str | None = None,
    keep: Sequence[str] = (),
) -> dict[str, np.ndarray]:
  """Loads Alpaca- or Dolly-style instruction data, or records of any fields.

  Reads JSON Lines (one object per line) or a JSON list of objects (like the
  original ``alpaca_data.json``).

  Args:
    path: file path.
    schema: ``'alpaca'`` (instruction, input, output), ``'dolly'``
      (instruction, context, response, category) or ``'auto'`` (Dolly if the
      first record has ``response``, else Alpaca if it has ``output``).
      Unused with ``input_key`` / ``target_key``.
    max_examples: keep at most this many (leading) records.
    input_key: with ``target_key``: the record field read as ``input`` (the
      records' own ``instruction``, if any and not the input, stays the
      instruction; else it is ``''``).
    target_key: with ``input_key``: the record field read as ``output``.
    keep: more record fields to return under their own names (e.g. a client
      key, or fields a template names); names in :data:`FIELDS` are the
      normalised ones.

  Returns:
    ``{'instruction', 'input', 'output', 'category'}`` object arrays of str
    (missing optional fields become ``''``, a missing category ``'none'``),
    and one per name in ``keep``.

  Raises:
    FileNotFoundError: if ``path`` does not exist.
    MissingFieldError: if ``input_key``, ``target_key`` or a name in
      ``keep`` is in no record.
    ValueError: on a bad schema, malformed records, missing required fields
      or non-string values (with the record's line number; the fields named
      by ``input_key``, ``target_key`` and ``keep`` may also be numbers).
  """
  if schema not in SCHEMAS:
    raise ValueError(f'schema must be one of {SCHEMAS}, got {schema!r}')
  if max_examples is not None and (
      isinstance(max_examples, bool) or
      not isinstance(max_examples, (int, np.integer)) or max_examples < 1):
    raise ValueError(
        f'max_examples must be None or an int >= 1, got {max_examples!r}')
  if bool(input_key) != bool(target_key):
    raise ValueError(
        'input_key and target_key are given together, got '
        f'input_key={input_key!r}, target_key={target_key!r}')
  if isinstance(keep, str):
    keep = (keep,)
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f'No such file: {str(path)!r}.')
  records = _read_records(path)
  if max_examples is not None:
    records = records[:int(max_examples)]
  keyed = bool(input_key)
  if keyed:
    spec = {'instruction': ('instruction', False), 'input': (input_key, True),
            'output': (target_key, True), 'category': ('category', False)}
    if input_key == 'instruction':
      spec['instruction'] = (None, False)
  else:
    if schema == 'auto':
      schema = _detect_schema(records[0][1], f'{str(path)!r} record 1')
    spec = _SCHEMA_FIELDS[schema]
  extra = [k for k in dict.fromkeys(keep) if k not in FIELDS]
  asked = ([input_key, target_key] if keyed else []) + extra
  available = sorted(set().union(*(r.keys() for _, r in records)))
  for name in asked:
    if name not in available:
      raise MissingFieldError(
          f'{str(path)!r}: no record has the field {name!r}; fields: '
          f'{available}', field=name, available=available)
  columns = {f: [] for f in FIELDS + tuple(extra)}
  for lineno, record in records:
    for field, (source, required) in spec.items():
      if source is None or source not in record or record[source] is None:
        if required:
          what = f'of schema {schema!r}' if not keyed else 'named by the keys'
          raise ValueError(
              f'{str(path)!r} line {lineno}: missing field {source!r} {what}; '
              f'fields: {sorted(record)}.')
        value = NO_CATEGORY if field == 'category' else ''
      else:
        value = record[source]
        if keyed and source in (input_key, target_key):
          value = _scalar_str(value)
      if not isinstance(value, str):
        raise ValueError(
            f'{str(path)!r} line {lineno}: field {source!r} must be a '
            f'string{" or a number" if keyed and required else ""}, got '
            f'{type(record[source]).__name__}.')
      columns[field].append(value)
    for name in extra:
      if record.get(name) is None:
        raise ValueError(
            f'{str(path)!r} line {lineno}: missing field {name!r}; fields: '
            f'{sorted(record)}.')
      value = _scalar_str(record[name])
      if value is None:
        raise ValueError(
            f'{str(path)!r} line {lineno}: field {name!r} must be a string or '
            f'a number, got {type(record[name]).__name__}.')
      columns[name].append(value)
  return {f: _object_array(v) for f, v in columns.items()}


def _columns(examples: Any, require: Sequence[str] = ('instruction', 'output'),
             extra: Sequence[str] = ()) -> dict[str, list[str]]:
  """Normalises a dict of arrays or a sequence of record dicts.

  Records keep :data:`FIELDS` and the ``extra`` fields (each record must have
  those); a dict of arrays keeps all its keys.
  """
  if isinstance(examples, Mapping):
    cols = {k: [str(x) for x in np.asarray(v, dtype=object).reshape(-1)]
            for k, v in examples.items()}
  elif isinstance(examples, Sequence) and not isinstance(examples, str):
    extra = [f for f in dict.fromkeys(extra) if f not in FIELDS]
    cols = {f: [] for f in FIELDS + tuple(extra)}
    for i, r in enumerate(examples):
      if not isinstance(r, Mapping):
        raise ValueError(
            f'examples[{i}] must be a dict, got {type(r).__name__}')
      for f in FIELDS:
        default = NO_CATEGORY if f == 'category' else ''
        cols[f].append(str(r.get(f, default)))
      for f in extra:
        if f not in r:
          raise ValueError(
              f'examples[{i}] lacks the field {f!r}; fields: {sorted(r)}')
        cols[f].append(str(r[f]))
  else:
    raise ValueError(
        'examples must be a dict of arrays (from load_instructions) or a '
        f'sequence of dicts, got {type(examples).__name__}')
  for f in require:
    if f not in cols:
      raise ValueError(
          f'examples lack the field {f!r}; fields: {sorted(cols)}')
  n = len(next(iter(cols.values()), []))
  cols.setdefault('instruction', [''] * n)
  cols.setdefault('input', [''] * n)
  cols.setdefault('category', [NO_CATEGORY] * n)
  lengths = {k: len(v) for k, v in cols.items()}
  if len(set(lengths.values())) != 1:
    raise ValueError(f'example fields differ in length: {lengths}')
  if n == 0:
    raise ValueError('examples is empty')
  return cols


# ------------------------------------------------------------------- templates


def template_fields(template: str) -> tuple[str, ...]:
  """The field names of a ``str.format`` template, in order of first use.

  Args:
    template: e.g. ``'{instruction}: {input} ->'``.

  Returns:
    The distinct names.

  Raises:
    ValueError: on unbalanced braces, positional fields (``{}``, ``{0}``),
      attribute or index access (``{a.b}``, ``{a[0]}``) or nested fields in
      a format spec. Literal braces are written ``{{`` and ``}}``.
  """
  if not isinstance(template, str):
    raise ValueError(f'a template must be a str, got {type(template).__name__}')
  try:
    parsed = list(string.Formatter().parse(template))
  except ValueError as e:
    raise ValueError(
        f'bad braces in template {template!r} ({e}); write a literal brace as '
        '"{{" or "}}"') from None
  names = []
  for _, name, spec, _ in parsed:
    if name is None:
      continue
    if not name.isidentifier():
      raise ValueError(
          f'template {template!r} has the field {{{name}}}: fields are record '
          'field names, e.g. {input} (no positional fields, no attribute or '
          'index access)')
    if spec and ('{' in spec or '}' in spec):
      raise ValueError(
          f'template {template!r}: the format spec of {{{name}}} holds a '
          'nested field')
    names.append(name)
  return tuple(dict.fromkeys(names))


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
  """A prompt template: with and without an input, or one for every record.

  Attributes:
    with_input: ``str.format`` template with ``{instruction}`` and
      ``{input}``, used when the input is non-empty. With ``without_input``
      None: the one template of every record, naming any record fields
      (e.g. ``'{input} ->'`` or ``'{instruction}\n{input}\n'``).
    without_input: template with ``{instruction}`` only, used when the input
      is empty (a record with an input but no instruction renders its input
      as the instruction); None: ``with_input`` for every record.
  """

  with_input: str
  without_input: str | None = None

  def __post_init__(self):
    if self.without_input is None:
      if not template_fields(self.with_input):
        raise ValueError(
            f'template {self.with_input!r} names no field; name at least one, '
            'e.g. {input}')
      return
    got = set(template_fields(self.with_input))
    if got != {'instruction', 'input'}:
      raise ValueError(
          'with_input must use exactly the fields {instruction} and {input}, '
          f'got {sorted(got)}')
    got = set(template_fields(self.without_input))
    if got != {'instruction'}:
      raise ValueError(
          'without_input must use exactly the field {instruction}, got '
          f'{sorted(got)}')

  @property
  def fields(self) -> tuple[str, ...]:
    """The record fields the template reads."""
    if self.without_input is None:
      return template_fields(self.with_input)
    return ('instruction', 'input')

  # pylint: disable-next=redefined-builtin
  def format(self, instruction: str = '', input: str = '', **fields: str) -> str:
    """Renders the prompt (everything before the response).

    Args:
      instruction: the instruction.
      input: the input (context).
      **fields: more record fields, for a template that names them.

    Returns:
      The prompt.
    """
    if self.without_input is None:
      values = {'instruction': instruction, 'input': input, **fields}
      missing = [f for f in self.fields if f not in values]
      if missing:
        raise ValueError(
            f'template {self.with_input!r} names {missing}, which the record '
            f'lacks; fields: {sorted(values)}')
      return self.with_input.format(**values)
    if not instruction.strip():
      instruction, input = input, ''
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
  if isinstance(template, str) and template in TEMPLATES:
    return TEMPLATES[template]
  if isinstance(template, str) and '{' in template:
    return PromptTemplate(template)
  raise ValueError(
      f'template must be a PromptTemplate, one of {sorted(TEMPLATES)} or a '
      f'format string naming record fields (e.g. "{{input}} ->"), got '
      f'{template!r}')


def _template_columns(examples: Any, tpl: PromptTemplate,
                      require: Sequence[str] = ()) -> dict[str, list[str]]:
  """The columns of ``examples``, with the fields ``tpl`` reads."""
  if tpl.without_input is None:
    names = [f for f in tpl.fields if f not in ('instruction', 'input', 'category')]
  else:
    names = ['instruction']
  return _columns(examples, require=tuple(dict.fromkeys([*require, *names])),
                  extra=tpl.fields)


def _render(cols: Mapping[str, list[str]], tpl: PromptTemplate) -> list[str]:
  if tpl.without_input is None:
    names = tpl.fields
    return [tpl.with_input.format(**{f: cols[f][i] for f in names})
            for i in range(len(cols['input']))]
  return [tpl.format(i, x) for i, x in zip(cols['instruction'], cols['input'])]


def format_prompts(
    examples: Any, template: str | PromptTemplate = 'alpaca'
) -> list[str]:
  """Renders the prompt of every example (without the response).

  Args:
    examples: as in :func:`tokenize_instructions`.
    template: a :class:`PromptTemplate`, a name in :data:`TEMPLATES`, or a
      format string naming record fields (e.g. ``'{input} ->'``).

  Returns:
    One prompt per example.
  """
  tpl = _template(template)
  return _render(_template_columns(examples, tpl), tpl)


# ------------------------------------------------------------------ tokenizing


def _raw_encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
  """Token ids of each text, without special tokens and without padding."""
  if not texts:
    return []
  encode_ids = getattr(tokenizer, 'encode_ids', None)
  if callable(encode_ids):
    # CharTokenizer (and any tokenizer with a raw `encode_ids`).
    return [list(map(int, x)) for x in encode_ids(texts)]
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
  if not getattr(tokenizer, 'add_bos', False):
    return None
  processor = getattr(tokenizer, 'processor', None)
  if processor is not None:
    return int(processor.bos_id())
  bos = getattr(tokenizer, 'bos_id', None)
  if isinstance(bos, (int, np.integer)) and bos >= 0:
    return int(bos)
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
    template: a :class:`PromptTemplate`, a name in :data:`TEMPLATES` or a
      format string naming record fields (e.g. ``'{input} ->'``).
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
  tpl = _template(template)
  cols = _template_columns(examples, tpl, require=('output',))
  prompts = _render(cols, tpl)
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
    template: as in :func:`tokenize_instructions`.
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


def category_ids(examples: Any, key: str = 'category'
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Integer ids of a field's values: ``(ids [N] int64, names [K] sorted)``.

  Args:
    examples: instruction examples (see :func:`tokenize_instructions`).
    key: the field (default the category).

  Returns:
    The id of each example's value and the sorted distinct values.
  """
  cols = _columns(examples, require=(key,), extra=(key,))
  values = np.asarray(cols[key], dtype=object)
  names, ids = np.unique(values.astype(str), return_inverse=True)
  return ids.reshape(-1).astype(np.int64), names


def partition_instructions(
    examples: Any,
    method: str = 'natural',
    *,
    num_clients: int | None = None,
    alpha: float = 0.5,
    seed: int = 0,
    min_size: int = 1,
    key: str = 'category',
) -> list[np.ndarray]:
  """Non-IID client partitions of instruction data.

  Args:
    examples: instruction examples (see :func:`tokenize_instructions`).
    method: ``'natural'`` (one client per distinct value of ``key``, the
      natural partition :func:`fedjax_fm.data.partition.natural`; clients in
      sorted value order), ``'dirichlet'``
      (:func:`fedjax_fm.data.partition.dirichlet` over the values of
      ``key``: smaller ``alpha`` = fewer values per client) or ``'iid'``.
    num_clients: number of clients (``'dirichlet'``, ``'iid'``; must be
      ``None`` or the number of distinct values for ``'natural'``).
    alpha: Dirichlet concentration ``> 0``.
    seed: seed of the random partitions.
    min_size: ``'dirichlet'``: minimum examples per client.
    key: the field whose values make the clients (default the category).

  Returns:
    One sorted int64 index array per client.

  Raises:
    ValueError: on a bad method or arguments (``dirichlet``'s
      :class:`fedjax_fm.data.partition.MinSizeError` when ``min_size`` is not
      met).
  """
  if method not in PARTITIONS:
    raise ValueError(f'method must be one of {PARTITIONS}, got {method!r}')
  ids, names = category_ids(examples, key)
  if method == 'natural':
    if num_clients is not None and num_clients != names.size:
      raise ValueError(
          f"method='natural' makes one client per {key} ({names.size}: "
          f'{[str(n) for n in names[:10]]}), got num_clients={num_clients}')
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
    template: prompt template (see :func:`tokenize_instructions`).
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
