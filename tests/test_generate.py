"""Tests for the KV-cached decoder calls and jitted generation."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from fedjax_fm import peft
from fedjax_fm.models.generate import generate
from fedjax_fm.models.generate import make_generate_fn
from fedjax_fm.models.generate import top_p_filter
from fedjax_fm.models.decoder import Decoder, DecoderConfig, KVCache

CFG = DecoderConfig(vocab_size=64, dim=32, num_layers=2, num_heads=4,
                    num_kv_heads=2, mlp_dim=48, max_len=24)
N = 6

# Rows 0 and 1 hold the same 3-token prompt, right- and left-padded.
PROMPT = np.array([[11, 42, 7, 0, 0], [0, 0, 11, 42, 7], [5, 9, 33, 2, 60]])
MASK = np.array([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])


def _model(seed=0):
  return Decoder(CFG, rngs=nnx.Rngs(seed))


def _uncached_greedy(model, prompt, mask, steps):
  """Greedy decoding by full forwards over the growing sequence.

  The sequence lives in a fixed ``[B, P + steps]`` buffer whose not yet
  generated slots are padding (masked out), so one compile serves all steps.
  Positions count real tokens (after the soft prompt's virtual tokens).

  Returns:
    ``(tokens [B, steps], logits [B, steps, V])``.
  """
  prompt_model = getattr(model, 'prompt', None)
  nv = 0 if prompt_model is None else prompt_model.num_virtual_tokens
  b, p = prompt.shape
  graphdef, state = nnx.split(model)

  @jax.jit
  def step_logits(state, seq, m):
    pos = nv + jnp.maximum(jnp.cumsum(m, -1) - 1, 0)
    logits = nnx.merge(graphdef, state)(seq, m, positions=pos)
    last = seq.shape[1] - 1 - jnp.argmax(m[:, ::-1], -1)
    return logits[jnp.arange(b), last]

  seq = jnp.concatenate([jnp.asarray(prompt), jnp.zeros((b, steps), int)], 1)
  m = jnp.concatenate([jnp.asarray(mask), jnp.zeros((b, steps), int)], 1)
  out_tokens, out_logits = [], []
  for t in range(steps):
    step = step_logits(state, seq, m)
    tok = jnp.argmax(step, -1)
    out_tokens.append(np.asarray(tok))
    out_logits.append(np.asarray(step))
    seq = seq.at[:, p + t].set(tok)
    m = m.at[:, p + t].set(1)
  return np.stack(out_tokens, 1), np.stack(out_logits, 1)


def _check_cached_equals_uncached(model, **kwargs):
  out = generate(model, PROMPT, N, prompt_mask=MASK, return_logits=True,
                     **kwargs)
  assert out.ids.shape == (3, N) and out.ids.dtype == jnp.int32
  assert out.logits.shape == (3, N, CFG.vocab_size)
  np.testing.assert_array_equal(np.asarray(out.lengths), N)
  want_tokens, want_logits = _uncached_greedy(model, PROMPT, MASK, N)
  np.testing.assert_array_equal(np.asarray(out.ids), want_tokens)
  np.testing.assert_allclose(np.asarray(out.logits), want_logits, atol=1e-5)
  return out


@pytest.mark.slow
def test_cached_greedy_equals_uncached_and_ignores_padding():
  model = _model()
  out = _check_cached_equals_uncached(model)
  # The right- and left-padded copies of one prompt generate the same.
  np.testing.assert_array_equal(np.asarray(out.ids[0]), np.asarray(out.ids[1]))
  np.testing.assert_allclose(np.asarray(out.logits[0]),
                             np.asarray(out.logits[1]), atol=1e-5)


@pytest.mark.slow
def test_cache_calls_match_full_forward():
  model = _model()
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, ids):
    model = nnx.merge(graphdef, state)
    cache = model.init_cache(1, 8)
    a, cache = model(ids[:, :3], cache=cache)
    b, cache = model(ids[:, 3:], cache=cache)
    return model(ids), a, b, cache

  full, a, b, cache = run(state, jnp.asarray(PROMPT[2:3]))
  assert isinstance(cache, KVCache) and cache.max_length == 8
  assert cache.k.shape == (2, 1, 8, 2, 8)
  assert int(cache.index) == 5
  np.testing.assert_array_equal(np.asarray(cache.mask[0]),
                                [1, 1, 1, 1, 1, 0, 0, 0])
  got = np.concatenate([np.asarray(a), np.asarray(b)], 1)
  np.testing.assert_allclose(got, np.asarray(full), atol=1e-5)
  with pytest.raises(ValueError, match='max_length'):
    model.init_cache(1, CFG.max_len + 1)


def test_top_p_filter():
  logits = jnp.log(jnp.asarray([[0.05, 0.5, 0.15, 0.3]]))
  kept = lambda p: np.isfinite(np.asarray(top_p_filter(logits, p)))[0]
  np.testing.assert_array_equal(kept(1e-6), [0, 1, 0, 0])
  np.testing.assert_array_equal(kept(0.5), [0, 1, 0, 0])
  np.testing.assert_array_equal(kept(0.6), [0, 1, 0, 1])
  np.testing.assert_array_equal(kept(0.81), [0, 1, 1, 1])
  np.testing.assert_array_equal(kept(1.0), [1, 1, 1, 1])


@pytest.mark.slow
def test_sampling_modes():
  model = _model(1)
  greedy = np.asarray(generate(model, PROMPT, N, prompt_mask=MASK,
                               return_logits=True).ids)
  sample = lambda seed, **kw: np.asarray(generate(
      model, PROMPT, N, prompt_mask=MASK, method='sample',
      key=jax.random.key(seed), **kw).ids)
  np.testing.assert_array_equal(sample(0, top_p=1e-6), greedy)
  np.testing.assert_array_equal(sample(0, temperature=1e-6), greedy)
  np.testing.assert_array_equal(sample(0, temperature=0.0), greedy)
  a, b, c = sample(3), sample(3), sample(4)
  np.testing.assert_array_equal(a, b)
  assert (a != c).any()
  assert (a != greedy).any()
  assert a.min() >= 0 and a.max() < CFG.vocab_size


@pytest.mark.slow
def test_eos_stops_and_pads():
  model = _model()
  free = np.asarray(generate(model, PROMPT, N, prompt_mask=MASK,
                             return_logits=True).ids)
  eos = int(free[2, 2])
  out = generate(model, PROMPT, N, prompt_mask=MASK, eos_id=eos,
                     pad_id=63)
  ids, lengths = np.asarray(out.ids), np.asarray(out.lengths)
  for row in range(3):
    hits = np.flatnonzero(free[row] == eos)
    n = hits[0] + 1 if hits.size else N
    assert lengths[row] == n
    np.testing.assert_array_equal(ids[row, :n], free[row, :n])
    np.testing.assert_array_equal(ids[row, n:], 63)
  assert lengths[2] <= 3


@pytest.mark.slow
def test_prompt_and_prefix_tuned_generation():
  model = _model(2)
  peft.apply_prompt_tuning(model, 3, rngs=nnx.Rngs(1))
  peft.apply_prefix_tuning(model, 2, init='random', init_std=0.5,
                           rngs=nnx.Rngs(2))
  _check_cached_equals_uncached(model)


@pytest.mark.slow
def test_make_generate_fn_vmaps_over_clients():
  model = _model(3)
  peft.apply_prompt_tuning(model, 2, init='random', init_std=1.0,
                           rngs=nnx.Rngs(1))
  split = peft.split_model(model, 'prompt')
  other = jax.tree_util.tree_map(lambda x: -x, split.trainable)
  stacked = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]),
                                   split.trainable, other)
  fn = make_generate_fn(split.graphdef, 4)
  out = jax.jit(jax.vmap(fn, in_axes=(0, None, None, None)))(
      stacked, split.frozen, PROMPT, MASK)
  assert out.ids.shape == (2, 3, 4)
  for c, trainable in enumerate([split.trainable, other]):
    want = generate((split.graphdef, trainable, split.frozen), PROMPT, 4,
                        prompt_mask=MASK)
    np.testing.assert_array_equal(np.asarray(out.ids[c]),
                                  np.asarray(want.ids))


def test_errors():
  model = _model()
  cases = [
      (dict(method='beam'), 'method'),
      (dict(method='sample'), 'key'),
      (dict(temperature=-1.0), 'temperature'),
      (dict(top_p=0.0), 'top_p'),
      (dict(eos_id=-2), 'eos_id'),
  ]
  for kwargs, match in cases:
    with pytest.raises(ValueError, match=match):
      generate(model, PROMPT, 3, **kwargs)
  with pytest.raises(ValueError, match='max_new_tokens'):
    generate(model, PROMPT, 0)
  with pytest.raises(ValueError, match='max_len'):
    generate(model, PROMPT, CFG.max_len)
  with pytest.raises(ValueError, match='prompt_mask'):
    generate(model, PROMPT, 3, prompt_mask=MASK[:, :3])
  with pytest.raises(ValueError, match='model must be'):
    generate('not a model', PROMPT, 3)
  with pytest.raises(ValueError, match='KV cache'):
    generate(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), PROMPT, 3)
