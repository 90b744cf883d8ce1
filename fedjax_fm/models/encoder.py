"""A BERT-style encoder with a sequence-classification head (Flax NNX).

Post-norm BERT blocks with biases, exact (erf) GELU and absolute position
embeddings, compatible with HF ``BertModel`` checkpoints (see
the top-level ``hf`` package). Parameter paths::

  embeddings.{word,position,token_type}.embedding
  embeddings.norm.{scale,bias}
  layers.{i}.{query,key,value,attn_out,intermediate,output}.{kernel,bias}
  layers.{i}.{attn_norm,out_norm}.{scale,bias}
  classifier.{kernel,bias}
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from fedjax_fm.models.layers import activation
from fedjax_fm.models.layers import dropout
from fedjax_fm.models.layers import embed
from fedjax_fm.models.layers import layer_norm
from fedjax_fm.models.layers import linear
from fedjax_fm.models.layers import linear_apply
from fedjax_fm.models.scan import check_scan_fields
from fedjax_fm.models.scan import scan_layers

__all__ = [
    'EncoderConfig',
    'Encoder',
    'EncoderLayer',
    'Embeddings',
    'mean_pool',
]

POOLINGS = ('mean', 'cls')
ACTIVATIONS = ('gelu', 'gelu_new', 'relu')


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """Configuration of :class:`Encoder`.

  Attributes:
    vocab_size: vocabulary size.
    hidden_size: model width.
    num_layers: number of transformer layers.
    num_heads: attention heads; must divide hidden_size.
    intermediate_size: MLP hidden size.
    max_position: number of absolute position embeddings.
    type_vocab_size: number of token types (segments).
    layer_norm_eps: LayerNorm epsilon.
    num_labels: classifier outputs.
    pooling: ``'mean'`` (masked mean over tokens) or ``'cls'`` (first token)
      for the classification head.
    hidden_act: ``'gelu'`` (exact erf GELU as HF BERT), ``'gelu_new'``
      (tanh approximation) or ``'relu'``.
    dropout: dropout on the pooled representation before the classifier
      (only active with call-time rngs).
    dtype: compute dtype.
    param_dtype: parameter dtype.
    scan_layers: run the layers as one ``lax.scan`` over the stacked layers
      when they share one structure; ``False``: a Python loop. Same numbers
      either way.
    remat: rematerialisation of each layer in the backward pass, one of
      :data:`~fedjax_fm.models.scan.REMAT_POLICIES`.
  """

  vocab_size: int = 30522
  hidden_size: int = 384
  num_layers: int = 6
  num_heads: int = 12
  intermediate_size: int = 1536
  max_position: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  num_labels: int = 2
  pooling: str = 'mean'
  hidden_act: str = 'gelu'
  dropout: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  scan_layers: bool = False
  remat: str = 'none'

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  def validate(self) -> 'EncoderConfig':
    """Raises ValueError on an inconsistent config; returns self."""
    for name in ('vocab_size', 'hidden_size', 'num_layers', 'num_heads',
                 'intermediate_size', 'max_position', 'type_vocab_size',
                 'num_labels'):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f'{name} must be a positive int, got {value!r}')
    if self.hidden_size % self.num_heads:
      raise ValueError(
          f'hidden_size ({self.hidden_size}) must be divisible by num_heads '
          f'({self.num_heads})'
      )
    if self.pooling not in POOLINGS:
      raise ValueError(
          f'pooling must be one of {POOLINGS}, got {self.pooling!r}'
      )
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(
          f'hidden_act must be one of {ACTIVATIONS}, got {self.hidden_act!r}'
      )
    if self.layer_norm_eps <= 0:
      raise ValueError(
          f'layer_norm_eps must be > 0, got {self.layer_norm_eps}'
      )
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f'dropout must be in [0, 1), got {self.dropout}')
    check_scan_fields(self)
    return self


def _linear(cfg: EncoderConfig, din: int, dout: int, rngs: nnx.Rngs):
  return linear(din, dout, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                rngs=rngs)


def _layer_norm(cfg: EncoderConfig, rngs: nnx.Rngs):
  return layer_norm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=cfg.dtype,
                    param_dtype=cfg.param_dtype, rngs=rngs)


def mean_pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
  """Masked mean over the sequence axis (sentence-transformers style).

  Args:
    hidden: ``[B, L, H]``.
    attention_mask: ``[B, L]`` with 1 for real tokens.

  Returns:
    ``[B, H]``; rows with no real tokens give zeros.
  """
  m = attention_mask.astype(hidden.dtype)[..., None]
  return (hidden * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)


class Embeddings(nnx.Module):
  """Word + position + token-type embeddings followed by LayerNorm."""

  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
    emb = lambda n: embed(
        n, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        rngs=rngs,
    )
    self.word = emb(cfg.vocab_size)
    self.position = emb(cfg.max_position)
    self.token_type = emb(cfg.type_vocab_size)
    self.norm = _layer_norm(cfg, rngs)

  def __call__(self, input_ids, token_type_ids):
    positions = jnp.arange(input_ids.shape[1])[None]
    x = (self.word(input_ids) + self.position(positions)
         + self.token_type(token_type_ids))
    return self.norm(x)


class EncoderLayer(nnx.Module):
  """A post-norm BERT layer (self-attention + GELU MLP)."""

  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
    h = cfg.hidden_size
    self.num_heads = cfg.num_heads
    self.head_dim = cfg.head_dim
    self.hidden_act = cfg.hidden_act
    self.query = _linear(cfg, h, h, rngs)
    self.key = _linear(cfg, h, h, rngs)
    self.value = _linear(cfg, h, h, rngs)
    self.attn_out = _linear(cfg, h, h, rngs)
    self.attn_norm = _layer_norm(cfg, rngs)
    self.intermediate = _linear(cfg, h, cfg.intermediate_size, rngs)
    self.output = _linear(cfg, cfg.intermediate_size, h, rngs)
    self.out_norm = _layer_norm(cfg, rngs)

  def __call__(self, x, attention_mask, *, rngs: nnx.Rngs | None = None):
    """``x``: ``[B, L, H]``; ``attention_mask``: ``[B, L]`` (1 = real)."""
    b, l, hidden = x.shape
    nh, hd = self.num_heads, self.head_dim
    split = lambda t: t.reshape(b, l, nh, hd)
    q = split(linear_apply(self.query, x, rngs))
    k = split(linear_apply(self.key, x, rngs))
    v = split(linear_apply(self.value, x, rngs))
    scores = jnp.einsum(
        'bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32
    ) / jnp.sqrt(jnp.float32(hd))
    key_mask = attention_mask.astype(bool)[:, None, None, :]
    scores = jnp.where(key_mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    ctx = jnp.einsum('bhqk,bkhd->bqhd', probs, v).reshape(b, l, hidden)
    x = self.attn_norm(x + linear_apply(self.attn_out, ctx, rngs))
    h = activation(self.hidden_act)(
        linear_apply(self.intermediate, x, rngs))
    return self.out_norm(x + linear_apply(self.output, h, rngs))


class Encoder(nnx.Module):
  """BERT encoder with a linear classification head on the pooled output.

  Attributes:
    embeddings: :class:`Embeddings`.
    layers: ``nnx.List`` of :class:`EncoderLayer`.
    classifier: ``nnx.Linear(hidden_size, num_labels)``.
  """

  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
    cfg.validate()
    self.config = cfg
    self.embeddings = Embeddings(cfg, rngs=rngs)
    self.layers = nnx.List(
        [EncoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)]
    )
    self.classifier = _linear(cfg, cfg.hidden_size, cfg.num_labels, rngs)

  def encode(
      self,
      input_ids: jax.Array,
      attention_mask: jax.Array | None = None,
      token_type_ids: jax.Array | None = None,
      *,
      rngs: nnx.Rngs | None = None,
  ) -> jax.Array:
    """Returns the last hidden states ``[B, L, hidden_size]``.

    Args:
      input_ids: ``[B, L]`` int token ids, ``L <= max_position``.
      attention_mask: ``[B, L]`` (1 = real token); default all ones.
      token_type_ids: ``[B, L]`` segment ids; default zeros.
      rngs: call-time rngs (LoRA dropout); ``None`` = deterministic. Each
        layer draws from its own key (one draw of the ``dropout`` stream,
        split per layer).
    """
    l = input_ids.shape[1]
    if l > self.config.max_position:
      raise ValueError(
          f'sequence length {l} exceeds max_position='
          f'{self.config.max_position}'
      )
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    x = self.embeddings(input_ids, token_type_ids)
    cfg = self.config
    return scan_layers(
        self.layers, lambda layer, h, _, r: layer(h, attention_mask, rngs=r),
        x, scan=cfg.scan_layers, remat=cfg.remat, rngs=rngs,
    )

  def pool(self, hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Pools ``[B, L, H] -> [B, H]`` according to ``config.pooling``."""
    if self.config.pooling == 'cls':
      return hidden[:, 0]
    return mean_pool(hidden, attention_mask)

  def embed_sentences(
      self,
      input_ids: jax.Array,
      attention_mask: jax.Array | None = None,
      token_type_ids: jax.Array | None = None,
      *,
      normalize: bool = False,
      rngs: nnx.Rngs | None = None,
  ) -> jax.Array:
    """Sentence embeddings: masked mean of the last hidden states.

    Args:
      input_ids: ``[B, L]`` token ids.
      attention_mask: ``[B, L]`` (1 = real token); default all ones.
      token_type_ids: optional segment ids.
      normalize: L2-normalise the embeddings (as sentence-transformers'
        ``Normalize`` module).
      rngs: call-time rngs; ``None`` = deterministic.

    Returns:
      float32 ``[B, hidden_size]``.
    """
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    hidden = self.encode(input_ids, attention_mask, token_type_ids, rngs=rngs)
    emb = mean_pool(hidden.astype(jnp.float32), attention_mask)
    if normalize:
      emb = emb / jnp.maximum(
          jnp.linalg.norm(emb, axis=-1, keepdims=True), 1e-12
      )
    return emb

  def __call__(
      self,
      input_ids: jax.Array,
      attention_mask: jax.Array | None = None,
      token_type_ids: jax.Array | None = None,
      *,
      rngs: nnx.Rngs | None = None,
  ) -> jax.Array:
    """Classification logits ``[B, num_labels]`` (float32).

    Dropout (``config.dropout``) is applied to the pooled representation only
    when ``rngs`` is given.
    """
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    hidden = self.encode(input_ids, attention_mask, token_type_ids, rngs=rngs)
    pooled = self.pool(hidden, attention_mask)
    pooled = dropout(pooled, self.config.dropout, rngs)
    return linear_apply(self.classifier, pooled, rngs).astype(jnp.float32)
