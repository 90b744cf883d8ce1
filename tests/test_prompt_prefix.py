"""Tests for prompt tuning and prefix tuning (peft/prompt.py)."""

import numpy as np
import optax
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from fedjax_fm import peft
from fedjax_fm.models import tasks
from fedjax_fm.models.decoder import Decoder, DecoderConfig
from fedjax_fm.peft.prompt import PrefixParam, PromptParam

CFG = DecoderConfig(vocab_size=64, dim=32, num_layers=2, num_heads=4,
                    num_kv_heads=2, mlp_dim=48, max_len=24)

IDS = np.array([[3, 14, 15, 9, 26, 5], [0, 0, 27, 18, 28, 1]])
MASK = np.array([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])


def _paths(tree):
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'.'.join(str(getattr(k, 'key', k)) for k in path): np.asarray(v)
          for path, v in flat}


def _forward(model, ids, mask, positions=None):
  """Jitted ``model(ids, mask, positions=...)`` (one compile, no eager ops)."""
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda s, i, m, p: nnx.merge(graphdef, s)(i, m, positions=p))
  return np.asarray(fn(state, jnp.asarray(ids), jnp.asarray(mask), positions))


def _prepend(tokens, ids, mask):
  b = ids.shape[0]
  ids = np.concatenate([np.tile(tokens, (b, 1)), ids], 1)
  mask = np.concatenate([np.ones((b, len(tokens)), int), mask], 1)
  return ids, mask


@pytest.mark.slow
def test_soft_prompt_equals_prepended_tokens():
  base = Decoder(CFG, rngs=nnx.Rngs(0))
  model = Decoder(CFG, rngs=nnx.Rngs(0))
  prompt = peft.apply_prompt_tuning(model, 3, init='vocab',
                                    token_ids=[5, 9, 11])
  assert prompt is model.prompt and prompt.num_virtual_tokens == 3
  assert isinstance(prompt.embedding, PromptParam)
  got = _forward(model, IDS, MASK)
  assert got.shape == IDS.shape + (CFG.vocab_size,)
  want = _forward(base, *_prepend([5, 9, 11], IDS, MASK))[:, 3:]
  np.testing.assert_allclose(got, want, atol=1e-5)
  # The causal-LM loss runs unchanged on the original-length logits.
  split = peft.split_model(model, 'prompt')
  loss_fn = jax.jit(tasks.make_loss_fn(split.graphdef, tasks.causal_lm_task()))
  loss = loss_fn(split.trainable, split.frozen,
                 {'input_ids': jnp.asarray(IDS), 'attention_mask': MASK}, None)
  assert loss.shape == (2,) and np.all(np.isfinite(np.asarray(loss)))
  with pytest.raises(ValueError, match='virtual tokens exceeds max_len'):
    model(jnp.zeros((1, CFG.max_len - 2), jnp.int32))


@pytest.mark.slow
def test_prefix_equals_past_key_values_of_tokens():
  base = Decoder(CFG, rngs=nnx.Rngs(1))
  model = Decoder(CFG, rngs=nnx.Rngs(1))
  paths = peft.apply_prefix_tuning(model, 2, init='vocab', token_ids=[5, 9])
  assert paths == ['layers.0.attn.prefix', 'layers.1.attn.prefix']
  pre = model.layers[1].attn.prefix
  assert isinstance(pre.key, PrefixParam) and pre.key.shape == (2, 2, 8)
  # Real tokens continue after the 2 prefix positions.
  got = _forward(model, IDS, MASK, jnp.arange(2, 2 + IDS.shape[1]))
  want = _forward(base, *_prepend([5, 9], IDS, MASK))[:, 2:]
  np.testing.assert_allclose(got, want, atol=1e-5)
  # The reparameterised prefix starts from the same key/value.
  reparam = Decoder(CFG, rngs=nnx.Rngs(1))
  peft.apply_prefix_tuning(reparam, 2, init='vocab', token_ids=[5, 9],
                           reparam_hidden=16, rngs=nnx.Rngs(2))
  for a, b in zip(reparam.layers[1].attn.prefix.prefix(), pre.prefix()):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  np.testing.assert_allclose(
      _forward(reparam, IDS, MASK, jnp.arange(2, 8)), got, atol=1e-5)


@pytest.mark.slow
def test_split_methods():
  assert {'prompt', 'prefix', 'full', 'lora'} <= set(peft.METHODS)
  model = Decoder(CFG, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='apply_prompt_tuning'):
    peft.split_model(model, 'prompt')
  with pytest.raises(ValueError, match='apply_prefix_tuning'):
    peft.split_model(model, 'prefix')
  peft.apply_prompt_tuning(model, 4, init='random', rngs=nnx.Rngs(1))
  peft.apply_prefix_tuning(model, 2, init='random', reparam_hidden=8,
                           rngs=nnx.Rngs(2))
  split = peft.split_model(model, 'prompt')
  assert set(_paths(split.trainable)) == {'prompt.embedding'}
  assert 'layers.0.attn.prefix.w1' in _paths(split.frozen)
  split = peft.split_model(model, 'prefix', extra_trainable=('lm_head',))
  want = {f'layers.{i}.attn.prefix.{n}' for i in range(2)
          for n in ('embedding', 'w1', 'b1', 'w2', 'b2')}
  assert set(_paths(split.trainable)) == want | {'lm_head.kernel'}
  frozen = _paths(split.frozen)
  assert 'prompt.embedding' in frozen and 'embed.embedding' in frozen
  full = peft.split_model(model, 'full')
  assert 'prompt.embedding' in _paths(full.trainable)


def test_apply_errors():
  model = Decoder(CFG, rngs=nnx.Rngs(0))
  for kwargs, match in [(dict(num_virtual_tokens=0), 'num_virtual_tokens'),
                        (dict(num_virtual_tokens=2, init='text'), 'init'),
                        (dict(num_virtual_tokens=2, init_std=0.0),
                         'init_std')]:
    with pytest.raises(ValueError, match=match):
      peft.apply_prompt_tuning(model, rngs=nnx.Rngs(0), **kwargs)
    with pytest.raises(ValueError, match=match):
      peft.apply_prefix_tuning(model, rngs=nnx.Rngs(0), **kwargs)
  with pytest.raises(ValueError, match='reparam_hidden'):
    peft.apply_prefix_tuning(model, 2, reparam_hidden=0, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='token_ids'):
    peft.apply_prompt_tuning(model, 2, token_ids=[64])
  with pytest.raises(ValueError, match='Decoder'):
    peft.apply_prompt_tuning(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), 2,
                             rngs=nnx.Rngs(0))
  peft.apply_prompt_tuning(model, 2, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='already'):
    peft.apply_prompt_tuning(model, 2, rngs=nnx.Rngs(0))
  peft.apply_prefix_tuning(model, 2, init='random', rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='already'):
    peft.apply_prefix_tuning(model, 2, init='random', rngs=nnx.Rngs(0))


def _sharpen(model, factor=10.0):
  """Scales kernels and embeddings (std 0.02 -> 0.2), like a trained model.

  At the 0.02 init the RMS-normalised features meet a tiny frozen lm_head,
  which bounds the logits to about +-0.6: no frozen-base method could fit.
  """
  for path, v in nnx.iter_graph(model):
    if isinstance(v, nnx.Param) and path[-1] in ('kernel', 'embedding'):
      v.set_value(v[...] * factor)


def _train(split, batch, steps=40, lr=0.05):
  loss_fn = tasks.make_loss_fn(split.graphdef, tasks.causal_lm_task())
  opt = optax.adam(lr)

  @jax.jit
  def run(trainable, frozen):
    def step(carry, _):
      params, state = carry
      loss, grads = jax.value_and_grad(
          lambda p: loss_fn(p, frozen, batch, None).mean())(params)
      updates, state = opt.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), loss

    (params, _), losses = jax.lax.scan(
        step, (trainable, opt.init(trainable)), None, length=steps)
    return params, losses

  return run(split.trainable, split.frozen)


@pytest.mark.parametrize('route', ['prompt', 'prefix', 'prefix_reparam'])
@pytest.mark.slow
def test_only_route_variables_train_and_loss_falls(route):
  model = Decoder(CFG, rngs=nnx.Rngs(0))
  _sharpen(model)
  if route == 'prompt':
    peft.apply_prompt_tuning(model, 4, rngs=nnx.Rngs(1))
    method = 'prompt'
  else:
    hidden = 16 if route == 'prefix_reparam' else None
    peft.apply_prefix_tuning(model, 4, reparam_hidden=hidden,
                             rngs=nnx.Rngs(1))
    method = 'prefix'
  before = _paths(nnx.to_pure_dict(nnx.state(model)))
  split = peft.split_model(model, method)
  rng = np.random.default_rng(0)  # a small memorisation task
  batch = {'input_ids': jnp.asarray(rng.integers(0, 64, (4, 8))),
           'attention_mask': jnp.ones((4, 8), jnp.int32)}
  trained, losses = _train(split, batch)
  losses = np.asarray(losses)
  assert losses[-1] < 0.7 * losses[0], losses
  after = _paths(nnx.to_pure_dict(nnx.state(
      peft.merge(split.graphdef, trained, split.frozen))))
  assert set(after) == set(before)
  own = set(_paths(trained))
  assert own and all(('prompt.' if method == 'prompt' else '.prefix.') in p
                     for p in own)
  for path, value in after.items():
    if path in own:
      assert np.abs(value - before[path]).max() > 0, path
    else:
      np.testing.assert_array_equal(value, before[path], err_msg=path)
