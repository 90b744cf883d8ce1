"""Prompt tuning and prefix tuning for the :class:`~fedjax_fm.models.Decoder`.

**Prompt tuning** (Lester, Al-Rfou, Constant 2021, "The Power of Scale for
Parameter-Efficient Prompt Tuning", https://arxiv.org/abs/2104.08691) learns
``V`` soft-prompt embeddings that the decoder prepends to the token
embeddings. :func:`apply_prompt_tuning` installs a :class:`SoftPrompt` in the
decoder's ``prompt`` hook (``Decoder.prompt``, ``None`` by default); the
decoder gives the virtual tokens positions
``0..V-1``, lets every real token attend to them, and returns logits for the
real tokens only, so ``[B, L]`` in gives ``[B, L, vocab]`` out and
``causal_lm_task`` is unchanged.

**Prefix tuning** (Li, Liang 2021, "Prefix-Tuning: Optimizing Continuous
Prompts for Generation", https://arxiv.org/abs/2101.00190) learns, for every
attention layer, ``P`` key and value vectors prepended to that layer's
keys/values (like a fixed ``past_key_values``). :func:`apply_prefix_tuning`
installs a :class:`PrefixKV` in the ``prefix`` hook of every attention layer
(``layers.{i}.attn.prefix``). Prefix keys are
used as given (no RoPE is applied to them: they play the role of cached,
already-rotated keys). An optional reparameterisation MLP
(``reparam_hidden``) computes the prefix from a trainable embedding.

Both store their arrays in ``nnx.Param`` subclasses (:class:`PromptParam`,
:class:`PrefixParam`) that ``peft.split_model(model, 'prompt')`` /
``split_model(model, 'prefix')`` select as the trainable part::

  model = Decoder(cfg, rngs=nnx.Rngs(0))
  apply_prompt_tuning(model, 8, rngs=nnx.Rngs(1))
  split = split_model(model, 'prompt')       # trainable: prompt.embedding
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedjax_fm.models.decoder import Decoder
from fedjax_fm.models.gpt2 import GPT2

__all__ = [
    'PREFIX_INITS',
    'PROMPT_INITS',
    'PrefixKV',
    'PrefixParam',
    'PromptParam',
    'SoftPrompt',
    'apply_prefix_tuning',
    'apply_prompt_tuning',
]

PROMPT_INITS = ('random', 'vocab')
PREFIX_INITS = ('random', 'vocab')


class PromptParam(nnx.Param):
  """Trainable soft-prompt embeddings (prompt tuning)."""


class PrefixParam(nnx.Param):
  """Trainable prefix-tuning variables (key/value prefixes, reparam MLP)."""


class SoftPrompt(nnx.Module):
  """``V`` trainable virtual-token embeddings.

  Attributes:
    embedding: :class:`PromptParam` ``[V, dim]``.
    num_virtual_tokens: ``V``.
  """

  def __init__(self, embedding: jax.Array):
    """Wraps initial embeddings ``[V, dim]`` (``V >= 1``)."""
    embedding = jnp.asarray(embedding)
    if embedding.ndim != 2 or embedding.shape[0] < 1:
      raise ValueError(
          f'embedding must have shape [num_virtual_tokens >= 1, dim], got '
          f'{embedding.shape}'
      )
    self.embedding = PromptParam(embedding)
    self.num_virtual_tokens = int(embedding.shape[0])

  def __call__(self, batch_size: int) -> jax.Array:
    """Returns the prompt broadcast to ``[batch_size, V, dim]``."""
    e = self.embedding[...]
    return jnp.broadcast_to(e[None], (batch_size,) + e.shape)


class PrefixKV(nnx.Module):
  """Trainable key/value prefix of one attention layer.

  Without reparameterisation the prefix is two :class:`PrefixParam` arrays
  ``key``/``value`` of shape ``[P, kv_heads, head_dim]``. With
  ``reparam_hidden=h`` the prefix is computed as::

    e = embedding                             # [P, 2 * kv_heads * head_dim]
    prefix = e + tanh(e @ w1 + b1) @ w2 + b2  # w2, b2 start at zero

  (a residual variant of the Li & Liang MLP reparameterisation, so that the
  initial prefix equals the given initial key/value), then split into key
  and value. All of ``embedding, w1, b1, w2, b2`` are :class:`PrefixParam`.

  Attributes:
    num_virtual_tokens: ``P``.
    num_kv_heads: key/value heads.
    head_dim: head size.
    reparam_hidden: MLP hidden size, or ``None``.
  """

  def __init__(
      self,
      key: jax.Array,
      value: jax.Array,
      *,
      reparam_hidden: int | None = None,
      rngs: nnx.Rngs | None = None,
  ):
    """Creates the prefix.

    Args:
      key: initial keys ``[P, kv_heads, head_dim]``.
      value: initial values, same shape.
      reparam_hidden: hidden size of the reparameterisation MLP (``None`` =
        train the prefix directly).
      rngs: initialises ``w1`` (required with ``reparam_hidden``).
    """
    key, value = jnp.asarray(key), jnp.asarray(value)
    if key.ndim != 3 or key.shape != value.shape or key.shape[0] < 1:
      raise ValueError(
          'key and value must both have shape [num_virtual_tokens >= 1, '
          f'kv_heads, head_dim], got {key.shape} and {value.shape}'
      )
    p, kv, hd = key.shape
    self.num_virtual_tokens = int(p)
    self.num_kv_heads = int(kv)
    self.head_dim = int(hd)
    self.reparam_hidden = _check_reparam(reparam_hidden)
    if self.reparam_hidden is None:
      self.key = PrefixParam(key)
      self.value = PrefixParam(value)
    else:
      if rngs is None:
        raise ValueError('rngs is required with reparam_hidden')
      h, width = self.reparam_hidden, 2 * kv * hd
      dtype = key.dtype
      self.embedding = PrefixParam(
          jnp.concatenate([key.reshape(p, -1), value.reshape(p, -1)], -1)
      )
      self.w1 = PrefixParam(
          nnx.initializers.lecun_normal()(rngs.params(), (width, h), dtype)
      )
      self.b1 = PrefixParam(jnp.zeros((h,), dtype))
      self.w2 = PrefixParam(jnp.zeros((h, width), dtype))
      self.b2 = PrefixParam(jnp.zeros((width,), dtype))

  def prefix(self) -> tuple[jax.Array, jax.Array]:
    """Returns ``(key, value)``, each ``[P, kv_heads, head_dim]``."""
    if self.reparam_hidden is None:
      return self.key[...], self.value[...]
    e = self.embedding[...]
    out = e + jnp.tanh(e @ self.w1[...] + self.b1[...]) @ self.w2[...]
    out = out + self.b2[...]
    shape = (self.num_virtual_tokens, self.num_kv_heads, self.head_dim)
    k, v = jnp.split(out, 2, axis=-1)
    return k.reshape(shape), v.reshape(shape)

  def __call__(self, batch_size: int) -> tuple[jax.Array, jax.Array]:
    """Returns ``(key, value)`` broadcast to ``[B, P, kv_heads, head_dim]``."""
    k, v = self.prefix()
    expand = lambda x: jnp.broadcast_to(x[None], (batch_size,) + x.shape)
    return expand(k), expand(v)


def _check_reparam(reparam_hidden):
  if reparam_hidden is None:
    return None
  if (isinstance(reparam_hidden, bool) or
      not isinstance(reparam_hidden, (int, np.integer)) or reparam_hidden < 1):
    raise ValueError(
        f'reparam_hidden must be None or an int >= 1, got {reparam_hidden!r}'
    )
  return int(reparam_hidden)


def _check_common(num_virtual_tokens, init, inits, init_std):
  if (isinstance(num_virtual_tokens, bool) or
      not isinstance(num_virtual_tokens, (int, np.integer)) or
      num_virtual_tokens < 1):
    raise ValueError(
        f'num_virtual_tokens must be an int >= 1, got {num_virtual_tokens!r}'
    )
  if init not in inits:
    raise ValueError(f'init must be one of {inits}, got {init!r}')
  if not init_std > 0:
    raise ValueError(f'init_std must be > 0, got {init_std!r}')


def _init_token_ids(model, n, token_ids, rngs):
  """``n`` token ids: ``token_ids`` tiled/truncated, or uniform samples."""
  vocab = model.config.vocab_size
  if token_ids is None:
    if rngs is None:
      raise ValueError("rngs is required for init='vocab' without token_ids")
    return jax.random.randint(rngs.params(), (n,), 0, vocab)
  ids = np.asarray(token_ids).reshape(-1)
  if ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f'token_ids must be non-empty ints, got {token_ids!r}')
  if ids.min() < 0 or ids.max() >= vocab:
    raise ValueError(
        f'token_ids must lie in [0, vocab_size={vocab}), got min {ids.min()}, '
        f'max {ids.max()}'
    )
  return jnp.asarray(np.resize(ids, n), jnp.int32)


def _check_decoder(model, what):
  if not isinstance(model, (Decoder, GPT2)):
    raise ValueError(
        f'{what} needs a fedjax_fm.models.Decoder or GPT2 (whose prompt/prefix '
        f'hooks it sets), got {type(model).__name__}'
    )


def apply_prompt_tuning(
    model: nnx.Module,
    num_virtual_tokens: int,
    *,
    init: str = 'vocab',
    token_ids: Sequence[int] | None = None,
    init_std: float = 0.02,
    rngs: nnx.Rngs | None = None,
) -> SoftPrompt:
  """Adds a trainable soft prompt to a decoder, in place.

  Args:
    model: a :class:`~fedjax_fm.models.Decoder` without a soft prompt.
    num_virtual_tokens: ``V >= 1``; ``V + L`` must fit the model's
      ``max_len``.
    init: ``'vocab'`` (copy the embeddings of ``token_ids``, or of ``V``
      uniformly sampled vocabulary tokens, as in Lester et al.) or
      ``'random'`` (normal with standard deviation ``init_std``).
    token_ids: for ``'vocab'``: tokens whose embeddings initialise the
      prompt (tiled/truncated to ``V``), e.g. a tokenized task description.
    init_std: standard deviation of the ``'random'`` init.
    rngs: source of the ``params`` stream for sampling.

  Returns:
    The new :class:`SoftPrompt` (``model.prompt``).

  Raises:
    ValueError: on bad arguments, a non-decoder model, or if the model
      already has a soft prompt.
  """
  _check_common(num_virtual_tokens, init, PROMPT_INITS, init_std)
  _check_decoder(model, 'apply_prompt_tuning')
  if model.prompt is not None:
    raise ValueError('the model already has a soft prompt (model.prompt)')
  table = model.embed.embedding[...]
  n, dim = int(num_virtual_tokens), table.shape[1]
  if init == 'vocab':
    emb = table[_init_token_ids(model, n, token_ids, rngs)]
  else:
    if rngs is None:
      raise ValueError("rngs is required for init='random'")
    emb = init_std * jax.random.normal(rngs.params(), (n, dim), table.dtype)
  prompt = SoftPrompt(emb.astype(table.dtype))
  model.prompt = prompt
  return prompt


def apply_prefix_tuning(
    model: nnx.Module,
    num_virtual_tokens: int,
    *,
    init: str = 'vocab',
    token_ids: Sequence[int] | None = None,
    init_std: float = 0.02,
    reparam_hidden: int | None = None,
    rngs: nnx.Rngs | None = None,
) -> list[str]:
  """Adds a trainable key/value prefix to every attention layer, in place.

  Args:
    model: a :class:`~fedjax_fm.models.Decoder` without prefixes.
    num_virtual_tokens: prefix length ``P >= 1`` (per layer).
    init: ``'vocab'``: the prefix of layer ``i`` is the layer-``i`` keys and
      values that the model itself computes for ``token_ids`` (or ``P``
      uniformly sampled tokens) at positions ``0..P-1`` (after the soft
      prompt's, if any) -- i.e. the model's ``past_key_values`` for real text
      (Li & Liang's activation init);
      ``'random'``: normal with standard deviation ``init_std``.
    token_ids: for ``'vocab'``: the tokens (tiled/truncated to ``P``).
    init_std: standard deviation of the ``'random'`` init.
    reparam_hidden: optional hidden size of the reparameterisation MLP (see
      :class:`PrefixKV`).
    rngs: source of the ``params`` stream.

  Returns:
    The dotted paths of the added prefixes (``layers.{i}.attn.prefix``).

  Raises:
    ValueError: on bad arguments, a non-decoder model, or if the model
      already has prefixes.
  """
  _check_common(num_virtual_tokens, init, PREFIX_INITS, init_std)
  _check_reparam(reparam_hidden)
  _check_decoder(model, 'apply_prefix_tuning')
  attns = [layer.attn for layer in model.layers]
  if any(a.prefix is not None for a in attns):
    raise ValueError('the model already has prefixes (layers[i].attn.prefix)')
  n = int(num_virtual_tokens)
  cfg = model.config
  dtype = cfg.param_dtype
  if init == 'vocab':
    ids = _init_token_ids(model, n, token_ids, rngs)
    nv = model.num_virtual_tokens
    if nv + n > cfg.max_len:
      raise ValueError(
          f"init='vocab' needs num_virtual_tokens ({n}) + soft prompt ({nv}) "
          f'<= max_len ({cfg.max_len})'
      )
    graphdef, state = nnx.split(model)

    @jax.jit
    def past_key_values(state, ids):
      m = nnx.merge(graphdef, state)
      cache = m.init_cache(1, nv + n, dtype=jnp.float32)
      _, cache = m(ids[None], cache=cache)
      return cache.k[:, 0, nv:], cache.v[:, 0, nv:]

    keys, values = past_key_values(state, ids)
    keys, values = keys.astype(dtype), values.astype(dtype)
  else:
    if rngs is None:
      raise ValueError("rngs is required for init='random'")
    shape = (len(attns), n, cfg.num_kv_heads, cfg.head_dim)
    keys = init_std * jax.random.normal(rngs.params(), shape, dtype)
    values = init_std * jax.random.normal(rngs.params(), shape, dtype)
  paths = []
  for i, attn in enumerate(attns):
    attn.prefix = PrefixKV(
        keys[i], values[i], reparam_hidden=reparam_hidden, rngs=rngs
    )
    paths.append(f'layers.{i}.attn.prefix')
  return paths
