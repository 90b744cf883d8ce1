"""One registry per family of named parts, read by `config.validate` and the builders.

Each registry maps the names a config may use to a builder of the part from the
config. `fedjax_fm.config.validate` takes its allowed values from here, and
`fedjax_fm.train.build` builds through here, so a name cannot be valid in one
place and unknown in the other (`tests/test_registries.py` validates and builds
every registered name).
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any, Callable, Iterator, Mapping, NamedTuple

from flax import nnx
import jax.numpy as jnp

from fedjax_fm import aggregate as aggregate_lib
from fedjax_fm import compress as compress_lib
from fedjax_fm import engine
from fedjax_fm import models
from fedjax_fm import peft
from fedjax_fm import privacy as privacy_lib
from fedjax_fm.data import partition as partition_lib
from fedjax_fm.hf import load as hf_load
from fedjax_fm.peft import hetlora
from fedjax_fm.peft import lora_aggregation


class Registry(Mapping):
  """Named builders of one family; unknown names fail naming the allowed ones."""

  def __init__(self, family: str, entries: dict[str, Any]):
    self.family = family
    self._entries = dict(entries)

  def __getitem__(self, name: str) -> Any:
    if name not in self._entries:
      raise KeyError(f'unknown {self.family} {name!r}; allowed: {self.names}')
    return self._entries[name]

  def __iter__(self) -> Iterator[str]:
    return iter(self._entries)

  def __len__(self) -> int:
    return len(self._entries)

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(self._entries)


# ------------------------------------------------------------------ models

def _dtype(m):
  return jnp.bfloat16 if m.dtype == 'bfloat16' else jnp.float32


def _scan(m) -> dict[str, Any]:
  """The layer-stack fields of the transformer configs (`models.scan`)."""
  return dict(scan_layers=m.scan_layers, remat=m.remat)


def _minilm(config, task_data):
  m = config.model
  first = {'num_layers': m.pretrained_layers} if m.get('pretrained_layers', 0) else {}
  model, _ = hf_load.load_minilm_encoder(task_data.num_labels, rngs_seed=config.seed,
                                         pooling=m.pooling, dropout=m.dropout, dtype=_dtype(m),
                                         **_scan(m), **first)
  return model, models.classification_task()


def _mlp(config, task_data):
  in_dim = task_data.train.arrays['x'].shape[-1]
  model = models.MLPClassifier(in_dim, tuple(config.model.hidden), task_data.num_labels,
                               rngs=nnx.Rngs(config.seed))
  return model, models.features_classification_task()


def _vocab(config, task_data):
  from fedjax_fm import config as config_lib  # pylint: disable=g-import-not-at-top
  vocab = config.model.vocab_size or task_data.tokenizer.vocab_size
  if vocab < task_data.tokenizer.vocab_size:
    raise config_lib.ConfigError(
        f'config.model.vocab_size={vocab} is invalid: the tokenizer has '
        f'{task_data.tokenizer.vocab_size} tokens')
  return vocab


def _encoder(config, task_data):
  m = config.model
  cfg = models.EncoderConfig(
      vocab_size=_vocab(config, task_data), hidden_size=m.hidden_size,
      num_layers=m.num_layers, num_heads=m.num_heads, intermediate_size=m.mlp_dim,
      max_position=max(config.data.max_len, 16), num_labels=task_data.num_labels,
      pooling=m.pooling, dropout=m.dropout, dtype=_dtype(m), **_scan(m))
  return models.Encoder(cfg, rngs=nnx.Rngs(config.seed)), models.classification_task()


def _decoder(config, task_data):
  m = config.model
  room = config.peft.num_virtual_tokens if config.peft.method == 'prompt' else 0
  cfg = models.DecoderConfig(
      vocab_size=_vocab(config, task_data), dim=m.hidden_size, num_layers=m.num_layers,
      num_heads=m.num_heads, num_kv_heads=m.num_kv_heads, mlp_dim=m.mlp_dim,
      max_len=config.data.max_len + room, dtype=_dtype(m), **_scan(m))
  return models.Decoder(cfg, rngs=nnx.Rngs(config.seed)), task_of(config)


class Pretrained(NamedTuple):
  """A pretrained decoder and what it reads and writes (`load_pretrained_decoder`).

  Attributes:
    model: a fresh `models.Decoder` (PEFT surgery changes a model in place, so
      every call builds a new one from the same weights).
    tokenizer: its tokenizer, a `data.HFTokenizer`.
    prompt_template: its chat template as a `data.PromptTemplate` (one user
      turn: the instruction, a blank line and the input), or None without one.
    eos_id: the id that ends a response (a chat turn), or None.
    description: the file, its model name and the layers kept.
  """
  model: Any
  tokenizer: Any
  prompt_template: Any
  eos_id: int | None
  description: str


_SENTINELS = ('\x00instruction\x00', '\x00input\x00')


def chat_prompt_template(render: Callable[[list], str]):
  """A `data.PromptTemplate` rendering one user turn of a chat template.

  Args:
    render: ``render(messages) -> str``, the chat template with the header of
      the assistant turn (e.g. ``GGUFInfo.apply_chat_template``).

  Returns:
    A template whose ``format(instruction, input)`` equals
    ``render([{'role': 'user', 'content': instruction + '\\n\\n' + input}])``
    (``instruction`` alone for an empty input).
  """
  from fedjax_fm.data import instructions  # pylint: disable=g-import-not-at-top

  def fields(content):
    text = render([{'role': 'user', 'content': content}])
    text = text.replace('{', '{{').replace('}', '}}')
    return text.replace(_SENTINELS[0], '{instruction}').replace(_SENTINELS[1], '{input}')

  return instructions.PromptTemplate(
      with_input=fields(_SENTINELS[0] + '\n\n' + _SENTINELS[1]),
      without_input=fields(_SENTINELS[0]))


_GGUF_BLOCK = re.compile(r'model\.layers\.(\d+)\.')


@functools.lru_cache(maxsize=1)
def _read_gguf(path: str, dtype: str, max_len: int, keep_layers: int,
               scan_layers: bool = False, remat: str = 'none'):
  """(graphdef, state, tokenizer, metadata) of a GGUF file; the last one stays in memory."""
  from fedjax_fm.hf import configs as hf_configs  # pylint: disable=g-import-not-at-top
  from fedjax_fm.hf import gguf  # pylint: disable=g-import-not-at-top
  from fedjax_fm.hf import weights as hf_weights  # pylint: disable=g-import-not-at-top
  from fedjax_fm.hf.load import build_and_load  # pylint: disable=g-import-not-at-top

  compute = jnp.bfloat16 if dtype == 'bfloat16' else jnp.float32
  if not keep_layers:
    model, tokenizer, info = gguf.load_gguf(path, dtype=compute, param_dtype=jnp.float32,
                                            max_len=max_len, scan_layers=scan_layers,
                                            remat=remat)
    metadata = info.metadata
  else:   # the first blocks only: the others are neither dequantized nor built
    ckpt = gguf.read_gguf(path, dequantize=False)
    metadata = ckpt.metadata
    num_layers = int(ckpt.hf_config['num_hidden_layers'])
    if keep_layers > num_layers:
      from fedjax_fm import config as config_lib  # pylint: disable=g-import-not-at-top
      raise config_lib.ConfigError(f'config.model.keep_layers={keep_layers} is invalid: '
                                   f'{path} has {num_layers} layers')
    tensors = {name: t.dequantize() for name, t in ckpt.tensors.items()
               if not (m := _GGUF_BLOCK.match(name)) or int(m.group(1)) < keep_layers}
    cfg = hf_configs.decoder_config_from_hf(
        dict(ckpt.hf_config, num_hidden_layers=keep_layers), dtype=compute,
        param_dtype=jnp.float32, max_len=max_len, scan_layers=scan_layers, remat=remat)
    model = build_and_load(lambda: models.Decoder(cfg, rngs=nnx.Rngs(0)),
                           lambda m: hf_weights.load_llama_into(m, tensors))
    tokenizer = gguf.gguf_tokenizer(metadata)
  graphdef, state = nnx.split(model)
  return graphdef, state, tokenizer, metadata


def load_pretrained_decoder(config) -> Pretrained:
  """The pretrained decoder of ``config.model`` (``kind="gguf"``), its tokenizer and chat.

  The file is `fedjax_fm.hf.gguf.load_gguf`'s (``config.model.path``, or the
  bundled SmolLM2-135M-Instruct); with ``config.model.keep_layers`` only the
  first blocks are read. The weights are read once per process (the last file
  read stays in memory); every call returns a new model built from them.

  Raises:
    ConfigError: if ``config.model.path`` is not a file, or
      ``config.model.keep_layers`` exceeds the model's layers.
  """
  from fedjax_fm import config as config_lib  # pylint: disable=g-import-not-at-top
  from fedjax_fm import data as data_lib  # pylint: disable=g-import-not-at-top
  from fedjax_fm.hf import gguf  # pylint: disable=g-import-not-at-top

  m = config.model
  path = m.path or gguf.smollm2_gguf_path()
  if not os.path.isfile(path):
    raise config_lib.ConfigError(f'config.model.path={m.path!r} is invalid: no such file')
  # Room for the soft prompt, and for the generated tokens after a prompt of up to
  # data.max_len tokens (every held-out prompt fits data.max_len, see evaluate.py).
  room = config.peft.num_virtual_tokens if config.peft.method == 'prompt' else 0
  room += config.data.generate_max_tokens
  graphdef, state, tokenizer, metadata = _read_gguf(
      os.path.abspath(path), m.dtype, config.data.max_len + room, m.keep_layers,
      m.scan_layers, m.remat)
  tokens = metadata.get('tokenizer.ggml.tokens') or ()

  def special(key):
    i = metadata.get(f'tokenizer.ggml.{key}_token_id')
    return (None, '') if i is None else (int(i), str(tokens[int(i)]))

  (eos_id, eos_token), (pad_id, _), (_, bos_token) = (
      special('eos'), special('padding'), special('bos'))
  template = None
  chat = metadata.get('tokenizer.chat_template')
  if chat:
    template = chat_prompt_template(lambda messages: gguf.render_chat_template(
        chat, messages, add_generation_prompt=True, bos_token=bos_token,
        eos_token=eos_token))
  arch = metadata.get('general.architecture', 'llama')
  num_layers = int(metadata.get(f'{arch}.block_count', 0))
  description = (f'{metadata.get("general.name") or "GGUF"} ({os.path.basename(path)}), '
                 f'{m.keep_layers or num_layers} of {num_layers} layers')
  return Pretrained(model=nnx.merge(graphdef, state, copy=True),   # own Variables
                    tokenizer=data_lib.HFTokenizer(tokenizer, pad_id=pad_id),
                    prompt_template=template, eos_id=eos_id, description=description)


def _gguf(config, task_data):
  del task_data   # the tokenizer is the model's own
  return load_pretrained_decoder(config).model, task_of(config)


def task_of(config) -> models.Task:
  """The training task of a config's model and data."""
  if config.data.source in ('instructions', 'stdlib_instructions'):
    return models.causal_lm_task(loss_mask_key='loss_mask')
  if config.model.kind in ('minilm', 'encoder'):
    return models.classification_task()
  if config.model.kind == 'mlp':
    return models.features_classification_task()
  return models.causal_lm_task()


MODELS = Registry('model.kind', {
    'minilm': _minilm, 'encoder': _encoder, 'decoder': _decoder, 'mlp': _mlp,
    'gguf': _gguf})


# -------------------------------------------------------------------- peft

def _extra(p):
  return tuple(p.extra_trainable)


def _lora(config, model):
  p = config.peft
  peft.apply_lora(model, rank=p.rank, alpha=p.alpha, dropout=p.dropout,
                  target_modules=tuple(p.target_modules), rngs=nnx.Rngs(config.seed + 1))
  split = peft.split_model(model, 'lora', extra_trainable=_extra(p))
  if p.lora_aggregation == 'ffa':   # FFA-LoRA: A stays at its shared random init
    split = lora_aggregation.freeze_lora_a(split)
  return split


def _slora(config, model):
  """Stage 1 of SLoRA: sparse fine-tuning of the target kernels."""
  p = config.peft
  return peft.slora.sparse_split(model, tuple(p.target_modules), _extra(p))


def _surgery(method: str, apply: Callable | None):
  def build(config, model):
    p = config.peft
    if apply is not None:
      apply(model, p, nnx.Rngs(config.seed + 1))
    return peft.split_model(model, method, extra_trainable=_extra(p))
  return build


PEFT_METHODS = Registry('peft.method', {
    'full': lambda config, model: peft.split_model(model, 'full'),
    'lora': _lora,
    'slora': _slora,
    'adapter': _surgery('adapter', lambda m, p, r: peft.apply_adapters(
        m, bottleneck=p.adapter_bottleneck, rngs=r)),
    'bitfit': _surgery('bitfit', None),
    'ia3': _surgery('ia3', lambda m, p, r: peft.apply_ia3(m, rngs=r)),
    'prompt': _surgery('prompt', lambda m, p, r: peft.apply_prompt_tuning(
        m, p.num_virtual_tokens, rngs=r)),
    'prefix': _surgery('prefix', lambda m, p, r: peft.apply_prefix_tuning(
        m, p.num_virtual_tokens, rngs=r)),
})

LORA_AGGREGATION = Registry('peft.lora_aggregation', {
    'fedit': lambda p: lora_aggregation.fedit(),
    'ffa': lambda p: lora_aggregation.ffa(),
    'product': lambda p: lora_aggregation.product(),
    'stack': lambda p: lora_aggregation.stack(scaling=p.alpha / p.rank),
    'hetlora': lambda p: hetlora.sparsity_weighted(),   # HetLoRA (heterogeneous ranks)
})


# -------------------------------------------------------------- aggregators

AGGREGATORS = Registry('aggregator.name', {
    'mean': lambda a, seed: aggregate_lib.weighted_mean(),
    'norm_bounded_mean': lambda a, seed: aggregate_lib.norm_bounded_mean(a.max_norm),
    'median': lambda a, seed: aggregate_lib.coordinate_median(),
    'trimmed_mean': lambda a, seed: aggregate_lib.trimmed_mean(a.trim_fraction),
    'krum': lambda a, seed: aggregate_lib.krum(a.num_byzantine),
    'multi_krum': lambda a, seed: aggregate_lib.multi_krum(a.num_byzantine,
                                                           a.multi_krum_m or None),
    'geometric_median': lambda a, seed: aggregate_lib.geometric_median(),
    'secure_mean': lambda a, seed: privacy_lib.secure_agg.secure_mean(
        a.secure_clip_range, seed=seed),
})


# -------------------------------------------------------------- compressors

def _compressor_kwargs(name: str, x, fraction, bits) -> dict:
  if name == 'identity':
    return {}
  kw = dict(min_size=x.min_size)
  if name in ('top_k', 'random_k'):
    kw['fraction_or_k'] = fraction
  elif name == 'threshold':
    kw.update(tau=x.threshold, max_fraction=fraction)
  elif name in ('stochastic_uniform', 'qsgd', 'deterministic'):
    kw.update(bits=bits, block_size=x.block_size or None)
  elif name in ('svd', 'powersgd'):
    kw['rank'] = x.rank
  return kw


COMPRESSORS = Registry('compress.uplink', {
    name: (lambda x, fraction, bits, name=name: compress_lib.get_compressor(
        name, **_compressor_kwargs(name, x, fraction, bits)))
    for name in compress_lib.COMPRESSORS})

QUANTIZERS = Registry('compress.then', {
    name: COMPRESSORS[name] for name in ('stochastic_uniform', 'qsgd', 'deterministic')})


# ------------------------------------------------------------- the rest

PARTITIONS = Registry('data.partition', {
    name: fn for name, fn in partition_lib.PARTITIONERS.items()})

STRATEGIES = Registry('fl.strategy', {name: name for name in engine.STRATEGIES})

SERVER_OPTIMIZERS = Registry('server_optimizer.name', {
    name: (lambda so, name=name: engine.server_optimizer(
        name, so.learning_rate, momentum=so.momentum, b1=so.b1, b2=so.b2, eps=so.eps))
    for name in engine.SERVER_OPTIMIZERS})

CLIENT_OPTIMIZERS = Registry('client_optimizer.name', {
    name: (lambda co, name=name: engine.client_optimizer(
        name, co.learning_rate, momentum=co.momentum, weight_decay=co.weight_decay))
    for name in engine.CLIENT_OPTIMIZERS})

ALL = (MODELS, PEFT_METHODS, LORA_AGGREGATION, AGGREGATORS, COMPRESSORS, QUANTIZERS,
       PARTITIONS, STRATEGIES, SERVER_OPTIMIZERS, CLIENT_OPTIMIZERS)
