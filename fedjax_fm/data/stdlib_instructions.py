"""Offline instruction data: describe the Python standard library's functions.

Each example asks for the one-sentence summary of a public function or method
of the running Python's standard library: the instruction is one of a few
phrasings of "Describe what this function does" naming where the function
lives, the input is its signature as source (``def name(args) -> ret``, with
annotations and defaults), and the response is the first sentence of its
docstring, cleaned (reST markup dropped, whitespace joined, a final period).
Optionally, the Python language topics of ``pydoc_data.topics`` add
questions (``In one sentence, explain this part of the Python language: Await
expression.``) answered by the first sentence of their text.

The category of an example (its natural federated client) is the top-level
module or package it comes from (``email``, ``asyncio``, ``json``, ...), so the
clients differ in topic and size: a natural non-IID split. Records follow the
normalised instruction schema of :mod:`fedjax_fm.data.instructions`
(``instruction``, ``input``, ``output``, ``category``), plus ``module`` and
``name`` (the qualified function name).

Sources are parsed with :mod:`ast`; no module is imported. The order is
deterministic (sorted files, then source order) and the phrasing of each
example depends only on its module, name and ``seed``, so choosing other
packages leaves the other examples unchanged.

Examples with the default settings (every public top-level module), measured:
CPython 3.11.7: 3359 over 148 top-level modules and packages (tkinter 539,
asyncio 194, logging 142, xml 132, multiprocessing 106, turtle 102, unittest
100, email 99, http 95, importlib 71, ...), plus 68 topics with
``include_topics=True``; Debian's CPython 3.11.2, whose ``tkinter`` is a
separate package: 2809 over 146. Other versions differ as their standard
library does (modules added, deprecated ones removed).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import pathlib
import re
import sys
import sysconfig
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

__all__ = [
    'EXCLUDED',
    'FIELDS',
    'PHRASINGS',
    'TOPICS_CATEGORY',
    'build_stdlib_instructions',
    'first_sentence',
    'load_stdlib_instructions',
    'signature_source',
    'stdlib_modules',
]

FIELDS = ('instruction', 'input', 'output', 'category', 'module', 'name')

# Top-level entries that are not library modules, or are deprecated copies,
# tests or data.
EXCLUDED = frozenset({
    'test', 'tests', 'idlelib', 'lib2to3', 'turtledemo', 'ensurepip', 'distutils',
    'pydoc_data', 'site-packages', 'dist-packages', 'lib-dynload', 'this', 'antigravity',
})
_SKIP_DIRS = frozenset({'test', 'tests', 'idle_test', '__pycache__'})

# "{what}" names the function: "this function from `json`", "this method of
# `pathlib.Path`".
PHRASINGS = (
    'Describe what {what} does.',
    'In one sentence, what does {what} do?',
    'Summarize the purpose of {what} in one sentence.',
    'Write the one-line docstring of {what}.',
)
TOPICS_CATEGORY = 'pydoc_topics'
_TOPIC_PHRASING = 'In one sentence, explain this part of the Python language: {title}.'


def default_stdlib_dir() -> pathlib.Path:
  """Returns the directory holding the pure-Python standard library."""
  return pathlib.Path(sysconfig.get_paths()['stdlib'])


def stdlib_modules(stdlib_dir: str | os.PathLike[str] | None = None) -> list[str]:
  """Public top-level modules and packages of a standard library directory, sorted.

  Args:
    stdlib_dir: the standard library sources (default: the running Python's).

  Returns:
    Names of the ``.py`` modules and of the directories holding an
    ``__init__.py``, without private (``_``-prefixed) and :data:`EXCLUDED` ones.
  """
  root = _root(stdlib_dir)
  names = []
  for path in sorted(root.iterdir()):
    name = path.stem if path.suffix == '.py' else path.name
    if name.startswith('_') or name in EXCLUDED or not name.isidentifier():
      continue
    if (path.is_dir() and (path / '__init__.py').is_file()) or (
        path.is_file() and path.suffix == '.py'):
      names.append(name)
  return names


def _root(stdlib_dir) -> pathlib.Path:
  root = pathlib.Path(stdlib_dir) if stdlib_dir is not None else default_stdlib_dir()
  if not root.is_dir():
    raise ValueError(f'`stdlib_dir` {str(root)!r} is not a directory.')
  return root


def _files(root: pathlib.Path, package: str) -> list[pathlib.Path]:
  """The sorted ``.py`` files of a top-level package or module.

  Tests and private submodules (``_``-prefixed, other than ``__init__``) are skipped.
  """
  pkg_dir = root / package
  if pkg_dir.is_dir():
    files = []
    for dirpath, dirnames, filenames in os.walk(pkg_dir):
      dirnames[:] = sorted(d for d in dirnames
                           if d not in _SKIP_DIRS and not d.startswith('_'))
      files.extend(pathlib.Path(dirpath) / f for f in filenames
                   if f.endswith('.py') and (f == '__init__.py' or not f.startswith('_')))
    return sorted(files)
  single = root / f'{package}.py'
  return [single] if single.is_file() else []


def _module_name(root: pathlib.Path, path: pathlib.Path) -> str:
  parts = list(path.relative_to(root).with_suffix('').parts)
  if parts[-1] == '__init__':
    parts.pop()
  return '.'.join(parts)


def _parse(path: pathlib.Path) -> ast.Module | None:
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')
      return ast.parse(path.read_bytes(), filename=str(path))
  except (SyntaxError, ValueError, UnicodeDecodeError, OSError):
    return None


# ------------------------------------------------------------------ cleaning

_ROLE = re.compile(r':[a-zA-Z]+(?::[a-zA-Z]+)?:`~?([^`]+)`')    # :func:`x` -> x
_LITERAL = re.compile(r'``([^`]+)``|`([^`]+)`')                  # ``x``, `x` -> x
_SENTENCE_END = re.compile(r'(?<=[.!?])\s+(?=[A-Z"\'(])')
# Abbreviations after which a period does not end a sentence.
_ABBREVIATIONS = ('e.g.', 'i.e.', 'etc.', 'vs.', 'cf.', 'Ex.', 'No.')
_VERSION_NOTES = ('New in version', 'Changed in version', 'Deprecated since', 'Added in version')


def first_sentence(text: str) -> str:
  """The first sentence of the first paragraph of a docstring, cleaned.

  Whitespace is joined, reST roles and literals lose their markup, and a final
  period is added to a sentence that ends in a letter, digit or closing bracket.

  Args:
    text: a docstring (``ast.get_docstring(..., clean=True)``) or prose.

  Returns:
    The sentence, or ``''`` if the text has none.
  """
  paragraph = text.strip().split('\n\n', 1)[0]
  paragraph = ' '.join(paragraph.split())
  paragraph = _ROLE.sub(r'\1', paragraph)
  paragraph = _LITERAL.sub(lambda m: m.group(1) or m.group(2), paragraph)
  for m in _SENTENCE_END.finditer(paragraph):
    head = paragraph[:m.start()]
    if not head.endswith(_ABBREVIATIONS):
      paragraph = head
      break
  sentence = paragraph.strip()
  if sentence.endswith(':'):
    sentence = sentence[:-1].rstrip()
  if sentence and (sentence[-1].isalnum() or sentence[-1] in ')]"\''):
    sentence += '.'
  return sentence


def signature_source(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
  """``[async ]def name(args) -> ret`` of a function, as source (no body)."""
  prefix = 'async def' if isinstance(node, ast.AsyncFunctionDef) else 'def'
  returns = f' -> {ast.unparse(node.returns)}' if node.returns is not None else ''
  return f'{prefix} {node.name}({ast.unparse(node.args)}){returns}'


def _usable(sentence: str, name: str, min_chars: int, max_chars: int, min_words: int) -> bool:
  if not min_chars <= len(sentence) <= max_chars or len(sentence.split()) < min_words:
    return False
  if sentence.startswith(('>>>', '..', ':', '-', '*', '@', '#')) or sentence.startswith(
      _VERSION_NOTES):
    return False
  # Signature-style lines ("name(args) -> x", "x = <instance>.name(args)") repeat the input.
  if re.search(rf'(?<![\w.]){re.escape(name)}\s*\(|\.{re.escape(name)}\s*\(', sentence):
    return False
  return any(c.isalpha() for c in sentence)


def _functions(tree: ast.Module) -> Iterator[tuple[str | None, ast.FunctionDef]]:
  """(class name or None, function) of public module-level functions and methods."""
  for node in tree.body:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      if not node.name.startswith('_'):
        yield None, node
    elif isinstance(node, ast.ClassDef) and not node.name.startswith('_'):
      for item in node.body:
        if (isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))
            and not item.name.startswith('_')):
          yield node.name, item


def _phrase(key: str, seed: int, phrasings: Sequence[str]) -> str:
  digest = hashlib.sha256(f'{seed}:{key}'.encode()).digest()
  return phrasings[int.from_bytes(digest[:4], 'little') % len(phrasings)]


def _topics(root: pathlib.Path, min_chars, max_chars, min_words) -> list[tuple[str, str, str]]:
  """(topic key, title, first sentence) of ``pydoc_data/topics.py``, parsed with ast."""
  tree = _parse(root / 'pydoc_data' / 'topics.py')
  if tree is None:
    return []
  topics = None
  for node in tree.body:
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
      targets = node.targets if isinstance(node, ast.Assign) else [node.target]
      if any(isinstance(t, ast.Name) and t.id == 'topics' for t in targets):
        try:
          topics = ast.literal_eval(node.value)
        except ValueError:
          return []
  if not isinstance(topics, dict):
    return []
  out = []
  for key in sorted(topics):
    lines = str(topics[key]).strip().split('\n')
    if len(lines) < 3 or not set(lines[1].strip()) <= set('*=-'):
      continue
    title = lines[0].strip()
    # The first prose paragraph: not a heading, not indented (grammar, code).
    body = '\n'.join(lines[2:]).strip().split('\n\n')
    prose = next((p for p in body if p.strip() and not p.startswith(' ')
                  and not set(p.strip().split('\n')[-1]) <= set('*=-')), '')
    sentence = first_sentence(prose)
    if _usable(sentence, key, min_chars, max_chars, min_words):
      out.append((key, title, sentence))
  return out


def build_stdlib_instructions(
    packages: Sequence[str] | None = None,
    *,
    min_chars: int = 16,
    max_chars: int = 160,
    min_words: int = 3,
    max_per_package: int | None = None,
    include_topics: bool = False,
    seed: int = 0,
    stdlib_dir: str | os.PathLike[str] | None = None,
) -> dict[str, np.ndarray]:
  """Builds the standard library "describe this function" instruction data.

  Public functions and methods (names without a leading ``_``) with a
  docstring are collected in sorted file order, then source order. An example
  is kept if the first sentence of its docstring has ``min_chars..max_chars``
  characters and at least ``min_words`` words, is prose (not a doctest or a
  repeated signature), and its (signature, response) pair was not seen before
  (the first occurrence is kept, across packages).

  Args:
    packages: top-level modules or packages to use (e.g. ``('json',
      'email')``); None: every public one (:func:`stdlib_modules`).
    min_chars: shortest response kept.
    max_chars: longest response kept.
    min_words: fewest words in a response kept.
    max_per_package: cap on the examples of a package (a ``seed``-driven subset
      in source order is kept), or None for no cap.
    include_topics: also add the topics of ``pydoc_data.topics`` as the
      category :data:`TOPICS_CATEGORY`.
    seed: seed of the phrasing choice and of the ``max_per_package`` subset.
    stdlib_dir: the standard library sources (default: the running Python's).

  Returns:
    A dict of object arrays of str, one entry per example: ``instruction``,
    ``input`` (the signature), ``output`` (the response), ``category`` (the
    top-level package: the natural client), ``module`` (dotted module) and
    ``name`` (``Class.method`` or ``function``).

  Raises:
    ValueError: on bad arguments, an unknown package, or no example at all.
  """
  root = _root(stdlib_dir)
  if packages is None:
    packages = stdlib_modules(root)
  elif isinstance(packages, str):
    packages = [packages]
  packages = list(packages)
  if not packages:
    raise ValueError('`packages` must name at least one package, got none.')
  if len(set(packages)) != len(packages):
    raise ValueError(f'`packages` contains duplicates: {packages}.')
  for name, value, lo in (('min_chars', min_chars, 1), ('max_chars', max_chars, 1),
                          ('min_words', min_words, 1)):
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
      raise ValueError(f'`{name}` must be an int >= {lo}, got {value!r}.')
  if max_chars < min_chars:
    raise ValueError(f'`max_chars` ({max_chars}) must be >= `min_chars` ({min_chars}).')
  if max_per_package is not None and (not isinstance(max_per_package, int)
                                      or max_per_package < 1):
    raise ValueError(f'`max_per_package` must be None or an int >= 1, got '
                     f'{max_per_package!r}.')
  files = {p: _files(root, p) for p in packages}
  missing = [p for p, fs in files.items() if not fs]
  if missing:
    raise ValueError(f'unknown standard library package(s) {missing} in {str(root)!r}; '
                     f'available: {stdlib_modules(root)}')

  rng = np.random.default_rng(seed)
  seen: set[tuple[str, str]] = set()
  columns: dict[str, list[str]] = {f: [] for f in FIELDS}
  for package in packages:
    rows = []
    for path in files[package]:
      tree = _parse(path)
      if tree is None:
        continue
      module = _module_name(root, path)
      for cls, fn in _functions(tree):
        doc = ast.get_docstring(fn, clean=True)
        if not doc:
          continue
        sentence = first_sentence(doc)
        if not _usable(sentence, fn.name, min_chars, max_chars, min_words):
          continue
        signature = signature_source(fn)
        if (signature, sentence) in seen:
          continue
        seen.add((signature, sentence))
        qualname = f'{cls}.{fn.name}' if cls else fn.name
        what = (f'this method of `{module}.{cls}`' if cls
                else f'this function from `{module}`')
        phrase = _phrase(f'{module}.{qualname}', seed, PHRASINGS)
        rows.append((phrase.format(what=what), signature, sentence, package, module,
                     qualname))
    if max_per_package is not None and len(rows) > max_per_package:
      keep = np.sort(rng.choice(len(rows), max_per_package, replace=False))
      rows = [rows[i] for i in keep]
    for row in rows:
      for field, value in zip(FIELDS, row):
        columns[field].append(value)
  if include_topics:
    for key, title, sentence in _topics(root, min_chars, max_chars, min_words):
      row = (_TOPIC_PHRASING.format(title=title), '', sentence, TOPICS_CATEGORY,
             'pydoc_data.topics', key)
      for field, value in zip(FIELDS, row):
        columns[field].append(value)
  if not columns['output']:
    raise ValueError(f'no usable function docstrings in packages {packages}.')
  return {f: _object_array(v) for f, v in columns.items()}


def _object_array(values: Sequence[str]) -> np.ndarray:
  out = np.empty(len(values), dtype=object)
  out[:] = list(values)
  return out


def load_stdlib_instructions(
    cache_dir: str | os.PathLike[str] | None = None, **kwargs: Any
) -> dict[str, np.ndarray]:
  """Builds the instruction data, caching it as JSON in ``cache_dir``.

  The cache file name depends on the Python version, the standard library
  directory and ``kwargs``, so different settings never collide.

  Args:
    cache_dir: directory of the cache file; None disables caching.
    **kwargs: forwarded to :func:`build_stdlib_instructions`.

  Returns:
    The dict returned by :func:`build_stdlib_instructions`.
  """
  if cache_dir is None:
    return build_stdlib_instructions(**kwargs)
  key_fields = {k: (list(v) if isinstance(v, (tuple, list)) else str(v))
                for k, v in sorted(kwargs.items())}
  key_fields['python'] = sys.version.split()[0]
  key_fields['stdlib'] = str(_root(kwargs.get('stdlib_dir')))
  key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:16]
  path = pathlib.Path(cache_dir) / f'stdlib_instructions_{key}.json'
  if path.is_file():
    with path.open('r', encoding='utf-8') as f:
      raw = json.load(f)
    return {k: _object_array(raw[k]) for k in FIELDS}
  data = build_stdlib_instructions(**kwargs)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix('.json.tmp')
  with tmp.open('w', encoding='utf-8') as f:
    json.dump({k: data[k].tolist() for k in FIELDS}, f)
  os.replace(tmp, path)
  return data
