"""Tests for the KV-cached GPT-2 calls and generation with GPT-2."""

import dataclasses

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from fedjax_fm import hf
from fedjax_fm import peft
from fedjax_fm.models.decoder import KVCache
from fedjax_fm.models.generate import generate
from fedjax_fm.models.generate import make_generate_fn
from fedjax_fm.models.gpt2 import GPT2
from fedjax_fm.models.gpt2 import GPT2Config
from fedjax_fm.peft.prompt import PrefixKV
from fedjax_fm.peft.prompt import SoftPrompt

CFG = GPT2Config(vocab_size=64, dim=32, num_layers=2, num_heads=4,
                 mlp_dim=64, max_len=24)
N = 6

# Rows 0 and 1 hold the same 3-token prompt, right- and left-padded.
PROMPT = np.array([[11, 42, 7, 0, 0], [0, 0, 11, 42, 7], [5, 9, 33, 2, 60]])
MASK = np.array([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])


def _perturb(model, seed):
  """Non-trivial weights: O(1) logits, non-zero biases, LayerNorm scales != 1.

  (The default 0.02-std init gives nearly uniform logits, hence near-ties.)
  """
  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  new = []
  for key, (path, x) in zip(keys, leaves):
    noise = jax.random.normal(key, x.shape, x.dtype)
    is_scale = str(getattr(path[-1], 'key', path[-1])) == 'scale'
    new.append(1.0 + 0.1 * noise if is_scale else 0.3 * noise)
  nnx.update(model, jax.tree_util.tree_unflatten(treedef, new))
  return model


def _model(seed=0, cfg=CFG):
  return _perturb(GPT2(cfg, rngs=nnx.Rngs(seed)), seed)


def _forward(model, ids, mask=None, positions=None):
  """Jitted ``model(ids, mask, positions=...)`` (one compile, no eager ops)."""
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda s, i, m, p: nnx.merge(graphdef, s)(i, m, positions=p))
  return np.asarray(fn(state, jnp.asarray(ids), mask, positions))


def _uncached_greedy(model, prompt, mask, steps):
  """Greedy decoding by full (uncached) forwards over the growing sequence.

  The sequence lives in a fixed ``[B, P + steps]`` buffer whose not yet
  generated slots are padding (masked out), so one compile serves all steps.
  Positions count real tokens (after the soft prompt's virtual tokens).

  Returns:
    ``(tokens [B, steps], logits [B, steps, V])``.
  """
  nv = model.num_virtual_tokens
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
  plain = model if isinstance(model, nnx.Module) else peft.merge(model)
  want_tokens, want_logits = _uncached_greedy(plain, PROMPT, MASK, N)
  np.testing.assert_array_equal(np.asarray(out.ids), want_tokens)
  np.testing.assert_allclose(np.asarray(out.logits), want_logits, atol=1e-5,
                             rtol=0)
  # The right- and left-padded copies of one prompt generate the same.
  np.testing.assert_array_equal(np.asarray(out.ids[0]), np.asarray(out.ids[1]))
  np.testing.assert_allclose(np.asarray(out.logits[0]),
                             np.asarray(out.logits[1]), atol=1e-5, rtol=0)
  return out


@pytest.mark.slow
def test_cache_calls_match_full_forward():
  model = _model()
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, ids):
    model = nnx.merge(graphdef, state)
    cache = model.init_cache(1, 8)
    a, cache = model(ids[:, :3], cache=cache)
    b, cache = model(ids[:, 3:4], cache=cache)
    c, cache = model(ids[:, 4:], cache=cache)
    return model(ids), (a, b, c), cache

  full, parts, cache = run(state, jnp.asarray(PROMPT[2:3]))
  assert isinstance(cache, KVCache) and cache.max_length == 8
  assert cache.k.shape == (2, 1, 8, 4, 8)
  assert int(cache.index) == 5
  np.testing.assert_array_equal(np.asarray(cache.mask[0]),
                                [1, 1, 1, 1, 1, 0, 0, 0])
  got = np.concatenate([np.asarray(p) for p in parts], 1)
  np.testing.assert_allclose(got, np.asarray(full), atol=1e-5, rtol=0)
  with pytest.raises(ValueError, match='max_length'):
    model.init_cache(1, CFG.max_len + 1)
  with pytest.raises(ValueError, match='batch_size'):
    model.init_cache(0, 8)


@pytest.mark.slow
def test_cached_greedy_equals_uncached_and_ignores_padding():
  _check_cached_equals_uncached(_model(1))


@pytest.mark.slow
def test_padding_positions_count_real_tokens():
  model = _model(2)
  # The left-padded row generates what the unpadded prompt generates alone.
  alone = generate(model, PROMPT[1:2, 2:], N, return_logits=True)
  padded = generate(model, PROMPT[1:2], N, prompt_mask=MASK[1:2],
                    return_logits=True)
  np.testing.assert_array_equal(np.asarray(padded.ids), np.asarray(alone.ids))
  np.testing.assert_allclose(np.asarray(padded.logits),
                             np.asarray(alone.logits), atol=1e-5, rtol=0)
  # ... and the padded cache slots are never attended to.
  graphdef, state = nnx.split(model)

  @jax.jit
  def prefill(state, ids, mask):
    m = nnx.merge(graphdef, state)
    return m(ids, mask, cache=m.init_cache(ids.shape[0], 8))

  _, cache = prefill(state, jnp.asarray(PROMPT), jnp.asarray(MASK))
  np.testing.assert_array_equal(np.asarray(cache.mask[:, :5]), MASK)


@pytest.mark.slow
def test_sampling_is_reproducible():
  model = _model(3)
  sample = lambda seed, **kw: np.asarray(generate(
      model, PROMPT, N, prompt_mask=MASK, method='sample',
      key=jax.random.key(seed), **kw).ids)
  a, b, c = sample(3), sample(3), sample(4)
  np.testing.assert_array_equal(a, b)
  assert (a != c).any()
  assert a.min() >= 0 and a.max() < CFG.vocab_size
  greedy = np.asarray(generate(model, PROMPT, N, prompt_mask=MASK).ids)
  assert (a != greedy).any()
  np.testing.assert_array_equal(sample(3, temperature=0.0), greedy)


@pytest.mark.slow
def test_sampling_limits_are_greedy():
  model = _model(3)
  greedy = np.asarray(generate(model, PROMPT, N, prompt_mask=MASK).ids)
  sample = lambda **kw: np.asarray(generate(
      model, PROMPT, N, prompt_mask=MASK, method='sample',
      key=jax.random.key(0), **kw).ids)
  np.testing.assert_array_equal(sample(top_p=1e-6), greedy)
  np.testing.assert_array_equal(sample(temperature=1e-6), greedy)


def _get(model, dotted):
  for name in dotted.split('.'):
    model = model[int(name)] if name.isdigit() else getattr(model, name)
  return model


@pytest.mark.slow
def test_lora_wrapped_gpt2_generates():
  model = _model(0)
  base_ids = np.asarray(generate(model, PROMPT, N, prompt_mask=MASK).ids)
  paths = peft.apply_lora(model, rank=4, alpha=8.0,
                          target_modules=('q_proj', 'v_proj', 'fc_in'),
                          rngs=nnx.Rngs(5))
  assert len(paths) == 6
  merged = _model(0)  # reference: kernels W + A @ B * scaling
  for i, p in enumerate(paths):  # non-zero B: the adapters change the model
    layer = _get(model, p)
    layer.lora_b[...] = 0.5 * jax.random.normal(
        jax.random.key(i), layer.lora_b.shape)
    update = layer.lora_a[...] @ layer.lora_b[...] * layer.scaling
    _get(merged, p).kernel[...] += update
  split = peft.split_model(model, 'lora')
  out = _check_cached_equals_uncached(split)
  assert (np.asarray(out.ids) != base_ids).any()
  # Same tokens as the model with the LoRA update merged into its kernels.
  want = generate(merged, PROMPT, N, prompt_mask=MASK, return_logits=True)
  np.testing.assert_array_equal(np.asarray(out.ids), np.asarray(want.ids))
  np.testing.assert_allclose(np.asarray(out.logits), np.asarray(want.logits),
                             atol=1e-5, rtol=0)
  # Generation vmapped over clients' LoRA factors.
  other = jax.tree_util.tree_map(lambda x: -x, split.trainable)
  stacked = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]),
                                   split.trainable, other)
  fn = make_generate_fn(split.graphdef, 4)
  got = jax.jit(jax.vmap(fn, in_axes=(0, None, None, None)))(
      stacked, split.frozen, PROMPT, MASK)
  assert got.ids.shape == (2, 3, 4)
  for c, trainable in enumerate([split.trainable, other]):
    want = generate((split.graphdef, trainable, split.frozen), PROMPT, 4,
                    prompt_mask=MASK)
    np.testing.assert_array_equal(np.asarray(got.ids[c]),
                                  np.asarray(want.ids))


def _past_key_values(model, ids):
  """Per-layer cached keys/values ``[layers, P, heads, head_dim]`` of ids."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, ids):
    m = nnx.merge(graphdef, state)
    _, cache = m(ids[None], cache=m.init_cache(1, ids.shape[0]))
    return cache.k[:, 0], cache.v[:, 0]

  return run(state, jnp.asarray(ids))


@pytest.mark.slow
def test_prompt_and_prefix_hooks():
  ids = np.array([[3, 14, 15, 9, 26, 5], [0, 0, 27, 18, 28, 1]])
  mask = np.array([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
  virtual = [5, 9, 11]
  with_virtual = (np.concatenate([np.tile(virtual, (2, 1)), ids], 1),
                  np.concatenate([np.ones((2, 3), int), mask], 1))
  base = _model(4)
  want = _forward(base, *with_virtual)[:, 3:]
  # Soft prompt = the embeddings of the virtual tokens (positions 0..V-1).
  model = _model(4)
  model.prompt = SoftPrompt(model.embed.embedding[...][np.array(virtual)])
  assert model.num_virtual_tokens == 3
  np.testing.assert_allclose(_forward(model, ids, jnp.asarray(mask)), want,
                             atol=1e-5, rtol=0)
  # Prefix = the past keys/values of the virtual tokens.
  model = _model(4)
  keys, values = _past_key_values(model, virtual)
  for i, layer in enumerate(model.layers):
    layer.attn.prefix = PrefixKV(keys[i], values[i])
  got = _forward(model, ids, jnp.asarray(mask), jnp.arange(3, 9))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  # Both hooks at once go through the cache like the full forward.
  model = _model(5)
  model.prompt = SoftPrompt(
      0.5 * jax.random.normal(jax.random.key(0), (3, CFG.dim)))
  for i, layer in enumerate(model.layers):
    k = 0.5 * jax.random.normal(jax.random.key(i + 1), (2, 4, 8))
    layer.attn.prefix = PrefixKV(k, -k)
  assert int(model.init_cache(1, 8).index) == 3
  _check_cached_equals_uncached(model)
  with pytest.raises(ValueError, match='virtual tokens exceeds max_len'):
    model(jnp.zeros((1, CFG.max_len - 2), jnp.int32))
  with pytest.raises(ValueError, match='max_len'):
    generate(model, PROMPT, CFG.max_len - PROMPT.shape[1] - 1)


def test_errors():
  model = GPT2(dataclasses.replace(CFG, num_layers=1), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='max_len'):
    generate(model, PROMPT, CFG.max_len - PROMPT.shape[1] + 2)
  with pytest.raises(ValueError, match='exceeds max_len'):
    model(jnp.zeros((1, CFG.max_len + 1), jnp.int32))
  with pytest.raises(ValueError, match='KV cache'):
    generate(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), PROMPT, 2)


def _torch_perturb(torch, model, seed):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if p.ndim == 1:
        is_scale = '.ln_' in name and name.endswith('weight')
        p.copy_(noise * 0.1 + (1.0 if is_scale else 0.0))
      else:
        p.copy_(noise * 0.3)


@pytest.mark.slow
def test_greedy_matches_transformers(tmp_path):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  torch.manual_seed(0)
  ref = transformers.GPT2LMHeadModel(transformers.GPT2Config(
      vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64,
      bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval()
  _torch_perturb(torch, ref, 0)
  ref.save_pretrained(tmp_path)
  model, cfg = hf.from_pretrained(tmp_path)
  assert isinstance(model, GPT2) and cfg.max_len == 64
  rng = np.random.RandomState(0)
  ids = rng.randint(3, 100, (4, 9))
  mask = np.ones((4, 9), np.int64)
  mask[1, :4] = 0  # left padding
  mask[2, :8] = 0  # a single real token
  mask[3, :2] = 0
  ids[mask == 0] = 0
  steps = 20

  def hf_generate(**kw):
    with torch.no_grad():
      out = ref.generate(
          torch.tensor(ids), attention_mask=torch.tensor(mask),
          do_sample=False, max_new_tokens=steps, pad_token_id=0, **kw)
    return out[:, ids.shape[1]:].numpy()

  want = hf_generate(eos_token_id=None)
  assert want.shape == (4, steps)
  got = generate(model, ids, steps, prompt_mask=mask)
  np.testing.assert_array_equal(np.asarray(got.ids), want)
  # With an EOS that a row emits midway: same tokens, pad_id afterwards.
  eos = int(want[0, 5])
  want = hf_generate(eos_token_id=eos)
  got = generate(model, ids, steps, prompt_mask=mask, eos_id=eos, pad_id=0)
  got_ids = np.asarray(got.ids)
  np.testing.assert_array_equal(got_ids[:, :want.shape[1]], want)
  np.testing.assert_array_equal(got_ids[:, want.shape[1]:], 0)
  assert int(got.lengths[0]) <= 6


@pytest.mark.slow
def test_apply_prompt_and_prefix_tuning_on_gpt2():
  """The PEFT entry points install the hooks on GPT-2 and generation works."""
  model = _model(6)
  paths = peft.apply_prefix_tuning(model, 2, init='vocab', token_ids=[3, 4],
                                   rngs=nnx.Rngs(0))
  assert paths == [f'layers.{i}.attn.prefix' for i in range(CFG.num_layers)]
  # 'vocab' init: the prefix equals the model's own cached keys/values of the tokens.
  plain = _model(6)
  keys, _ = _past_key_values(plain, [3, 4])
  np.testing.assert_allclose(np.asarray(model.layers[0].attn.prefix.key[...]),
                             np.asarray(keys[0]), atol=1e-5)
  peft.apply_prompt_tuning(model, 3, init='vocab', token_ids=[5, 9, 11],
                           rngs=nnx.Rngs(1))
  assert model.num_virtual_tokens == 3
  _check_cached_equals_uncached(model)
