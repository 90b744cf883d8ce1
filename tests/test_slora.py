"""Tests for the SLoRA-style two stages (sparse fine-tuning, then LoRA)."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from fedjax_fm import peft
from fedjax_fm.models import tasks
from fedjax_fm.models.encoder import Encoder, EncoderConfig
from fedjax_fm.peft import slora

# Same shapes as tests/test_adapters.py (reuses compiled eager ops).
ENC = EncoderConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4,
                    intermediate_size=64, max_position=16, num_labels=4)


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  return {'input_ids': jnp.asarray(rng.integers(0, 64, (8, 8))),
          'attention_mask': jnp.ones((8, 8), jnp.int32),
          'label': jnp.asarray(rng.integers(0, 4, 8))}


def test_sparse_masks_density_seed_and_dense_leaves():
  like = {'a': jax.ShapeDtypeStruct((10, 20), jnp.float32),
          'b': {'kernel': jnp.zeros((7, 3)), 'bias': jnp.zeros(3)},
          'classifier': {'kernel': jnp.zeros((4, 2))}}
  masks = slora.sparse_masks(like, 0.1, seed=3, keep_dense=('classifier',))
  assert masks['a'].dtype == jnp.bool_ and masks['a'].shape == (10, 20)
  assert int(masks['a'].sum()) == 20
  assert int(masks['b']['kernel'].sum()) == 2      # round(2.1)
  assert int(masks['b']['bias'].sum()) == 1        # at least one entry
  assert bool(masks['classifier']['kernel'].all())
  again = slora.sparse_masks(like, 0.1, seed=3, keep_dense=('classifier',))
  jax.tree.map(np.testing.assert_array_equal, masks, again)
  other = slora.sparse_masks(like, 0.1, seed=4)
  assert not np.array_equal(masks['a'], other['a'])
  assert not bool(other['classifier']['kernel'].all())
  for bad in (0.0, 1.5, -0.1):
    with pytest.raises(ValueError, match='density'):
      slora.sparse_masks(like, bad, seed=0)
  delta = jax.tree.map(lambda m: jnp.ones(m.shape), masks)
  sparse = slora.masked_update(delta, masks)
  jax.tree.map(lambda s, m: np.testing.assert_array_equal(s, m), sparse,
               masks)


def test_lora_init_from_update_is_truncated_svd():
  rng = np.random.default_rng(0)
  d = rng.normal(size=(9, 6)).astype(np.float32)
  a, b = slora.lora_init_from_update(jnp.asarray(d), 3)
  assert a.shape == (9, 3) and b.shape == (3, 6)
  u, s, vt = np.linalg.svd(d, full_matrices=False)
  np.testing.assert_allclose(np.asarray(a @ b), (u[:, :3] * s[:3]) @ vt[:3],
                             rtol=1e-4, atol=1e-4)
  # Rank above min(in, out): exact, padded with zero components.
  a, b = slora.lora_init_from_update(jnp.asarray(d), 8)
  assert a.shape == (9, 8) and b.shape == (8, 6)
  np.testing.assert_allclose(np.asarray(a @ b), d, rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match='rank'):
    slora.lora_init_from_update(jnp.asarray(d), 0)


@pytest.mark.slow
def test_two_stages_end_to_end():
  model = Encoder(ENC, rngs=nnx.Rngs(0))
  w0 = {n: np.asarray(getattr(model.layers[0], n).kernel[...])
        for n in ('query', 'value')}
  split1 = slora.sparse_split(model, ('query', 'value'),
                              extra_trainable=('classifier',))
  assert set(split1.trainable['layers'][0]) == {'query', 'value'}
  assert set(split1.trainable['layers'][0]['query']) == {'kernel'}
  assert set(split1.trainable['classifier']) == {'kernel', 'bias'}
  masks = slora.sparse_masks(split1.trainable, 0.25, seed=0,
                             keep_dense=('classifier',))
  # Stage 1: a few jitted steps; the mask keeps the update sparse.
  loss_fn = tasks.make_loss_fn(split1.graphdef, tasks.classification_task())
  opt = optax.chain(optax.adamw(0.05, weight_decay=0.1),
                    slora.mask_updates(masks))
  batch = _batch()

  @jax.jit
  def stage1(t, frozen):
    def step(carry, _):
      t, s = carry
      loss, g = jax.value_and_grad(
          lambda t: loss_fn(t, frozen, batch, None).mean())(t)
      u, s = opt.update(g, s, t)
      return (optax.apply_updates(t, u), s), loss
    (t, _), losses = jax.lax.scan(step, (t, opt.init(t)), None, length=5)
    return t, losses

  t1, losses = stage1(split1.trainable, split1.frozen)
  assert float(losses[-1]) < float(losses[0])
  acc = jax.tree.map(jnp.subtract, t1, split1.trainable)
  for m, d in zip(jax.tree.leaves(masks), jax.tree.leaves(acc)):
    d = np.asarray(d)
    assert np.all(d[~np.asarray(m)] == 0) and np.abs(d).max() > 0

  # Stage 2 on the pre-trained model: base + A B s = base + truncated(D).
  rank, alpha = 4, 8.0
  model2 = peft.merge(split1)
  replaced = slora.slora_stage2(model2, acc, rank, alpha,
                                target_modules=('query', 'value'))
  assert replaced == ['layers.0.query', 'layers.0.value']
  layer = model2.layers[0]
  for n in ('query', 'value'):
    np.testing.assert_array_equal(
        np.asarray(getattr(layer, n).base.kernel[...]), w0[n])
  ref = peft.merge(split1)          # dense reference: W0 + truncated(D)
  for n in ('query', 'value'):
    d = np.asarray(acc['layers'][0][n]['kernel'])
    u, s, vt = np.linalg.svd(d, full_matrices=False)
    getattr(ref.layers[0], n).kernel.set_value(
        jnp.asarray(w0[n] + (u[:, :rank] * s[:rank]) @ vt[:rank]))
  ref.classifier.kernel.set_value(jnp.asarray(t1['classifier']['kernel']))
  ref.classifier.bias.set_value(jnp.asarray(t1['classifier']['bias']))
  forward = nnx.jit(lambda m, b: m(b['input_ids'], b['attention_mask']))
  np.testing.assert_allclose(np.asarray(forward(model2, batch)),
                             np.asarray(forward(ref, batch)),
                             rtol=1e-4, atol=1e-5)
  split2 = peft.split_model(model2, 'lora', extra_trainable=('classifier',))
  assert peft.count_params(split2.trainable) == 2 * (32 * rank + rank * 32) + (
      32 * 4 + 4)


def test_stage2_errors():
  model = Encoder(ENC, rngs=nnx.Rngs(0))
  d = {'layers': {0: {'query': {'kernel': jnp.zeros((32, 32))}}}}
  with pytest.raises(ValueError, match='rank'):
    slora.slora_stage2(model, d, 0, 1.0)
  with pytest.raises(ValueError, match='matching target_modules'):
    slora.slora_stage2(model, d, 2, 1.0, target_modules=('value',))
  with pytest.raises(ValueError, match='not in the model'):
    slora.slora_stage2(model, {'nope': {'kernel': jnp.zeros(2)}}, 2, 1.0)
  with pytest.raises(ValueError, match='matched no nnx.Linear'):
    slora.sparse_split(model, ('q_proj',))
