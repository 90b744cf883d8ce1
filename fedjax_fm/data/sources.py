"""Loading raw examples into dicts of numpy arrays.

Every loader returns ``dict[str, np.ndarray]`` with arrays sharing their
leading dimension (one row per example). Text fields become numpy object
arrays of ``str``.
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedjax_fm import extras

PathLike = str | os.PathLike[str]


def _object_array(values: Sequence[Any]) -> np.ndarray:
  out = np.empty(len(values), dtype=object)
  out[:] = list(values)
  return out


_TEXT = (str, bytes, np.str_, np.bytes_)
_NUMBER = (int, float, np.integer, np.floating)


def _scalar_text(value: Any) -> str:
  """A str, bytes or number as text; integral floats as integers (1.0 -> '1')."""
  if isinstance(value, (bytes, np.bytes_)):
    return value.decode('utf-8')
  if isinstance(value, (float, np.floating)) and float(value).is_integer():
    return str(int(value))
  if isinstance(value, np.generic):
    return str(value.item())
  return str(value)


def _stack(values: Sequence[Any]) -> np.ndarray:
  """Stacks per-example values: str/bytes -> object array of str.

  A column mixing strings and numbers (e.g. labels ``1`` and ``"cat"``)
  becomes strings throughout (``'1'``, ``'cat'``; ``1.0`` -> ``'1'``).
  """
  if values and all(isinstance(v, _TEXT) for v in values):
    return _object_array([_scalar_text(v) for v in values])
  if values and any(isinstance(v, _TEXT) for v in values) and all(
      isinstance(v, _TEXT + _NUMBER + (np.bool_,)) for v in values):
    return _object_array([_scalar_text(v) for v in values])
  arrays = [np.asarray(v) for v in values]
  if arrays and all(a.shape == () and a.dtype.kind in 'SU' for a in arrays):
    return _object_array([_scalar_text(a.item()) for a in arrays])
  try:
    return np.stack(arrays)
  except ValueError:
    # Ragged values (e.g. variable-length sequences): keep them as objects.
    return _object_array(arrays)


def _flatten(record: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """Flattens nested feature dicts, joining keys with '/'."""
  out = {}
  for key, value in record.items():
    name = f'{prefix}{key}'
    if isinstance(value, Mapping):
      out.update(_flatten(value, name + '/'))
    else:
      out[name] = value
  return out


def _select(columns: dict[str, list[Any]], fields: Sequence[str] | None,
            what: str, arg: str) -> dict[str, list[Any]]:
  if fields is None:
    return columns
  if isinstance(fields, str):
    fields = [fields]
  missing = [f for f in fields if f not in columns]
  if missing:
    raise ValueError(
        f'`{arg}` names unknown field(s) {missing} in {what}; available: '
        f'{sorted(columns)}.')
  return {f: columns[f] for f in fields}


def load_tfds(
    name: str,
    split: str,
    *,
    data_dir: PathLike | None = None,
    keys: Sequence[str] | None = None,
    max_examples: int | None = None,
) -> dict[str, np.ndarray]:
  """Loads a TFDS split into memory via ``tfds.data_source`` (no TensorFlow).

  The dataset must already be prepared (ArrayRecord format) in ``data_dir``.
  Nested features are flattened with ``'/'``-joined keys.

  Args:
    name: TFDS dataset name, e.g. ``'mnist'`` or ``'imdb_reviews'``.
    split: Split spec, e.g. ``'train'`` or ``'test[:10%]'``.
    data_dir: TFDS data directory; default is TFDS's own.
    keys: Features to keep; default all.
    max_examples: Read at most this many (leading) examples.

  Returns:
    Dict of stacked feature arrays; text features are object arrays of str.

  Raises:
    ValueError: For an unknown dataset name, unknown keys or bad
      ``max_examples``.
    ImportError: When TensorFlow Datasets is not installed (the ``tfds``
      extra: ``pip install "fedjax_fm[tfds]"``).
  """
  tfds = extras.require('tensorflow_datasets', 'tfds', 'data.source="tfds"')

  if max_examples is not None and (
      isinstance(max_examples, bool) or
      not isinstance(max_examples, (int, np.integer)) or max_examples < 1):
    raise ValueError(
        f'`max_examples` must be None or an int >= 1, got {max_examples!r}.')
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(
        f'Unknown TFDS dataset `name` {name!r}: {str(e).splitlines()[0]}'
    ) from e
  n = len(source)
  if max_examples is not None:
    n = min(n, int(max_examples))
  if n == 0:
    raise ValueError(f'TFDS {name!r} split {split!r} has no examples.')
  records = _read_records(source, n)
  columns: dict[str, list[Any]] = {}
  for record in records:
    for key, value in _flatten(record).items():
      columns.setdefault(key, []).append(value)
  columns = _select(columns, keys, f'TFDS dataset {name!r}', 'keys')
  return {k: _stack(v) for k, v in columns.items()}


def _read_records(source: Any, n: int, chunk: int = 1024) -> list[Any]:
  """Reads records ``0..n-1``, in chunks when the source supports it."""
  getitems = getattr(source, '__getitems__', None)
  if getitems is not None:
    try:
      out = []
      for start in range(0, n, chunk):
        out.extend(getitems(list(range(start, min(n, start + chunk)))))
      return out
    except TypeError:
      pass  # Some sources (e.g. TFDS mocks) only support single reads.
  return [source[i] for i in range(n)]


def _check_file(path: PathLike) -> pathlib.Path:
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f'No such file: {str(path)!r}.')
  if not path.is_file():
    raise ValueError(f'Not a regular file: {str(path)!r}.')
  return path


def load_jsonl(
    path: PathLike, fields: Sequence[str] | None = None
) -> dict[str, np.ndarray]:
  """Loads a JSON Lines file (one JSON object per non-empty line).

  Args:
    path: File path.
    fields: Fields to keep; default the fields of the first record. Every
      record must hold every kept field.

  Returns:
    Dict of arrays, one per field (strings -> object arrays of str).

  Raises:
    FileNotFoundError: If ``path`` does not exist.
    ValueError: On malformed lines (with their line number), missing fields
      or an empty file.
  """
  path = _check_file(path)
  records = []
  line_numbers = []
  with path.open('r', encoding='utf-8') as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(
            f'{str(path)!r} line {lineno}: malformed JSON ({e.msg}).') from e
      if not isinstance(record, dict):
        raise ValueError(
            f'{str(path)!r} line {lineno}: expected a JSON object, got '
            f'{type(record).__name__}.')
      records.append(record)
      line_numbers.append(lineno)
  if not records:
    raise ValueError(f'{str(path)!r} holds no records (empty file).')
  if fields is None:
    fields = list(records[0])
  elif isinstance(fields, str):
    fields = [fields]
  if not fields:
    raise ValueError(f'`fields` is empty and {str(path)!r} has no fields.')
  available = set().union(*(r.keys() for r in records))
  unknown = [f for f in fields if f not in available]
  if unknown:
    raise ValueError(
        f'`fields` names unknown field(s) {unknown} in {str(path)!r}; '
        f'available: {sorted(available)}.')
  columns = {f: [] for f in fields}
  for record, lineno in zip(records, line_numbers):
    for f in fields:
      if f not in record:
        raise ValueError(
            f'{str(path)!r} line {lineno}: missing field {f!r}; available: '
            f'{sorted(record)}.')
      columns[f].append(record[f])
  return {f: _stack(v) for f, v in columns.items()}


def _convert_column(values: list[str]) -> np.ndarray:
  """Parses a CSV column as int64, else float64, else object str."""
  for dtype in (np.int64, np.float64):
    try:
      return np.asarray(values, dtype=str).astype(dtype)
    except (ValueError, OverflowError):
      continue
  return _object_array(values)


def load_csv(
    path: PathLike,
    fields: Sequence[str] | None = None,
    delimiter: str = ',',
) -> dict[str, np.ndarray]:
  """Loads a CSV file with a header row.

  Columns whose values all parse as integers become int64, else as floats
  float64, else object arrays of str.

  Args:
    path: File path.
    fields: Columns to keep; default all.
    delimiter: Field delimiter.

  Returns:
    Dict of arrays, one per column.

  Raises:
    FileNotFoundError: If ``path`` does not exist.
    ValueError: On an empty file, missing fields, or rows whose number of
      columns differs from the header (with their line number).
  """
  path = _check_file(path)
  with path.open('r', encoding='utf-8', newline='') as f:
    reader = csv.reader(f, delimiter=delimiter)
    header = next(reader, None)
    if header is None or not any(h.strip() for h in header):
      raise ValueError(f'{str(path)!r} is empty (no header row).')
    if len(set(header)) != len(header):
      raise ValueError(f'{str(path)!r} has duplicate header names {header}.')
    rows = []
    for row in reader:
      if not row:
        continue
      if len(row) != len(header):
        raise ValueError(
            f'{str(path)!r} line {reader.line_num}: expected {len(header)} '
            f'columns {header}, got {len(row)}.')
      rows.append(row)
  if not rows:
    raise ValueError(f'{str(path)!r} holds a header but no rows.')
  columns = {h: [r[i] for r in rows] for i, h in enumerate(header)}
  columns = _select(columns, fields, repr(str(path)), 'fields')
  return {h: _convert_column(v) for h, v in columns.items()}


def load_text(path: PathLike) -> dict[str, np.ndarray]:
  """Loads a text file with one example per non-empty line.

  Args:
    path: File path.

  Returns:
    ``{'text': object array of str}`` (line endings removed).

  Raises:
    FileNotFoundError: If ``path`` does not exist.
    ValueError: If the file has no non-empty line.
  """
  path = _check_file(path)
  with path.open('r', encoding='utf-8') as f:
    lines = [line.rstrip('\r\n') for line in f if line.strip()]
  if not lines:
    raise ValueError(f'{str(path)!r} holds no non-empty lines.')
  return {'text': _object_array(lines)}
