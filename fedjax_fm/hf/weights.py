"""HF weight names and safetensors loading.

Per-family tables translate our module paths to HF module names
(:func:`hf_module_name`); :func:`hf_weight_slots` lists every base weight of
a model with its HF tensor name and layout. :func:`load_hf_weights` copies a
checkpoint into a model with these tables (the one loader for every family),
and :mod:`fedjax_fm.hf.export` uses the same tables to write checkpoints and
PEFT adapters back in HF format.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy for safetensors)
import numpy as np
from flax import nnx

from fedjax_fm.hf.configs import FAMILIES
from fedjax_fm.hf.configs import family_of
from fedjax_fm.models.decoder import Decoder
from fedjax_fm.models.encoder import Encoder
from fedjax_fm.models.gpt2 import GPT2
from fedjax_fm.models.layers import RMSNorm
from fedjax_fm.peft.lora import LoRALinear
from fedjax_fm.peft.surgery import dotted

__all__ = [
    'WeightSlot',
    'chunk_widths',
    'hf_module_name',
    'hf_weight_slots',
    'load_bert_into',
    'load_gpt2_into',
    'load_hf_weights',
    'load_llama_into',
    'load_safetensors',
]


def load_safetensors(path_or_dir: str | os.PathLike) -> dict[str, np.ndarray]:
  """Loads all tensors of a safetensors checkpoint as NumPy arrays.

  Args:
    path_or_dir: a ``.safetensors`` file, a ``.index.json`` shard index, or a
      directory containing ``model.safetensors`` or a sharded
      ``model.safetensors.index.json``.

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


# ---------------------------------------------------------------------------
# Our module paths <-> HF module names.


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
# Names shared by the decoder families (HF ``*ForCausalLM``).
_DECODER_COMMON = (
    ('embed', 'model.embed_tokens', 'embed'),
    ('norm', 'model.norm', 'norm'),
    ('lm_head', 'lm_head', 'linear'),
    (_L + 'attn_norm', 'model.layers.{0}.input_layernorm', 'norm'),
    (_L + r'attn\.(q_norm|k_norm)', 'model.layers.{0}.self_attn.{1}', 'norm'),
)
_RULES = {
    # llama, mistral, qwen2, qwen3, gemma.
    'llama': _rules(
        *_DECODER_COMMON,
        (_L + 'mlp_norm', 'model.layers.{0}.post_attention_layernorm',
         'norm'),
        (_L + r'attn\.([qkvo]_proj)', 'model.layers.{0}.self_attn.{1}',
         'linear'),
        (_L + r'mlp\.(gate_proj|up_proj|down_proj)', 'model.layers.{0}.mlp.{1}',
         'linear'),
    ),
    # gemma2, gemma3_text: post_attention_layernorm normalizes the attention
    # output; the MLP has its own pre and post norms.
    'gemma2': _rules(
        *_DECODER_COMMON,
        (_L + 'post_attn_norm', 'model.layers.{0}.post_attention_layernorm',
         'norm'),
        (_L + 'mlp_norm', 'model.layers.{0}.pre_feedforward_layernorm',
         'norm'),
        (_L + 'post_mlp_norm', 'model.layers.{0}.post_feedforward_layernorm',
         'norm'),
        (_L + r'attn\.([qkvo]_proj)', 'model.layers.{0}.self_attn.{1}',
         'linear'),
        (_L + r'mlp\.(gate_proj|up_proj|down_proj)', 'model.layers.{0}.mlp.{1}',
         'linear'),
    ),
    # phi3 fuses q/k/v (rows: q heads, then k, then v) and gate/up.
    'phi3': _rules(
        *_DECODER_COMMON,
        (_L + 'mlp_norm', 'model.layers.{0}.post_attention_layernorm',
         'norm'),
        (_L + r'attn\.q_proj', 'model.layers.{0}.self_attn.qkv_proj', 'linear',
         (0, 3)),
        (_L + r'attn\.k_proj', 'model.layers.{0}.self_attn.qkv_proj', 'linear',
         (1, 3)),
        (_L + r'attn\.v_proj', 'model.layers.{0}.self_attn.qkv_proj', 'linear',
         (2, 3)),
        (_L + r'attn\.o_proj', 'model.layers.{0}.self_attn.o_proj', 'linear'),
        (_L + r'mlp\.gate_proj', 'model.layers.{0}.mlp.gate_up_proj', 'linear',
         (0, 2)),
        (_L + r'mlp\.up_proj', 'model.layers.{0}.mlp.gate_up_proj', 'linear',
         (1, 2)),
        (_L + r'mlp\.down_proj', 'model.layers.{0}.mlp.down_proj', 'linear'),
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


def _strip_wrappers(path: tuple[Any, ...]) -> tuple[Any, ...]:
  path = tuple(path)
  while path and path[-1] == 'base':
    path = path[:-1]
  return path


def hf_module_name(
    family: str, module_path: str | tuple[Any, ...]
) -> tuple[str | None, str, tuple[int, int] | None]:
  """Translates one of our module paths to its HF module name.

  Args:
    family: one of :data:`~fedjax_fm.hf.configs.FAMILIES`.
    module_path: dotted module path, e.g. ``'layers.0.attn.q_proj'``, or a
      path tuple as from ``nnx.iter_modules``; trailing ``base`` components
      (the inner layer of a wrapper such as ``LoRALinear``) are dropped.

  Returns:
    ``(hf_name, kind, chunk)``: the HF module name (``None`` if the module
    has no HF counterpart, like our classifier head), ``kind`` in
    ``'linear'`` (torch ``[out, in]`` weight), ``'conv1d'`` (``[in, out]``),
    ``'embed'``, ``'norm'``, and ``chunk = (index, count)`` when HF fuses
    ``count`` of our modules along the output axis (GPT-2 ``c_attn``, Phi-3
    ``qkv_proj`` and ``gate_up_proj``).

  Raises:
    ValueError: if the path has no known translation.
  """
  if not isinstance(module_path, str):
    module_path = dotted(_strip_wrappers(module_path))
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
    chunk: ``(index, count)``: ours is chunk ``index`` of the ``count``
      parts of the (transposed) HF tensor along its last axis, each as wide
      as the model weight it holds (:func:`chunk_widths`); ``None`` if not
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


def hf_weight_slots(
    model: nnx.Module, family: str | None = None, *, strict: bool = True
):
  """Lists every base weight of ``model`` with its HF tensor name.

  LoRA factors are not listed (a slot's ``lora`` points at its wrapper);
  weights with no HF counterpart (our classifier head) are skipped.

  Args:
    model: a :class:`~fedjax_fm.models.Decoder`,
      :class:`~fedjax_fm.models.GPT2` or :class:`~fedjax_fm.models.Encoder`,
      possibly with PEFT applied.
    family: weight family; inferred from the model type by default.
    strict: raise if the model holds other parameters than base weights and
      LoRA factors (e.g. adapters, which an export would silently drop).

  Returns:
    A list of :class:`WeightSlot`.

  Raises:
    ValueError: with ``strict``, if the model holds parameters that have no
      HF name (e.g. adapters other than LoRA).
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
          f'{dotted(path)} is a {type(module).__name__}, expected one of '
          f'{[t.__name__ for t in _KIND_TYPES[kind]]} for HF {family}'
      )
    for leaf in leaves:
      var = getattr(module, leaf, None)
      if var is None:
        continue
      var_path = dotted(tuple(path) + (leaf,))
      covered.add(var_path)
      if hf_name is None:
        continue
      hf_leaf, transpose = _LEAVES[kind][leaf]
      slots.append(WeightSlot(
          f'{hf_name}.{hf_leaf}', var_path, var, transpose, chunk,
          lora_of.get(id(module)) if leaf == 'kernel' else None,
      ))
  if not strict:
    return slots
  state = nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
  unknown = sorted(
      {dotted(p) for p, _ in nnx.to_flat_state(state)} - covered
  )
  if unknown:
    raise ValueError(
        f'parameters with no Hugging Face {family} counterpart: '
        f'{unknown[:10]}{" ..." if len(unknown) > 10 else ""} (only LoRA '
        'adapters can be mapped)'
    )
  return slots


def chunk_widths(slots) -> dict[str, list[int]]:
  """Widths of the parts of each fused HF tensor, in chunk order.

  A fused tensor (GPT-2 ``c_attn``, Phi-3 ``qkv_proj``/``gate_up_proj``)
  concatenates ``count`` of our weights along its (transposed) last axis;
  their widths are those of our weights (unequal for Phi-3's q/k/v with
  GQA).

  Args:
    slots: :class:`WeightSlot` list as from :func:`hf_weight_slots`.

  Returns:
    ``{hf_key: [width of chunk 0, width of chunk 1, ...]}`` for the fused
    keys.

  Raises:
    ValueError: if a fused tensor misses one of its parts.
  """
  found: dict[str, dict[int, int]] = {}
  counts = {}
  for slot in slots:
    if slot.chunk is not None:
      index, count = slot.chunk
      found.setdefault(slot.hf_key, {})[index] = int(slot.variable.shape[-1])
      counts[slot.hf_key] = count
  out = {}
  for key, parts in found.items():
    if sorted(parts) != list(range(counts[key])):
      raise ValueError(
          f'{key} fuses {counts[key]} weights, found {sorted(parts)}'
      )
    out[key] = [parts[i] for i in range(counts[key])]
  return out


# Checkpoint tensors that are not weights of ours (buffers, tied copies, the
# pooler and task heads of BERT checkpoints).
_ROTARY = r'(model\.)?layers\.\d+\.self_attn\.rotary_emb\.inv_freq'
_IGNORED = {
    'llama': (_ROTARY,),
    'gemma2': (_ROTARY,),
    'phi3': (_ROTARY,),
    'gpt2': (r'transformer\.h\.\d+\.attn\.(bias|masked_bias)',),
    'bert': (r'embeddings\.position_ids', r'(pooler|cls|classifier)\..*'),
}
_PREFIXES = {'llama': 'model.', 'gemma2': 'model.', 'phi3': 'model.',
             'gpt2': 'transformer.'}


def _normalize_keys(tensors: dict[str, Any], family: str) -> dict[str, Any]:
  """Adds/strips the base-model prefix so keys match our name tables."""
  if family == 'bert':
    # BertForSequenceClassification & co. prefix the encoder with ``bert.``.
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


_LAYER_INDEX = re.compile(r'(?:^|\.)(?:layer|layers|h)\.(\d+)\.')


def _layer_of(key: str) -> int:
  """The layer index in an HF tensor name, or -1 (not in a layer)."""
  m = _LAYER_INDEX.search(key)
  return -1 if m is None else int(m.group(1))


def load_hf_weights(
    model: nnx.Module,
    source: str | os.PathLike | Mapping[str, np.ndarray],
    family: str | None = None,
    *,
    first_layers: bool = False,
) -> list[str]:
  """Copies HF weights into ``model`` in place (strict).

  Torch ``[out, in]`` linear weights are transposed; GPT-2's fused
  ``c_attn`` and Phi-3's ``qkv_proj`` are split into
  ``q_proj``/``k_proj``/``v_proj``, Phi-3's ``gate_up_proj`` into
  ``gate_proj``/``up_proj``. Base-model
  checkpoints without the ``model.``/``transformer.`` prefix (or with the
  ``bert.`` prefix of BERT task models), rotary ``inv_freq`` and GPT-2 mask
  buffers, BERT ``position_ids``/``pooler.*``/``cls.*``/``classifier.*``
  (our classifier keeps its initialisation) and a stored ``lm_head.weight``
  of a tied model are accepted. Into a model with PEFT applied (LoRA,
  adapters, ...), only the base weights are loaded.

  Args:
    model: a :class:`~fedjax_fm.models.Decoder`,
      :class:`~fedjax_fm.models.GPT2` or :class:`~fedjax_fm.models.Encoder`
      whose config matches the checkpoint.
    source: a model directory / safetensors file / shard index, or a loaded
      ``{name: array}`` dict.
    family: weight family; inferred from the model type by default.
    first_layers: the model may be shallower than the checkpoint: it takes
      the checkpoint's first layers and the deeper layers' tensors are left
      unread (a truncated pretrained model, e.g. for smoke tests).

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
  slots = hf_weight_slots(model, family, strict=False)
  wanted = {s.hf_key for s in slots}
  ignored = [re.compile(p) for p in _IGNORED[family]]
  if 'lm_head.weight' not in wanted:
    ignored.append(re.compile(r'lm_head\.weight'))  # tied embeddings
  deeper = set()
  if first_layers:   # the checkpoint's layers beyond the model's are left unread
    depth = 1 + max(map(_layer_of, wanted), default=-1)
    deeper = {k for k in tensors if _layer_of(k) >= depth}
  missing = sorted(wanted - set(tensors))
  unexpected = sorted(
      k for k in tensors
      if k not in wanted and k not in deeper and not any(p.fullmatch(k) for p in ignored)
  )
  if missing or unexpected:
    more = lambda x: ' ...' if len(x) > 10 else ''
    raise ValueError(
        f'checkpoint does not match the {type(model).__name__} ({family} '
        f'names): missing keys {missing[:10]}{more(missing)}, unexpected keys '
        f'{unexpected[:10]}{more(unexpected)}'
    )
  widths = chunk_widths(slots)
  for slot in slots:
    value = np.asarray(tensors[slot.hf_key])
    if slot.transpose:
      value = value.T
    if slot.chunk is not None:
      index, count = slot.chunk
      parts = widths[slot.hf_key]
      if value.shape[-1] != sum(parts):
        raise ValueError(
            f'{slot.hf_key} of shape {value.shape} cannot be split into '
            f'{count} parts of widths {parts} along its last axis'
        )
      start = sum(parts[:index])
      value = value[..., start:start + parts[index]]
    if value.shape != tuple(slot.variable.shape):
      raise ValueError(
          f'shape mismatch for {slot.hf_key} -> {slot.path}: checkpoint '
          f'{value.shape} vs model {tuple(slot.variable.shape)}'
      )
    slot.variable.set_value(jnp.asarray(value, dtype=slot.variable.dtype))
  return sorted(wanted)


def load_llama_into(
    model: Decoder, source, family: str | None = None
) -> list[str]:
  """Copies decoder weights (Llama, Mistral, Qwen2/3, Gemma 1/2/3, Phi-3).

  Args:
    model: the Decoder.
    source: see :func:`load_hf_weights`.
    family: weight family; default from the model (``'gemma2'`` with
      ``post_norms``, else ``'llama'``). Phi-3 checkpoints need ``'phi3'``
      (or :func:`~fedjax_fm.hf.configs.family_of_model_type`).

  Returns:
    The HF keys that were loaded, sorted.
  """
  return load_hf_weights(model, source, family)


def load_gpt2_into(model: GPT2, source) -> list[str]:
  """Copies GPT-2 weights into a GPT2 in place.

  See :func:`load_hf_weights`.
  """
  return load_hf_weights(model, source, 'gpt2')


def load_bert_into(model: Encoder, source, *, first_layers: bool = False) -> list[str]:
  """Copies HF BERT weights into an Encoder in place.

  A ``bert.`` prefix (as in ``BertForSequenceClassification``) is stripped;
  ``pooler.*``, ``cls.*`` and ``classifier.*`` are ignored (the classifier
  keeps its initialisation). See :func:`load_hf_weights` (``first_layers``).
  """
  return load_hf_weights(model, source, 'bert', first_layers=first_layers)
