"""Exporting fine-tuned models to Hugging Face formats.

Two formats, for the decoder types (``llama``, ``mistral``, ``qwen2``,
``qwen3``, ``gemma``, ``gemma2``, ``gemma3_text``, ``phi3``), GPT-2 and BERT:

* :func:`export_lora_adapter` writes trained LoRA factors as a HF PEFT
  adapter (``adapter_config.json`` + ``adapter_model.safetensors``) that
  ``peft.PeftModel.from_pretrained(base_model, out_dir)`` loads onto the HF
  base model::

    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight  [r, in]
    base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight  [out, r]

  Our ``[in, r]``/``[r, out]`` factors are transposed; layers with another
  rank or alpha than the most common one go into ``rank_pattern`` /
  ``alpha_pattern``. A fused HF module (GPT-2's ``c_attn``, Phi-3's
  ``qkv_proj`` and ``gate_up_proj``) gets one adapter whose ``A`` stacks the
  ``A`` factors of our adapted parts (q/k/v, gate/up) and whose ``B`` is
  block diagonal (zero rows for parts without LoRA), which computes exactly
  the same update; the fused parts must share one ``alpha / rank``.
* :func:`export_hf_checkpoint` writes the full weights (LoRA merged into the
  base kernels) with HF names and layouts plus ``config.json``, loadable with
  ``transformers.AutoModelForCausalLM.from_pretrained(out_dir)`` (``AutoModel``
  for BERT) and with :func:`fedjax_fm.hf.from_pretrained`.

Only LoRA factors are exported; other trained parameters (a classifier head
from ``extra_trainable``) have no HF PEFT counterpart here.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from fedjax_fm.hf.configs import DECODER_TYPES
from fedjax_fm.hf.configs import decoder_config_to_hf
from fedjax_fm.hf.configs import decoder_model_type
from fedjax_fm.hf.configs import encoder_config_to_hf
from fedjax_fm.hf.configs import family_of
from fedjax_fm.hf.configs import family_of_model_type
from fedjax_fm.hf.configs import gpt2_config_to_hf
from fedjax_fm.hf.hub import load_hf_config
from fedjax_fm.hf.weights import WeightSlot
from fedjax_fm.hf.weights import chunk_widths
from fedjax_fm.hf.weights import hf_module_name
from fedjax_fm.hf.weights import hf_weight_slots
from fedjax_fm.models.decoder import Decoder
from fedjax_fm.peft.lora import LoRALinear
from fedjax_fm.peft.surgery import dotted

__all__ = [
    'HF_FAMILIES',
    'export_hf_checkpoint',
    'export_lora_adapter',
    'hf_config_for',
    'hf_state_dict',
    'lora_adapter_state',
]

# HF model types the exporters write.
HF_FAMILIES = DECODER_TYPES + ('gpt2', 'bert')
ADAPTER_CONFIG = 'adapter_config.json'
ADAPTER_WEIGHTS = 'adapter_model.safetensors'
_TASK_TYPES = {'llama': 'CAUSAL_LM', 'gemma2': 'CAUSAL_LM',
               'phi3': 'CAUSAL_LM', 'gpt2': 'CAUSAL_LM',
               'bert': 'FEATURE_EXTRACTION'}
# Architecture fields of a decoder config.json that hf_config_for rewrites;
# dropped from the original config first so none is left stale.
_DECODER_FIELDS = (
    'rope_scaling', 'rope_parameters', 'rope_theta', 'rope_local_base_freq',
    'partial_rotary_factor', 'original_max_position_embeddings', 'head_dim',
    'sliding_window', 'use_sliding_window', 'max_window_layers',
    'layer_types', 'sliding_window_pattern', '_sliding_window_pattern',
    'query_pre_attn_scalar', 'attn_logit_softcapping',
    'final_logit_softcapping', 'hidden_act', 'hidden_activation',
    'attention_bias', 'mlp_bias',
)
_DTYPE_NAMES = {'float32': 'float32', 'bfloat16': 'bfloat16',
                'float16': 'float16', 'float64': 'float64'}


def _as_model(model_or_split: Any) -> nnx.Module:
  """A module, or a ``peft.Split`` (graphdef, trainable, frozen) merged."""
  if isinstance(model_or_split, nnx.Module):
    return model_or_split
  if all(hasattr(model_or_split, a)
         for a in ('graphdef', 'trainable', 'frozen')):
    return nnx.merge(model_or_split.graphdef, model_or_split.trainable,
                     model_or_split.frozen)
  raise TypeError(
      'expected an nnx.Module or a peft.Split, got '
      f'{type(model_or_split).__name__}'
  )


def _resolve_family(model: nnx.Module, hf_family: str | None) -> str:
  """The weight family for ``model`` exported as HF ``hf_family``.

  For a Decoder, ``hf_family`` (a model type) must express its config (see
  :func:`~fedjax_fm.hf.configs.decoder_config_to_hf`).
  """
  family = family_of(model)
  if hf_family is None:
    return family
  if hf_family not in HF_FAMILIES:
    raise ValueError(
        f'hf_family must be one of {HF_FAMILIES}, got {hf_family!r}'
    )
  if isinstance(model, Decoder) and hf_family in DECODER_TYPES:
    decoder_config_to_hf(model.config, hf_family)  # raises if it cannot
    return family_of_model_type(hf_family)
  if family_of_model_type(hf_family) != family:
    raise ValueError(
        f'hf_family={hf_family!r} does not fit a {type(model).__name__} '
        f'(its weights use {family} names)'
    )
  return family


def _numpy(variable: nnx.Variable) -> np.ndarray:
  return np.asarray(variable[...])


def _slot_value(slot: WeightSlot) -> np.ndarray:
  value = _numpy(slot.variable)
  lora = slot.lora
  if lora is not None:  # merge W + A @ B * alpha / r, in float32
    delta = (_numpy(lora.lora_a).astype(np.float32)
             @ _numpy(lora.lora_b).astype(np.float32)) * lora.scaling
    value = (value.astype(np.float32) + delta).astype(value.dtype)
  return value


def hf_state_dict(
    model: nnx.Module, family: str | None = None
) -> dict[str, np.ndarray]:
  """The model's weights under HF names and layouts, LoRA merged.

  Args:
    model: a :class:`~fedjax_fm.models.Decoder`,
      :class:`~fedjax_fm.models.GPT2` or :class:`~fedjax_fm.models.Encoder`
      (classifier head excluded), possibly with LoRA applied.
    family: weight family (:data:`~fedjax_fm.hf.configs.FAMILIES`);
      inferred by default.

  Returns:
    ``{hf_name: np.ndarray}`` in the parameter dtype.
  """
  groups = collections.defaultdict(list)
  slots = hf_weight_slots(model, family)
  chunk_widths(slots)  # raises if a fused tensor misses a part
  for slot in slots:
    groups[slot.hf_key].append(slot)
  out = {}
  for key, slots in groups.items():
    chunk = slots[0].chunk
    if chunk is None:
      if len(slots) != 1:
        raise ValueError(f'{len(slots)} weights map to {key}')
      value = _slot_value(slots[0])
    else:
      by_index = {s.chunk[0]: s for s in slots}
      if sorted(by_index) != list(range(chunk[1])):
        raise ValueError(
            f'{key} fuses {chunk[1]} weights, found {sorted(by_index)}'
        )
      value = np.concatenate(
          [_slot_value(by_index[i]) for i in range(chunk[1])], axis=-1)
    if slots[0].transpose:
      value = value.T
    out[key] = np.ascontiguousarray(value)
  return out


def _default_model_type(model: nnx.Module) -> str:
  if isinstance(model, Decoder):
    return decoder_model_type(model.config)
  return family_of(model)


def hf_config_for(
    model: nnx.Module,
    hf_config: Mapping[str, Any] | str | os.PathLike | None = None,
    *,
    model_type: str | None = None,
) -> dict[str, Any]:
  """A HF ``config.json`` dict describing ``model``.

  Args:
    model: one of our models.
    hf_config: the original HF config (dict, ``config.json`` path or model
      directory) whose other fields (token ids, ...) are kept; the
      architecture fields are always rewritten from ``model.config``. The
      token ids of a decoder it does not give are written as ``None``.
    model_type: HF ``model_type``; default: ``hf_config``'s, else for a
      Decoder the plainest type that expresses it
      (:func:`~fedjax_fm.hf.configs.decoder_model_type`: ``'llama'``,
      ``'qwen2'`` for q/k/v-only biases, ``'gemma2'`` for Gemma2 norms, ...),
      ``'gpt2'`` or ``'bert'``.

  Returns:
    The config dict.

  Raises:
    ValueError: if ``model_type`` does not fit the model.
  """
  base = {}
  if hf_config is not None:
    base = (dict(hf_config) if isinstance(hf_config, Mapping)
            else load_hf_config(hf_config))
  model_type = (model_type or base.get('model_type')
                or _default_model_type(model))
  family = _resolve_family(model, model_type)
  cfg = model.config
  stale = ('rope_scaling', '_name_or_path')
  if model_type in DECODER_TYPES:
    arch = decoder_config_to_hf(cfg, model_type)
    stale += _DECODER_FIELDS
  elif family == 'gpt2':
    arch = gpt2_config_to_hf(cfg)
  else:
    arch = encoder_config_to_hf(cfg)
  for key in stale:
    base.pop(key, None)
  if model_type in DECODER_TYPES:
    # Without an original config, no special tokens: transformers' class
    # defaults (e.g. Phi-3's pad id 32000) may not even fit the vocabulary.
    for key in ('bos_token_id', 'eos_token_id', 'pad_token_id'):
      base.setdefault(key, None)
  base.update(arch)
  dtype = _DTYPE_NAMES.get(np.dtype(cfg.param_dtype).name, 'float32')
  base['torch_dtype' if 'torch_dtype' in base else 'dtype'] = dtype
  return base


def _parse_size(size: int | str | None) -> int | None:
  if size is None or isinstance(size, int):
    return size
  m = re.fullmatch(r'\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*', size, re.I)
  if not m:
    raise ValueError(
        f"max_shard_size must be an int (bytes) or like '500MB'/'2GiB', got "
        f'{size!r}'
    )
  unit = (m.group(2) or 'B').upper()
  scale = {'B': 1, 'KB': 10**3, 'MB': 10**6, 'GB': 10**9,
           'KIB': 2**10, 'MIB': 2**20, 'GIB': 2**30}[unit]
  return int(float(m.group(1)) * scale)


def _save(tensors: dict[str, np.ndarray], path: str) -> None:
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  save_file(tensors, path, metadata={'format': 'pt'})


def _write_weights(tensors, out_dir, max_shard_size) -> list[str]:
  """Writes model.safetensors, or shards plus their index; returns names."""
  limit = _parse_size(max_shard_size)
  # Remove what a previous export may have left, so loaders see one layout.
  stale = glob.glob(os.path.join(out_dir, 'model-*-of-*.safetensors'))
  stale += [os.path.join(out_dir, n) for n in
            ('model.safetensors', 'model.safetensors.index.json')]
  for path in stale:
    if os.path.isfile(path):
      os.remove(path)
  total = sum(v.nbytes for v in tensors.values())
  if limit is None or total <= limit:
    _save(tensors, os.path.join(out_dir, 'model.safetensors'))
    return ['model.safetensors']
  shards, current, size = [], {}, 0
  for key in sorted(tensors):
    nbytes = tensors[key].nbytes
    if current and size + nbytes > limit:
      shards.append(current)
      current, size = {}, 0
    current[key] = tensors[key]
    size += nbytes
  shards.append(current)
  names, weight_map = [], {}
  for i, shard in enumerate(shards):
    name = f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors'
    _save(shard, os.path.join(out_dir, name))
    names.append(name)
    weight_map.update({k: name for k in shard})
  with open(os.path.join(out_dir, 'model.safetensors.index.json'), 'w') as f:
    json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map},
              f, indent=2, sort_keys=True)
  return names + ['model.safetensors.index.json']


def export_hf_checkpoint(
    model: Any,
    out_dir: str | os.PathLike,
    hf_config: Mapping[str, Any] | str | os.PathLike | None = None,
    *,
    model_type: str | None = None,
    max_shard_size: int | str | None = None,
) -> dict[str, Any]:
  """Writes full weights in HF format (``config.json`` + safetensors).

  LoRA factors are merged into their base kernels (``W + A @ B * alpha/r``).
  Tied embeddings write no ``lm_head.weight``, as ``save_pretrained`` does.

  Args:
    model: a model or a ``peft.Split``.
    out_dir: output directory (created if needed).
    hf_config: the original HF config (dict, ``config.json`` path or model
      directory) to keep non-architecture fields from; optional.
    model_type: HF ``model_type`` to write (see :func:`hf_config_for`).
    max_shard_size: bytes (or ``'500MB'``-style) per shard; larger exports
      are sharded with a ``model.safetensors.index.json``. Default: one file.

  Returns:
    The written config dict.
  """
  model = _as_model(model)
  config = hf_config_for(model, hf_config, model_type=model_type)
  family = family_of_model_type(config['model_type'])
  tensors = hf_state_dict(model, family)
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  _write_weights(tensors, out_dir, max_shard_size)
  with open(os.path.join(out_dir, 'config.json'), 'w') as f:
    json.dump(config, f, indent=2, sort_keys=True)
  return config


def _number(x: float) -> int | float:
  return int(x) if float(x).is_integer() else float(x)


def lora_adapter_state(
    model: nnx.Module, family: str | None = None
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """LoRA factors under HF PEFT names, and the matching LoRA config fields.

  Args:
    model: a model with :class:`~fedjax_fm.peft.LoRALinear` layers.
    family: weight family; inferred by default.

  Returns:
    ``(tensors, fields)``: ``tensors`` maps
    ``base_model.model.<hf module>.lora_{A,B}.weight`` to ``[r, in]`` /
    ``[out, r]`` arrays; ``fields`` holds ``r``, ``lora_alpha``,
    ``lora_dropout``, ``target_modules``, ``rank_pattern``, ``alpha_pattern``
    and ``fan_in_fan_out``.

  Raises:
    ValueError: if the model has no LoRA layer, LoRA sits on a module with no
      HF counterpart, dropout rates differ (PEFT has one ``lora_dropout``), or
      the LoRAs fused into one HF module (GPT-2's ``c_attn``, Phi-3's
      ``qkv_proj``/``gate_up_proj``) have different ``alpha / rank``.
  """
  family = family or family_of(model)
  modules = list(nnx.iter_modules(model))
  groups = collections.OrderedDict()
  all_linear = set()
  widths = collections.defaultdict(dict)  # fused HF module -> part widths
  for path, module in modules:
    if not isinstance(module, nnx.Linear):
      continue
    try:
      name, _, chunk = hf_module_name(family, path)
    except ValueError:  # e.g. the inner layers of a bottleneck adapter
      continue
    if name is not None:
      all_linear.add(name)
      if chunk is not None:
        widths[name][chunk[0]] = module.out_features
  for path, module in modules:
    if not isinstance(module, LoRALinear):
      continue
    name, _, chunk = hf_module_name(family, path)
    if name is None:
      raise ValueError(
          f'LoRA on {dotted(path)!r} has no Hugging Face {family} counterpart'
      )
    groups.setdefault(name, []).append((chunk, module, dotted(path)))
  if not groups:
    raise ValueError(
        'the model has no LoRALinear layer; apply fedjax_fm.peft.apply_lora '
        'first'
    )
  tensors, per_module, dropouts = {}, {}, {}
  for name, items in sorted(groups.items()):
    for _, module, path in items:
      dropouts[path] = module.dropout_rate
    if items[0][0] is None:
      (_, module, _), = items
      a = _numpy(module.lora_a).T
      b = _numpy(module.lora_b).T
      rank, alpha = module.rank, module.alpha
    else:
      count = items[0][0][1]
      scalings = {path: m.scaling for _, m, path in items}
      if len(set(scalings.values())) > 1:
        raise ValueError(
            f'HF fuses {sorted(scalings)} into {name}; their LoRA scalings '
            f'alpha/rank differ ({scalings}); use one alpha/rank for them'
        )
      items = sorted(items, key=lambda it: it[0][0])
      parts = [widths[name][i] for i in range(count)]
      rank = sum(m.rank for _, m, _ in items)
      a = np.concatenate([_numpy(m.lora_a).T for _, m, _ in items], axis=0)
      b = np.zeros((sum(parts), rank), a.dtype)
      offset = 0
      for (index, _), m, _ in items:
        start = sum(parts[:index])
        b[start:start + parts[index], offset:offset + m.rank] = (
            _numpy(m.lora_b).T)
        offset += m.rank
      alpha = items[0][1].scaling * rank
    prefix = f'base_model.model.{name}'
    tensors[f'{prefix}.lora_A.weight'] = np.ascontiguousarray(a)
    tensors[f'{prefix}.lora_B.weight'] = np.ascontiguousarray(b)
    per_module[name] = (rank, _number(alpha))
  if len(set(dropouts.values())) > 1:
    raise ValueError(
        f'LoRA layers use different dropout rates {dropouts}; HF PEFT has a '
        'single lora_dropout'
    )
  (rank0, alpha0), _ = collections.Counter(
      per_module.values()).most_common(1)[0]
  rank_pattern = {re.escape(n): r for n, (r, _) in per_module.items()
                  if r != rank0}
  alpha_pattern = {re.escape(n): a for n, (_, a) in per_module.items()
                   if a != alpha0}
  # Leaf names ('q_proj') when they select exactly the adapted modules,
  # otherwise a regex that PEFT full-matches against module names.
  adapted = set(per_module)
  leaves = {n.rsplit('.', 1)[-1] for n in adapted}
  if all({n for n in all_linear if n.rsplit('.', 1)[-1] == leaf}
         <= adapted for leaf in leaves):
    target_modules = sorted(leaves)
  else:
    target_modules = '(' + '|'.join(re.escape(n) for n in sorted(adapted)) + ')'
  fields = {
      'r': rank0,
      'lora_alpha': alpha0,
      'lora_dropout': next(iter(dropouts.values())),
      'target_modules': target_modules,
      'rank_pattern': rank_pattern,
      'alpha_pattern': alpha_pattern,
      # HF GPT-2 uses Conv1D ([in, out] weights).
      'fan_in_fan_out': family == 'gpt2',
  }
  return tensors, fields


def export_lora_adapter(
    model_or_split: Any,
    out_dir: str | os.PathLike,
    *,
    base_model_name_or_path: str,
    hf_family: str | None = None,
    task_type: str | None = None,
) -> dict[str, Any]:
  """Writes the model's LoRA factors as a HF PEFT adapter.

  ``peft.PeftModel.from_pretrained(base, out_dir)`` then reproduces our
  model, where ``base`` is the HF model our base weights came from
  (``LlamaForCausalLM``/``GPT2LMHeadModel``-style for causal LMs,
  ``BertModel`` for BERT).

  Args:
    model_or_split: a model with LoRA applied, or a ``peft.Split`` of one
      (e.g. with the trained ``trainable`` dict put back).
    out_dir: output directory (created if needed).
    base_model_name_or_path: recorded in ``adapter_config.json``.
    hf_family: the HF ``model_type`` of the base model (one of
      :data:`HF_FAMILIES`); checked against the model, inferred by default.
      It must be given for ``'phi3'``, whose fused ``qkv_proj`` /
      ``gate_up_proj`` the other decoder names do not use.
    task_type: PEFT task type; default ``'CAUSAL_LM'`` (``'FEATURE_EXTRACTION'``
      for BERT).

  Returns:
    The written adapter config dict.

  Raises:
    ValueError: see :func:`lora_adapter_state`; or ``hf_family`` does not fit
      the model.
  """
  model = _as_model(model_or_split)
  family = _resolve_family(model, hf_family)
  tensors, fields = lora_adapter_state(model, family)
  config = {
      'peft_type': 'LORA',
      'task_type': task_type or _TASK_TYPES[family],
      'base_model_name_or_path': os.fspath(base_model_name_or_path),
      'revision': None,
      'inference_mode': True,
      'bias': 'none',
      'init_lora_weights': True,
      'use_rslora': False,
      'use_dora': False,
      'modules_to_save': None,
      'layers_to_transform': None,
      'layers_pattern': None,
      **fields,
  }
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  _save(tensors, os.path.join(out_dir, ADAPTER_WEIGHTS))
  with open(os.path.join(out_dir, ADAPTER_CONFIG), 'w') as f:
    json.dump(config, f, indent=2, sort_keys=True)
  return config
