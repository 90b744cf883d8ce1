"""Jitted autoregressive generation with a KV cache.

Works for every causal LM family with the cache contract of
:class:`~fedjax_fm.models.Decoder` and :class:`~fedjax_fm.models.GPT2`:
``config.max_len``, ``num_virtual_tokens``, ``init_cache(batch_size,
max_length)`` and ``model(ids, mask, cache=cache) -> (logits, cache)``.

One call is one compiled program: the prompt fills a preallocated
:class:`~fedjax_fm.models.decoder.KVCache` (``[layers, B, S, kv_heads,
head_dim]``) in a single forward pass, then a ``lax.while_loop`` of
single-token steps writes one slot per step, until ``max_new_tokens`` tokens
or until every row has emitted ``eos_id``::

  out = generate(model, prompt_ids, 16, prompt_mask=mask, method='sample',
                 temperature=0.7, top_p=0.9, key=jax.random.key(0), eos_id=2)
  out.ids      # [B, 16] int32, pad_id after each row's EOS
  out.lengths  # [B] tokens generated per row, EOS included

Prompts may be left- or right-padded (``prompt_mask``): padding slots are
never attended to and positions (RoPE, or GPT-2's learned positions) count
real tokens only, so a padded prompt generates what the unpadded prompt
would. A soft prompt (prompt tuning) and key/value prefixes (prefix tuning)
are used automatically.

:func:`make_generate_fn` gives the same computation as a pure function of
``(trainable, frozen, ...)`` pure dicts (the engine's form), e.g. to
``jax.vmap`` generation over clients.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = [
    'GENERATE_METHODS',
    'Generation',
    'generate',
    'make_generate_fn',
    'select_tokens',
    'top_p_filter',
]

GENERATE_METHODS = ('greedy', 'sample')


class Generation(NamedTuple):
  """Output of :func:`generate`.

  Attributes:
    ids: int32 ``[B, max_new_tokens]`` generated tokens; after a row's EOS
      (and after an early stop) the row holds ``pad_id``.
    lengths: int32 ``[B]`` number of generated tokens per row, EOS included
      (``max_new_tokens`` for rows that never emit EOS).
    logits: with ``return_logits=True``, float32 ``[B, max_new_tokens,
      vocab]`` raw logits each token was chosen from (meaningful for the
      first ``lengths`` steps); else ``None``.
  """

  ids: jax.Array
  lengths: jax.Array
  logits: jax.Array | None = None


def top_p_filter(logits: jax.Array, top_p: float | jax.Array) -> jax.Array:
  """Nucleus filter: keeps the smallest top set with probability >= top_p.

  Tokens are sorted by probability; a token is kept if the probability mass
  of the tokens ranked above it is ``< top_p`` (so the most likely token is
  always kept, and ``top_p >= 1`` keeps everything). Tokens tied with the
  least likely kept token are kept too.

  Args:
    logits: ``[..., V]`` float logits.
    top_p: nucleus mass in ``(0, 1]`` (may be traced).

  Returns:
    ``logits`` with the filtered-out entries set to ``-inf``.
  """
  logits = logits.astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)
  sorted_probs = -jnp.sort(-probs, axis=-1)
  mass_above = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
  keep_sorted = mass_above < top_p
  num_kept = jnp.maximum(jnp.sum(keep_sorted, axis=-1, keepdims=True), 1)
  threshold = jnp.take_along_axis(sorted_probs, num_kept - 1, axis=-1)
  keep = (probs >= threshold) | (top_p >= 1.0)
  return jnp.where(keep, logits, -jnp.inf)


def select_tokens(
    logits: jax.Array,
    key: jax.Array | None,
    *,
    method: str = 'greedy',
    temperature: float | jax.Array = 1.0,
    top_p: float | jax.Array = 1.0,
) -> jax.Array:
  """Chooses one token per row of ``logits [B, V]``.

  Args:
    logits: ``[B, V]`` logits.
    key: PRNG key (``'sample'`` only).
    method: ``'greedy'`` (argmax) or ``'sample'``.
    temperature: ``'sample'``: logits are divided by it; ``0`` means greedy.
    top_p: ``'sample'``: nucleus mass (see :func:`top_p_filter`).

  Returns:
    int32 ``[B]`` token ids.
  """
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if method == 'greedy':
    return greedy
  if method != 'sample':
    raise ValueError(f'method must be one of {GENERATE_METHODS}, got '
                     f'{method!r}')
  temperature = jnp.asarray(temperature, jnp.float32)
  scaled = logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
  sampled = jax.random.categorical(key, top_p_filter(scaled, top_p), axis=-1)
  return jnp.where(temperature > 0, sampled.astype(jnp.int32), greedy)


def _decode_loop(
    model: nnx.Module,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    key: jax.Array,
    temperature: jax.Array,
    top_p: jax.Array,
    *,
    max_new_tokens: int,
    method: str,
    eos_id: int | None,
    pad_id: int,
    return_logits: bool,
) -> Generation:
  """The traceable generation: prefill, then a while_loop of steps."""
  if not all(hasattr(model, a) for a in ('init_cache', 'num_virtual_tokens',
                                          'config')):
    raise ValueError(
        'model must be a causal LM with a KV cache (init_cache, '
        f'num_virtual_tokens, config.max_len), e.g. a Decoder or GPT2; got '
        f'{type(model).__name__}'
    )
  cfg = model.config
  b, p = prompt_ids.shape
  nv = model.num_virtual_tokens
  # The last generated token is never fed back, so it needs no slot.
  length = nv + p + max_new_tokens - 1
  if length > cfg.max_len:
    raise ValueError(
        f'prompt length ({p}) + max_new_tokens ({max_new_tokens}) - 1'
        + (f' + {nv} virtual tokens' if nv else '')
        + f' = {length} exceeds the model max_len ({cfg.max_len})'
    )
  prompt_mask = prompt_mask.astype(bool)
  cache = model.init_cache(b, length)
  logits, cache = model(prompt_ids, prompt_mask, cache=cache)
  # Next-token logits sit at the last real prompt token of each row.
  last = p - 1 - jnp.argmax(prompt_mask[:, ::-1], axis=-1)
  logits = logits[jnp.arange(b), last]

  choose = lambda lg, t: select_tokens(
      lg, jax.random.fold_in(key, t), method=method,
      temperature=temperature, top_p=top_p,
  )

  def finish(tok, done, lengths, t):
    tok = jnp.where(done, pad_id, tok).astype(jnp.int32)
    if eos_id is not None:
      hit = (tok == eos_id) & ~done
      lengths = jnp.where(hit, t + 1, lengths)
      done = done | hit
    return tok, done, lengths

  ids = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
  lengths = jnp.full((b,), max_new_tokens, jnp.int32)
  done = jnp.zeros((b,), bool)
  buf = None
  if return_logits:
    buf = jnp.zeros((b, max_new_tokens, logits.shape[-1]), jnp.float32)
    buf = buf.at[:, 0].set(logits)
  tok, done, lengths = finish(choose(logits, 0), done, lengths, 0)
  ids = ids.at[:, 0].set(tok)

  def cond(carry):
    t, _, _, done, *_ = carry
    return (t < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    t, cache, tok, done, ids, lengths, buf = carry
    logits, cache = model(tok[:, None], cache=cache)
    logits = logits[:, 0]
    tok, done, lengths = finish(choose(logits, t), done, lengths, t)
    ids = jax.lax.dynamic_update_slice(ids, tok[:, None], (0, t))
    if buf is not None:
      buf = jax.lax.dynamic_update_slice(buf, logits[:, None], (0, t, 0))
    return t + 1, cache, tok, done, ids, lengths, buf

  carry = (jnp.asarray(1, jnp.int32), cache, tok, done, ids, lengths, buf)
  _, _, _, _, ids, lengths, buf = jax.lax.while_loop(cond, body, carry)
  return Generation(ids, lengths, buf)


def _check_options(max_new_tokens, method, temperature, top_p, key, eos_id,
                   pad_id):
  if (isinstance(max_new_tokens, bool) or
      not isinstance(max_new_tokens, (int, np.integer)) or
      max_new_tokens < 1):
    raise ValueError(
        f'max_new_tokens must be an int >= 1, got {max_new_tokens!r}'
    )
  if method not in GENERATE_METHODS:
    raise ValueError(
        f'method must be one of {GENERATE_METHODS}, got {method!r}'
    )
  if temperature is not None and not isinstance(temperature, jax.Array):
    if not float(temperature) >= 0:
      raise ValueError(f'temperature must be >= 0, got {temperature!r}')
  if top_p is not None and not isinstance(top_p, jax.Array):
    if not 0 < float(top_p) <= 1:
      raise ValueError(f'top_p must be in (0, 1], got {top_p!r}')
  if method == 'sample' and key is None:
    raise ValueError("method='sample' needs a PRNG key (key=...)")
  for name, value in (('eos_id', eos_id), ('pad_id', pad_id)):
    if value is None and name == 'eos_id':
      continue
    if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
        or value < 0):
      raise ValueError(f'{name} must be an int >= 0, got {value!r}')


def _prompt_arrays(prompt_ids, prompt_mask):
  prompt_ids = jnp.asarray(prompt_ids)
  if prompt_ids.ndim != 2 or prompt_ids.shape[1] < 1:
    raise ValueError(
        f'prompt_ids must have shape [B, P] with P >= 1, got '
        f'{prompt_ids.shape}'
    )
  if not jnp.issubdtype(prompt_ids.dtype, jnp.integer):
    raise ValueError(f'prompt_ids must hold ints, got {prompt_ids.dtype}')
  if prompt_mask is None:
    prompt_mask = jnp.ones(prompt_ids.shape, bool)
  prompt_mask = jnp.asarray(prompt_mask)
  if prompt_mask.shape != prompt_ids.shape:
    raise ValueError(
        f'prompt_mask shape {prompt_mask.shape} must equal prompt_ids shape '
        f'{prompt_ids.shape}'
    )
  return prompt_ids.astype(jnp.int32), prompt_mask.astype(bool)


def make_generate_fn(
    graphdef: Any,
    max_new_tokens: int,
    *,
    method: str = 'greedy',
    eos_id: int | None = None,
    pad_id: int = 0,
    return_logits: bool = False,
) -> Callable[..., Generation]:
  """Builds a pure generation function of pure-dict model state.

  Args:
    graphdef: an ``nnx.GraphDef`` of a causal LM (``Decoder``, ``GPT2``) or
      a ``peft.Split``.
    max_new_tokens: number of tokens to generate (static).
    method: ``'greedy'`` or ``'sample'``.
    eos_id: optional end-of-sequence id; rows stop after emitting it.
    pad_id: id written after EOS.
    return_logits: also return the per-step logits.

  Returns:
    ``fn(trainable, frozen, prompt_ids, prompt_mask=None, key=None,
    temperature=1.0, top_p=1.0) -> Generation``: traceable (jit it, or vmap
    it over clients); see :func:`generate` for the arguments.
  """
  _check_options(max_new_tokens, method, None, None, 0, eos_id, pad_id)
  graphdef = getattr(graphdef, 'graphdef', graphdef)

  def generate_fn(trainable, frozen, prompt_ids, prompt_mask=None, key=None,
                  temperature=1.0, top_p=1.0):
    if method == 'sample' and key is None:
      raise ValueError("method='sample' needs a PRNG key (key=...)")
    ids, mask = _prompt_arrays(prompt_ids, prompt_mask)
    model = nnx.merge(graphdef, trainable, frozen)
    return _decode_loop(
        model, ids, mask, jax.random.key(0) if key is None else key,
        jnp.asarray(temperature, jnp.float32), jnp.asarray(top_p, jnp.float32),
        max_new_tokens=int(max_new_tokens), method=method, eos_id=eos_id,
        pad_id=int(pad_id), return_logits=bool(return_logits),
    )

  return generate_fn


def _generate_impl(states, prompt_ids, prompt_mask, key, temperature, top_p,
                   *, graphdef, **options):
  model = nnx.merge(graphdef, *states)
  return _decode_loop(model, prompt_ids, prompt_mask, key, temperature, top_p,
                      **options)


_generate_jit = jax.jit(
    _generate_impl,
    static_argnames=('graphdef', 'max_new_tokens', 'method', 'eos_id',
                     'pad_id', 'return_logits'),
)


def _unpack_model(model: Any) -> tuple[Any, tuple[Any, ...]]:
  if isinstance(model, nnx.Module):
    graphdef, state = nnx.split(model)
    return graphdef, (state,)
  if all(hasattr(model, a) for a in ('graphdef', 'trainable', 'frozen')):
    return model.graphdef, (model.trainable, model.frozen)
  if isinstance(model, (tuple, list)) and len(model) == 3:
    return model[0], (model[1], model[2])
  raise ValueError(
      'model must be an nnx.Module (a Decoder or GPT2), a peft.Split, or a '
      f'(graphdef, trainable, frozen) tuple, got {type(model).__name__}'
  )


def generate(
    model: Any,
    prompt_ids: jax.Array,
    max_new_tokens: int,
    *,
    prompt_mask: jax.Array | None = None,
    method: str = 'greedy',
    temperature: float = 1.0,
    top_p: float = 1.0,
    key: jax.Array | None = None,
    eos_id: int | None = None,
    pad_id: int = 0,
    return_logits: bool = False,
) -> Generation:
  """Generates ``max_new_tokens`` tokens per prompt in one jitted program.

  Args:
    model: a causal LM (:class:`~fedjax_fm.models.Decoder`,
      :class:`~fedjax_fm.models.GPT2`), a ``peft.Split`` of one, or a
      ``(graphdef, trainable, frozen)`` tuple of pure dicts.
    prompt_ids: int ``[B, P]`` prompts, left- or right-padded; every row
      needs at least one real token.
    max_new_tokens: number of tokens to generate (static; a new value
      compiles anew). ``P + max_new_tokens - 1`` (+ soft-prompt tokens) must
      not exceed the model's ``max_len`` (GPT-2: ``n_positions``).
    prompt_mask: optional ``[B, P]`` (1 = real prompt token, 0 = padding);
      default all real.
    method: ``'greedy'`` (argmax) or ``'sample'`` (temperature + nucleus).
    temperature: ``'sample'`` only: logits are divided by it, ``>= 0``;
      ``0`` is greedy.
    top_p: ``'sample'`` only: nucleus mass in ``(0, 1]`` (see
      :func:`top_p_filter`).
    key: PRNG key, required for ``'sample'``; step ``t`` uses
      ``fold_in(key, t)``.
    eos_id: optional end-of-sequence id: a row stops after emitting it
      (later tokens are ``pad_id``); the loop exits when every row stopped.
    pad_id: id written after EOS.
    return_logits: also return the logits of every step.

  Returns:
    A :class:`Generation` ``(ids, lengths, logits)``.

  Raises:
    ValueError: on bad arguments.
  """
  _check_options(max_new_tokens, method, temperature, top_p, key, eos_id,
                 pad_id)
  graphdef, states = _unpack_model(model)
  ids, mask = _prompt_arrays(prompt_ids, prompt_mask)
  return _generate_jit(
      states, ids, mask, jax.random.key(0) if key is None else key,
      jnp.asarray(temperature, jnp.float32), jnp.asarray(top_p, jnp.float32),
      graphdef=graphdef, max_new_tokens=int(max_new_tokens), method=method,
      eos_id=None if eos_id is None else int(eos_id), pad_id=int(pad_id),
      return_logits=bool(return_logits),
  )
