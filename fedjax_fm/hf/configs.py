"""Translating HF ``config.json`` dicts to and from our model configs.

==========================  ===============================================
HF ``model_type``           our config (model)
==========================  ===============================================
``bert``                    :class:`~fedjax_fm.models.EncoderConfig`
                            (:class:`~fedjax_fm.models.Encoder`)
``gpt2``                    :class:`~fedjax_fm.models.GPT2Config`
                            (:class:`~fedjax_fm.models.GPT2`)
``llama``, ``mistral``,     :class:`~fedjax_fm.models.DecoderConfig`
``qwen2``                   (:class:`~fedjax_fm.models.Decoder`)
==========================  ===============================================

Each family has one ``*_config_from_hf`` (HF dict -> validated config;
options the model does not implement raise a ValueError naming the field)
and one ``*_config_to_hf`` (config -> the architecture fields of a HF
``config.json``). :func:`family_of` / :func:`family_of_model_type` give the
weight-naming family (:data:`FAMILIES`) used by :mod:`fedjax_fm.hf.weights`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from flax import nnx

from fedjax_fm.models.decoder import Decoder
from fedjax_fm.models.decoder import DecoderConfig
from fedjax_fm.models.encoder import Encoder
from fedjax_fm.models.encoder import EncoderConfig
from fedjax_fm.models.gpt2 import GPT2
from fedjax_fm.models.gpt2 import GPT2Config

__all__ = [
    'FAMILIES',
    'LLAMA_TYPES',
    'MODEL_TYPES',
    'decoder_config_from_hf',
    'decoder_config_to_hf',
    'encoder_config_from_hf',
    'encoder_config_to_hf',
    'family_of',
    'family_of_model_type',
    'gpt2_config_from_hf',
    'gpt2_config_to_hf',
]

MODEL_TYPES = ('bert', 'gpt2', 'llama', 'mistral', 'qwen2')
LLAMA_TYPES = ('llama', 'mistral', 'qwen2')
# Weight-naming families; 'llama' covers llama/mistral/qwen2.
FAMILIES = ('llama', 'gpt2', 'bert')


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
# Llama / Mistral / Qwen2 <-> DecoderConfig.


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
  return _with_overrides(DecoderConfig, kwargs, overrides)


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
