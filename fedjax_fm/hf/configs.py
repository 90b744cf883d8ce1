"""Translating HF ``config.json`` dicts to and from our model configs.

==========================  ===============================================
HF ``model_type``           our config (model)
==========================  ===============================================
``bert``                    :class:`~fedjax_fm.models.EncoderConfig`
                            (:class:`~fedjax_fm.models.Encoder`)
``gpt2``                    :class:`~fedjax_fm.models.GPT2Config`
                            (:class:`~fedjax_fm.models.GPT2`)
``llama``, ``mistral``,     :class:`~fedjax_fm.models.DecoderConfig`
``qwen2``, ``qwen3``,       (:class:`~fedjax_fm.models.Decoder`)
``gemma``, ``gemma2``,
``gemma3_text``, ``phi3``
==========================  ===============================================

Each family has one ``*_config_from_hf`` (HF dict -> validated config;
options the model does not implement raise a ValueError naming the field)
and one ``*_config_to_hf`` (config -> the architecture fields of a HF
``config.json``). Both read and write the transformers 5 layout
(``rope_parameters``, ``layer_types``) and understand the transformers 4 one
(``rope_theta``, ``rope_scaling``, ``rope_local_base_freq``,
``sliding_window_pattern``). :func:`family_of` / :func:`family_of_model_type`
give the weight-naming family (:data:`FAMILIES`) used by
:mod:`fedjax_fm.hf.weights`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

from flax import nnx

from fedjax_fm.models.decoder import ROPE_TYPES
from fedjax_fm.models.decoder import Decoder
from fedjax_fm.models.decoder import DecoderConfig
from fedjax_fm.models.decoder import RopeScaling
from fedjax_fm.models.encoder import Encoder
from fedjax_fm.models.encoder import EncoderConfig
from fedjax_fm.models.gpt2 import GPT2
from fedjax_fm.models.gpt2 import GPT2Config

__all__ = [
    'DECODER_TYPES',
    'FAMILIES',
    'LLAMA_TYPES',
    'MODEL_TYPES',
    'decoder_config_from_hf',
    'decoder_config_to_hf',
    'decoder_model_type',
    'encoder_config_from_hf',
    'encoder_config_to_hf',
    'family_of',
    'family_of_model_type',
    'gpt2_config_from_hf',
    'gpt2_config_to_hf',
]

# HF model types loaded as a :class:`~fedjax_fm.models.Decoder`.
DECODER_TYPES = ('llama', 'mistral', 'qwen2', 'qwen3', 'gemma', 'gemma2',
                 'gemma3_text', 'phi3')
# Former name of DECODER_TYPES (every decoder type, not only Llama's).
LLAMA_TYPES = DECODER_TYPES
MODEL_TYPES = ('bert', 'gpt2') + DECODER_TYPES
# Weight-naming families: 'llama' covers llama/mistral/qwen2/qwen3/gemma,
# 'gemma2' (pre/post feed-forward norms) gemma2/gemma3_text, 'phi3' the fused
# qkv_proj/gate_up_proj of phi3.
FAMILIES = ('llama', 'gemma2', 'phi3', 'gpt2', 'bert')
_FAMILY_OF_TYPE = {
    'llama': 'llama', 'mistral': 'llama', 'qwen2': 'llama', 'qwen3': 'llama',
    'gemma': 'llama', 'gemma2': 'gemma2', 'gemma3_text': 'gemma2',
    'phi3': 'phi3', 'gpt2': 'gpt2', 'bert': 'bert',
}


def family_of_model_type(model_type: str) -> str:
  """Maps a HF ``model_type`` to its weight-naming family (:data:`FAMILIES`)."""
  try:
    return _FAMILY_OF_TYPE[model_type]
  except (KeyError, TypeError):
    raise ValueError(
        f'model_type must be one of {MODEL_TYPES}, got {model_type!r}'
    ) from None


def family_of(model: nnx.Module) -> str:
  """The weight-naming family of one of our models (:data:`FAMILIES`).

  A :class:`~fedjax_fm.models.Decoder` with ``post_norms`` uses the
  ``'gemma2'`` names, any other the ``'llama'`` ones (``'phi3'`` is only
  chosen through a ``model_type``).
  """
  if isinstance(model, Decoder):
    return 'gemma2' if model.config.post_norms else 'llama'
  if isinstance(model, GPT2):
    return 'gpt2'
  if isinstance(model, Encoder):
    return 'bert'
  raise TypeError(
      'expected a Decoder, GPT2 or Encoder model, got '
      f'{type(model).__name__}'
  )


def _unsupported(model_type: str, field: str, value: Any, why: str):
  return ValueError(
      f'unsupported {model_type} config: {field}={value!r} ({why})'
  )


def _with_overrides(cls, kwargs: dict[str, Any], overrides: Mapping[str, Any]):
  """``cls(**kwargs, **overrides).validate()``; unknown overrides raise."""
  unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
  if unknown:
    raise ValueError(f'unknown {cls.__name__} fields: {sorted(unknown)}')
  kwargs.update(overrides)
  return cls(**kwargs).validate()


# ---------------------------------------------------------------------------
# BERT <-> EncoderConfig.


def encoder_config_from_hf(
    config: Mapping[str, Any], num_labels: int = 2, **overrides: Any
) -> EncoderConfig:
  """Builds an :class:`EncoderConfig` from a HF BERT ``config.json`` dict.

  Args:
    config: the parsed ``config.json`` (``model_type`` ``'bert'``).
    num_labels: classifier outputs.
    **overrides: any other :class:`EncoderConfig` field (e.g. ``pooling``,
      ``dropout``, ``dtype``). ``dropout`` defaults to 0.0.

  Returns:
    A validated config.

  Raises:
    ValueError: for another ``model_type``, a non-absolute
      ``position_embedding_type`` or an unknown override.
  """
  model_type = config.get('model_type', 'bert')
  if model_type != 'bert':
    raise ValueError(f"model_type must be 'bert', got {model_type!r}")
  pos_type = config.get('position_embedding_type', 'absolute')
  if pos_type != 'absolute':
    raise ValueError(
        f"position_embedding_type must be 'absolute', got {pos_type!r}"
    )
  kwargs = dict(
      vocab_size=config['vocab_size'],
      hidden_size=config['hidden_size'],
      num_layers=config['num_hidden_layers'],
      num_heads=config['num_attention_heads'],
      intermediate_size=config['intermediate_size'],
      max_position=config.get('max_position_embeddings', 512),
      type_vocab_size=config.get('type_vocab_size', 2),
      layer_norm_eps=config.get('layer_norm_eps', 1e-12),
      hidden_act=config.get('hidden_act', 'gelu'),
      num_labels=num_labels,
  )
  return _with_overrides(EncoderConfig, kwargs, overrides)


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
# GPT-2 <-> GPT2Config.

# HF ``activation_function`` names accepted by :func:`gpt2_config_from_hf`.
_GPT2_ACTIVATIONS = {
    'gelu_new': 'gelu_new',
    'gelu_pytorch_tanh': 'gelu_new',
    'gelu': 'gelu',
    'relu': 'relu',
}


def gpt2_config_from_hf(
    config: Mapping[str, Any], **overrides: Any
) -> GPT2Config:
  """Builds a :class:`GPT2Config` from a HF GPT-2 ``config.json`` dict.

  Args:
    config: the parsed ``config.json`` (``model_type`` ``'gpt2'``).
    **overrides: any other :class:`GPT2Config` field (e.g. ``dtype``,
      ``dropout``). ``dropout`` defaults to 0.0 whatever the HF
      ``resid_pdrop``.

  Returns:
    A validated config.

  Raises:
    ValueError: for a different ``model_type`` or a GPT-2 option this model
      does not implement (named in the message).
  """
  model_type = config.get('model_type', 'gpt2')
  if model_type != 'gpt2':
    raise ValueError(f"model_type must be 'gpt2', got {model_type!r}")
  unsupported = {
      'scale_attn_by_inverse_layer_idx': False,
      'add_cross_attention': False,
      'scale_attn_weights': True,
  }
  for field, supported in unsupported.items():
    value = config.get(field, supported)
    if bool(value) != supported:
      raise ValueError(
          f'unsupported GPT-2 config: {field}={value!r} (only {supported} '
          'is implemented)'
      )
  act = config.get('activation_function', 'gelu_new')
  if act not in _GPT2_ACTIVATIONS:
    raise ValueError(
        f'unsupported GPT-2 config: activation_function={act!r}; supported: '
        f'{sorted(_GPT2_ACTIVATIONS)}'
    )
  dim = config['n_embd']
  kwargs = dict(
      vocab_size=config['vocab_size'],
      dim=dim,
      num_layers=config['n_layer'],
      num_heads=config['n_head'],
      mlp_dim=config.get('n_inner') or 4 * dim,
      max_len=config.get('n_positions', 1024),
      norm_eps=config.get('layer_norm_epsilon', 1e-5),
      activation=_GPT2_ACTIVATIONS[act],
      tie_embeddings=config.get('tie_word_embeddings', True),
  )
  return _with_overrides(GPT2Config, kwargs, overrides)


def gpt2_config_to_hf(cfg: GPT2Config) -> dict[str, Any]:
  """The architecture fields of a HF GPT-2 ``config.json``."""
  return {
      'model_type': 'gpt2',
      'architectures': ['GPT2LMHeadModel'],
      'vocab_size': cfg.vocab_size,
      'n_embd': cfg.dim,
      'n_layer': cfg.num_layers,
      'n_head': cfg.num_heads,
      'n_inner': cfg.mlp_dim,
      'n_positions': cfg.max_len,
      'layer_norm_epsilon': cfg.norm_eps,
      'activation_function': cfg.activation,
      'tie_word_embeddings': cfg.tie_embeddings,
      'scale_attn_weights': True,
      'scale_attn_by_inverse_layer_idx': False,
      'add_cross_attention': False,
  }


# ---------------------------------------------------------------------------
# Decoder families <-> DecoderConfig.


class _Family(NamedTuple):
  """What a decoder ``model_type`` fixes or allows (transformers 5)."""

  architecture: str
  act_field: str  # name of the MLP activation field
  norm_scale_offset: float  # 1.0: (1 + w) RMSNorm
  embed_scale: bool  # embeddings * sqrt(hidden_size)
  qk_norm: bool  # q_norm / k_norm per head
  post_norms: bool  # post-attention / pre+post feed-forward norms
  sliding: str  # 'none' | 'uniform' (all layers) | 'per_layer' (layer_types)
  biases: str  # 'llama' (attention_bias, mlp_bias) | 'attn' | 'qkv' | 'none'


_DECODER_FAMILIES = {
    'llama': _Family('LlamaForCausalLM', 'hidden_act', 0.0, False, False,
                     False, 'none', 'llama'),
    'mistral': _Family('MistralForCausalLM', 'hidden_act', 0.0, False, False,
                       False, 'uniform', 'none'),
    'qwen2': _Family('Qwen2ForCausalLM', 'hidden_act', 0.0, False, False,
                     False, 'per_layer', 'qkv'),
    'qwen3': _Family('Qwen3ForCausalLM', 'hidden_act', 0.0, False, True,
                     False, 'per_layer', 'attn'),
    'gemma': _Family('GemmaForCausalLM', 'hidden_act', 1.0, True, False,
                     False, 'none', 'attn'),
    'gemma2': _Family('Gemma2ForCausalLM', 'hidden_activation', 1.0, True,
                      False, True, 'per_layer', 'attn'),
    'gemma3_text': _Family('Gemma3ForCausalLM', 'hidden_activation', 1.0,
                           True, True, True, 'per_layer', 'attn'),
    'phi3': _Family('Phi3ForCausalLM', 'hidden_act', 0.0, False, False,
                    False, 'uniform', 'none'),
}
_GEMMA_TYPES = ('gemma', 'gemma2', 'gemma3_text')

# transformers 5 class defaults, for fields a config.json leaves out.
_COMMON_DEFAULTS = {
    'max_position_embeddings': 2048, 'rms_norm_eps': 1e-6,
    'tie_word_embeddings': False, 'hidden_act': 'silu',
    'attention_bias': False, 'mlp_bias': False, 'head_dim': None,
    'rope_theta': 10000.0, 'sliding_window': None,
}
_GEMMA_DEFAULTS = {
    'head_dim': 256, 'tie_word_embeddings': True,
    'max_position_embeddings': 8192, 'hidden_act': 'gelu_pytorch_tanh',
    'hidden_activation': 'gelu_pytorch_tanh', 'query_pre_attn_scalar': 256,
    'sliding_window': 4096,
}
_QWEN_DEFAULTS = {
    'max_position_embeddings': 32768, 'sliding_window': 4096,
    'use_sliding_window': False, 'max_window_layers': 28,
}
_DEFAULTS = {
    'llama': {},
    'mistral': {'max_position_embeddings': 4096 * 32, 'sliding_window': 4096},
    'qwen2': _QWEN_DEFAULTS,
    'qwen3': {**_QWEN_DEFAULTS, 'head_dim': 128},
    'gemma': _GEMMA_DEFAULTS,
    'gemma2': {**_GEMMA_DEFAULTS, 'final_logit_softcapping': 30.0,
               'attn_logit_softcapping': 50.0},
    'gemma3_text': {**_GEMMA_DEFAULTS, 'max_position_embeddings': 131072,
                    'rope_theta': 1e6, 'rope_local_base_freq': 1e4,
                    'sliding_window_pattern': 6},
    'phi3': {'max_position_embeddings': 4096, 'rms_norm_eps': 1e-5},
}

# HF activation names (``ACT2FN`` keys) <-> ours.
_HF_ACTIVATIONS = {
    'silu': 'silu', 'swish': 'silu', 'gelu': 'gelu',
    'gelu_pytorch_tanh': 'gelu_new', 'gelu_new': 'gelu_new', 'relu': 'relu',
    'tanh': 'tanh',
}
_ACTIVATIONS_TO_HF = {'silu': 'silu', 'gelu': 'gelu',
                      'gelu_new': 'gelu_pytorch_tanh', 'relu': 'relu',
                      'tanh': 'tanh'}
_LAYER_TYPES = ('full_attention', 'sliding_attention')


def _getter(config: Mapping[str, Any], model_type: str):
  defaults = {**_COMMON_DEFAULTS, **_DEFAULTS[model_type]}
  return lambda field: config[field] if field in config else defaults.get(
      field)


def _number(x: float) -> int | float:
  return int(x) if float(x).is_integer() else float(x)


def _rope_spec(
    params: Mapping[str, Any], field: str, model_type: str, max_pos: int,
    nested: bool,
) -> tuple[float, RopeScaling | None]:
  """``(theta, scaling)`` of one standardized ``rope_parameters`` dict."""
  rope_type = params.get('rope_type', params.get('type', 'default'))
  theta = float(params['rope_theta'])
  if rope_type == 'default':
    return theta, None
  if rope_type not in ROPE_TYPES:
    raise _unsupported(
        model_type, f'{field}.rope_type', rope_type,
        f"implemented: {('default',) + ROPE_TYPES}"
    )

  def need(key):
    value = params.get(key)
    if value is None:
      raise _unsupported(model_type, f'{field}.{key}', value,
                         f'required for rope_type {rope_type!r}')
    return value

  orig = params.get('original_max_position_embeddings') or max_pos
  if rope_type == 'linear':
    return theta, RopeScaling('linear', float(need('factor')))
  if rope_type == 'dynamic':
    return theta, RopeScaling('dynamic', float(need('factor')),
                              original_max_len=int(max_pos))
  if rope_type == 'llama3':
    return theta, RopeScaling(
        'llama3', float(need('factor')), original_max_len=int(orig),
        low_freq_factor=float(need('low_freq_factor')),
        high_freq_factor=float(need('high_freq_factor')),
    )
  factor = params.get('factor') or max_pos / orig
  optional = lambda key: None if params.get(key) is None else float(
      params[key])
  return theta, RopeScaling(
      'yarn', float(factor), original_max_len=int(orig),
      beta_fast=float(params.get('beta_fast') or 32),
      beta_slow=float(params.get('beta_slow') or 1),
      attention_factor=optional('attention_factor'),
      mscale=optional('mscale'), mscale_all_dim=optional('mscale_all_dim'),
      # transformers reads ``truncate`` from the top level only.
      truncate=True if nested else bool(params.get('truncate', True)),
  )


def _decoder_rope(config, model_type, get, max_pos) -> dict[str, Any]:
  """RoPE fields of a DecoderConfig, as transformers 5 standardizes them."""
  scaling_field = 'rope_scaling' if config.get('rope_scaling') else (
      'rope_parameters')
  if model_type == 'gemma3_text':
    params = dict(config.get('rope_parameters') or {})
    if params and not any(isinstance(v, Mapping) for v in params.values()):
      raise _unsupported(
          model_type, 'rope_parameters', params,
          "expected per-layer-type {'full_attention': ..., "
          "'sliding_attention': ...}"
      )
    full = dict(params.get('full_attention') or {'rope_type': 'default'})
    if config.get('rope_scaling'):
      full.update(config['rope_scaling'])
    if full.get('rope_theta') is None:
      full['rope_theta'] = get('rope_theta') or 1e6
    local = dict(params.get('sliding_attention') or {'rope_type': 'default'})
    if local.get('rope_theta') is None:
      local['rope_theta'] = get('rope_local_base_freq') or 1e4
    theta, scaling = _rope_spec(full, 'rope_parameters.full_attention',
                                model_type, max_pos, True)
    local_spec = _rope_spec(local, 'rope_parameters.sliding_attention',
                            model_type, max_pos, True)
    local_theta = None
    if local_spec != (theta, scaling):
      if local_spec[1] is not None:
        raise _unsupported(
            model_type, 'rope_parameters.sliding_attention.rope_type',
            local.get('rope_type'),
            'sliding-window layers only implement the default RoPE (or the '
            'same RoPE as full_attention)'
        )
      local_theta = local_spec[0]
    return dict(rope_theta=theta, rope_scaling=scaling,
                local_rope_theta=local_theta)
  params = dict(config.get('rope_scaling') or config.get('rope_parameters')
                or {})
  if any(isinstance(v, Mapping) for v in params.values()):
    raise _unsupported(model_type, scaling_field, params,
                       'per-layer-type RoPE is only implemented for '
                       'gemma3_text')
  if params.get('rope_theta') is None:
    params['rope_theta'] = get('rope_theta') or 10000.0
  partial = params.get('partial_rotary_factor')
  if partial is None:
    partial = config.get('partial_rotary_factor')
  partial = 1.0 if partial is None else float(partial)
  if partial != 1.0 and model_type != 'phi3':
    raise _unsupported(model_type, 'partial_rotary_factor', partial,
                       'partial rotary embeddings are only implemented for '
                       'phi3')
  rope_type = params.get('rope_type', params.get('type', 'default'))
  if model_type == 'phi3' and rope_type != 'default':
    raise _unsupported(model_type, f'{scaling_field}.rope_type', rope_type,
                       "only the default RoPE is implemented for phi3 "
                       "(its 'su'/'yarn'/'longrope' is LongRoPE)")
  theta, scaling = _rope_spec(params, scaling_field, model_type, max_pos,
                              False)
  return dict(rope_theta=theta, rope_scaling=scaling,
              partial_rotary_factor=partial)


def _decoder_sliding(config, model_type, get, num_layers) -> dict[str, Any]:
  """``sliding_window`` / ``sliding_layers`` of a DecoderConfig."""
  kind = _DECODER_FAMILIES[model_type].sliding
  layer_types = config.get('layer_types')
  if layer_types is not None:
    layer_types = list(layer_types)
    if (len(layer_types) != num_layers
        or any(t not in _LAYER_TYPES for t in layer_types)):
      raise _unsupported(
          model_type, 'layer_types', layer_types,
          f'expected {num_layers} entries in {_LAYER_TYPES}'
      )
  if kind == 'none':
    if layer_types and any(t != 'full_attention' for t in layer_types):
      raise _unsupported(model_type, 'layer_types', layer_types,
                         f"{model_type} only has 'full_attention' layers")
    return dict(sliding_window=None, sliding_layers=None)
  window = get('sliding_window')
  if kind == 'uniform':
    want = 'full_attention' if window is None else 'sliding_attention'
    if layer_types and any(t != want for t in layer_types):
      raise _unsupported(
          model_type, 'layer_types', layer_types,
          f'{model_type} applies sliding_window={window!r} to every layer'
      )
    return dict(sliding_window=window, sliding_layers=None)
  if model_type in ('qwen2', 'qwen3'):
    if not get('use_sliding_window'):
      window = None
    if layer_types is None:
      first = get('max_window_layers')
      layer_types = ['sliding_attention' if window is not None and i >= first
                     else 'full_attention' for i in range(num_layers)]
  elif layer_types is None:
    every = 2 if model_type == 'gemma2' else config.get(
        'sliding_window_pattern', config.get('_sliding_window_pattern', 6))
    layer_types = ['sliding_attention' if (i + 1) % every else
                   'full_attention' for i in range(num_layers)]
  sliding = tuple(t == 'sliding_attention' for t in layer_types)
  if not any(sliding):
    return dict(sliding_window=None, sliding_layers=None)
  if window is None:
    raise _unsupported(model_type, 'layer_types', layer_types,
                       "'sliding_attention' layers need a sliding_window")
  return dict(sliding_window=int(window),
              sliding_layers=None if all(sliding) else sliding)


def decoder_config_from_hf(
    config: Mapping[str, Any], **overrides: Any
) -> DecoderConfig:
  """Builds a :class:`DecoderConfig` from a decoder ``config.json`` dict.

  Fields a config leaves out take the transformers 5 class defaults of its
  ``model_type``, and fields transformers ignores for a type are ignored
  (e.g. ``attn_logit_softcapping`` of ``gemma3_text``, ``mlp_bias`` of
  ``mistral``). A ``'dynamic'`` RoPE scaling sets ``max_len`` to
  ``factor * max_position_embeddings`` (the context it extrapolates to); its
  base grows with the largest position of each call, which is what
  transformers computes for a model whose inputs only grow (as in one
  ``generate``; transformers also keeps the largest length seen across
  calls).

  Args:
    config: the parsed ``config.json``, ``model_type`` in
      :data:`DECODER_TYPES`.
    **overrides: any other :class:`DecoderConfig` field (``dtype``,
      ``dropout``, ``max_len``, ...).

  Returns:
    A validated config.

  Raises:
    ValueError: for options not implemented by :class:`Decoder`, naming the
      field: RoPE types other than default/linear/dynamic/llama3/yarn (e.g.
      ``longrope``), ``partial_rotary_factor`` outside phi3, a per-layer RoPE
      outside gemma3_text, a non-default RoPE of gemma3 sliding layers,
      ``layer_types`` a model type does not apply, an unknown activation,
      ``use_bidirectional_attention``, ``quantization_config``.
  """
  model_type = config.get('model_type')
  if model_type not in DECODER_TYPES:
    raise ValueError(
        f'model_type must be one of {DECODER_TYPES}, got {model_type!r}'
    )
  fam = _DECODER_FAMILIES[model_type]
  get = _getter(config, model_type)
  if config.get('quantization_config'):
    raise _unsupported(model_type, 'quantization_config',
                       config['quantization_config'],
                       'quantized checkpoints are not supported')
  if config.get('use_bidirectional_attention'):
    raise _unsupported(model_type, 'use_bidirectional_attention',
                       config['use_bidirectional_attention'],
                       'only causal attention is implemented')
  act = get(fam.act_field)
  if model_type == 'gemma' and act == 'gelu':
    act = 'gelu_pytorch_tanh'  # as GemmaConfig does
  if act not in _HF_ACTIVATIONS:
    raise _unsupported(model_type, fam.act_field, act,
                       f'implemented: {sorted(_HF_ACTIVATIONS)}')
  dim = config['hidden_size']
  num_heads = config['num_attention_heads']
  num_layers = config['num_hidden_layers']
  head_dim = get('head_dim') or dim // num_heads
  if model_type == 'phi3' and head_dim * num_heads != dim:
    raise _unsupported(model_type, 'head_dim', head_dim,
                       f'phi3 needs hidden_size / num_attention_heads = '
                       f'{dim / num_heads}')
  max_pos = get('max_position_embeddings')
  rope = _decoder_rope(config, model_type, get, max_pos)
  max_len = max_pos
  scaling = rope['rope_scaling']
  if scaling is not None and scaling.rope_type == 'dynamic':
    max_len = max(max_pos, int(max_pos * scaling.factor))
  if fam.biases == 'llama':
    attn_bias = bool(get('attention_bias'))
    biases = (attn_bias, attn_bias, bool(get('mlp_bias')))
  elif fam.biases == 'attn':
    attn_bias = bool(get('attention_bias'))
    biases = (attn_bias, attn_bias, False)
  else:
    biases = (fam.biases == 'qkv', False, False)
  kwargs = dict(
      vocab_size=config['vocab_size'],
      dim=dim,
      num_layers=num_layers,
      num_heads=num_heads,
      num_kv_heads=config.get('num_key_value_heads') or num_heads,
      mlp_dim=config['intermediate_size'],
      max_len=max_len,
      norm_eps=get('rms_norm_eps'),
      tie_embeddings=bool(get('tie_word_embeddings')),
      attention_bias=biases[0],
      attention_out_bias=biases[1],
      mlp_bias=biases[2],
      head_size=None if head_dim * num_heads == dim else int(head_dim),
      mlp_activation=_HF_ACTIVATIONS[act],
      norm_scale_offset=fam.norm_scale_offset,
      embed_scale=fam.embed_scale,
      qk_norm=fam.qk_norm,
      post_norms=fam.post_norms,
      **rope,
      **_decoder_sliding(config, model_type, get, num_layers),
  )
  if model_type in ('gemma2', 'gemma3_text'):
    scalar = get('query_pre_attn_scalar')
    if scalar is not None and scalar != head_dim:
      kwargs['query_pre_attn_scalar'] = float(scalar)
    final = get('final_logit_softcapping')
    kwargs['final_logit_softcap'] = None if final is None else float(final)
  if model_type == 'gemma2':
    # Gemma3 keeps attn_logit_softcapping in its config but never applies it.
    cap = get('attn_logit_softcapping')
    kwargs['attn_logit_softcap'] = None if cap is None else float(cap)
  return _with_overrides(DecoderConfig, kwargs, overrides)


def decoder_model_type(cfg: DecoderConfig) -> str:
  """The plainest HF ``model_type`` that expresses ``cfg``.

  Gemma norms choose ``gemma``/``gemma2``/``gemma3_text``, q/k norms
  ``qwen3``, partial rotary ``phi3``, q/k/v-only biases ``qwen2``, sliding
  windows ``mistral`` (every layer) or ``qwen2`` (some layers); otherwise
  ``llama``.
  """
  sliding = cfg.layer_is_sliding
  if cfg.norm_scale_offset or cfg.embed_scale or cfg.post_norms:
    if cfg.post_norms:
      return 'gemma3_text' if cfg.qk_norm else 'gemma2'
    return 'gemma'
  if cfg.qk_norm:
    return 'qwen3'
  if cfg.partial_rotary_factor != 1.0:
    return 'phi3'
  qkv_only = (cfg.attention_bias, cfg.attention_out_bias, cfg.mlp_bias) == (
      True, False, False)
  if qkv_only or (any(sliding) and not all(sliding)):
    return 'qwen2'
  if all(sliding) and not (cfg.attention_bias or cfg.attention_out_bias
                           or cfg.mlp_bias):
    return 'mistral'
  return 'llama'


def _rope_to_hf(theta: float, scaling: RopeScaling | None) -> dict[str, Any]:
  out = {'rope_type': 'default', 'rope_theta': theta}
  if scaling is None:
    return out
  out.update(rope_type=scaling.rope_type, factor=scaling.factor)
  if scaling.rope_type == 'llama3':
    out.update(low_freq_factor=scaling.low_freq_factor,
               high_freq_factor=scaling.high_freq_factor,
               original_max_position_embeddings=scaling.original_max_len)
  elif scaling.rope_type == 'yarn':
    out.update(original_max_position_embeddings=scaling.original_max_len,
               beta_fast=scaling.beta_fast, beta_slow=scaling.beta_slow,
               truncate=scaling.truncate)
    for key in ('attention_factor', 'mscale', 'mscale_all_dim'):
      if getattr(scaling, key) is not None:
        out[key] = getattr(scaling, key)
  return out


def decoder_config_to_hf(
    cfg: DecoderConfig, model_type: str = 'llama'
) -> dict[str, Any]:
  """The architecture fields of a HF ``config.json`` for a :class:`Decoder`.

  Args:
    cfg: the decoder config.
    model_type: one of :data:`DECODER_TYPES`.

  Returns:
    A dict in the transformers 5 layout (``rope_parameters``,
    ``layer_types``) plus the transformers 4 RoPE fields (``rope_theta``,
    ``rope_scaling``, ``rope_local_base_freq``).

  Raises:
    ValueError: if ``model_type`` cannot express ``cfg`` (the message names
      the field): e.g. biases other than the type's (Qwen2 has q/k/v biases
      only, Mistral and Phi-3 none, Llama's ``attention_bias`` covers q/k/v
      and o together), Gemma norms outside the Gemma types, q/k norms outside
      qwen3/gemma3_text, sliding windows on llama/gemma or on some layers
      only for mistral/phi3.
  """
  if model_type not in DECODER_TYPES:
    raise ValueError(
        f'model_type must be one of {DECODER_TYPES}, got {model_type!r}'
    )
  fam = _DECODER_FAMILIES[model_type]

  def cannot(field, value):
    return ValueError(
        f'model_type={model_type!r} cannot express {field}={value!r}'
    )

  for field in ('norm_scale_offset', 'embed_scale', 'qk_norm', 'post_norms'):
    if getattr(cfg, field) != getattr(fam, field):
      raise cannot(field, getattr(cfg, field))
  biases = (cfg.attention_bias, cfg.attention_out_bias, cfg.mlp_bias)
  allowed = {
      'qkv': [(True, False, False)],
      'none': [(False, False, False)],
      'attn': [(a, a, False) for a in (False, True)],
      'llama': [(a, a, m) for a in (False, True) for m in (False, True)],
  }[fam.biases]
  if biases not in allowed:
    raise ValueError(
        f"model_type={model_type!r} cannot express attention_bias="
        f'{cfg.attention_bias}, attention_out_bias={cfg.attention_out_bias}, '
        f'mlp_bias={cfg.mlp_bias}'
    )
  if model_type == 'gemma' and cfg.mlp_activation == 'gelu':
    raise cannot('mlp_activation', cfg.mlp_activation)  # read as tanh GELU
  gemma23 = model_type in ('gemma2', 'gemma3_text')
  checks = [
      ('query_pre_attn_scalar', gemma23 or cfg.query_pre_attn_scalar is None),
      ('attn_logit_softcap',
       model_type == 'gemma2' or cfg.attn_logit_softcap is None),
      ('final_logit_softcap', gemma23 or cfg.final_logit_softcap is None),
      ('local_rope_theta',
       model_type == 'gemma3_text' or cfg.local_rope_theta is None),
      ('partial_rotary_factor',
       model_type == 'phi3' or cfg.partial_rotary_factor == 1.0),
      ('rope_scaling', model_type != 'phi3' or cfg.rope_scaling is None),
      ('head_size',
       model_type != 'phi3' or cfg.head_dim * cfg.num_heads == cfg.dim),
  ]
  for field, ok in checks:
    if not ok:
      raise cannot(field, getattr(cfg, field))
  sliding = cfg.layer_is_sliding
  if any(sliding) and fam.sliding == 'none':
    raise cannot('sliding_window', cfg.sliding_window)
  if fam.sliding == 'uniform' and any(sliding) and not all(sliding):
    raise cannot('sliding_layers', cfg.sliding_layers)
  scaling = cfg.rope_scaling
  max_pos = cfg.max_len
  if scaling is not None and scaling.rope_type == 'dynamic':
    max_pos = scaling.original_max_len
  out = {
      'model_type': model_type,
      'architectures': [fam.architecture],
      'vocab_size': cfg.vocab_size,
      'hidden_size': cfg.dim,
      'intermediate_size': cfg.mlp_dim,
      'num_hidden_layers': cfg.num_layers,
      'num_attention_heads': cfg.num_heads,
      'num_key_value_heads': cfg.num_kv_heads,
      'max_position_embeddings': max_pos,
      'rms_norm_eps': cfg.norm_eps,
      'rope_theta': cfg.rope_theta,
      fam.act_field: _ACTIVATIONS_TO_HF[cfg.mlp_activation],
      'tie_word_embeddings': cfg.tie_embeddings,
  }
  rope = _rope_to_hf(cfg.rope_theta, scaling)
  if model_type == 'gemma3_text':
    local = rope if cfg.local_rope_theta is None else _rope_to_hf(
        cfg.local_rope_theta, None)
    out['rope_parameters'] = {'full_attention': rope,
                              'sliding_attention': local}
    out['rope_local_base_freq'] = local['rope_theta']
  else:
    out['rope_parameters'] = rope
    if scaling is not None:
      out['rope_scaling'] = dict(rope)
  if model_type == 'phi3':
    out['rope_parameters']['partial_rotary_factor'] = cfg.partial_rotary_factor
    out['partial_rotary_factor'] = cfg.partial_rotary_factor
    out['original_max_position_embeddings'] = max_pos
  else:
    out['head_dim'] = cfg.head_dim
  if fam.biases == 'llama':
    out.update(attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias)
  elif fam.biases == 'attn':
    out['attention_bias'] = cfg.attention_bias
  window = cfg.sliding_window if any(sliding) else None
  types = ['sliding_attention' if s else 'full_attention' for s in sliding]
  if fam.sliding == 'uniform':
    out['sliding_window'] = window
  elif model_type in ('qwen2', 'qwen3'):
    leading = next((i for i, s in enumerate(sliding) if s), cfg.num_layers)
    out.update(use_sliding_window=window is not None, sliding_window=window,
               max_window_layers=leading, layer_types=types)
  elif fam.sliding == 'per_layer':
    # transformers builds the sliding mask of Gemma2/3 even when no layer
    # uses it, and that needs a window.
    out.update(sliding_window=window or cfg.sliding_window or 4096,
               layer_types=types)
  if gemma23:
    scalar = cfg.query_pre_attn_scalar
    out['query_pre_attn_scalar'] = _number(
        cfg.head_dim if scalar is None else scalar)
    out['final_logit_softcapping'] = cfg.final_logit_softcap
    out['attn_logit_softcapping'] = cfg.attn_logit_softcap
  return out
