"""Tests for tasks (losses and metrics) against NumPy."""

import numpy as np

import jax
import jax.numpy as jnp
from flax import nnx
import pytest

from fedjax_fm import peft
from fedjax_fm.models import tasks
from fedjax_fm.models.decoder import Decoder, DecoderConfig
from fedjax_fm.models.encoder import Encoder, EncoderConfig
from fedjax_fm.models.mlp import MLPClassifier


def np_ce(logits, labels):
  logits = logits.astype(np.float64)
  m = logits.max(-1, keepdims=True)
  lse = m[..., 0] + np.log(np.exp(logits - m).sum(-1))
  return lse - np.take_along_axis(logits, labels[..., None], -1)[..., 0]


@pytest.mark.slow
def test_features_classification():
  model = MLPClassifier(6, [10], 4, dropout=0.3, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  batch = {'x': jnp.asarray(rng.normal(size=(5, 6)), jnp.float32),
           'label': jnp.asarray([0, 1, 2, 3, 1])}
  task = tasks.features_classification_task()
  logits = np.asarray(model(batch['x']))
  labels = np.asarray(batch['label'])
  np.testing.assert_allclose(np.asarray(task.loss(model, batch, None)),
                             np_ce(logits, labels), rtol=1e-5, atol=1e-6)
  m = task.metrics(model, batch)
  assert set(m) == {'loss', 'correct'}
  np.testing.assert_array_equal(np.asarray(m['correct']),
                                (logits.argmax(-1) == labels).astype(float))
  # Dropout via rngs changes the loss; key=None is deterministic.
  split = peft.split_model(model, 'full')
  loss_fn = tasks.make_loss_fn(split, task)
  det = loss_fn(split.trainable, split.frozen, batch, None)
  np.testing.assert_allclose(np.asarray(det), np_ce(logits, labels),
                             rtol=1e-5, atol=1e-6)
  k1 = loss_fn(split.trainable, split.frozen, batch, jax.random.key(1))
  k1b = loss_fn(split.trainable, split.frozen, batch, jax.random.key(1))
  np.testing.assert_array_equal(np.asarray(k1), np.asarray(k1b))
  assert np.abs(np.asarray(k1) - np.asarray(det)).max() > 1e-5


@pytest.mark.slow
def test_classification_task_with_encoder():
  cfg = EncoderConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=4,
                      intermediate_size=32, max_position=20, num_labels=3)
  model = Encoder(cfg, rngs=nnx.Rngs(0))
  mask = np.ones((3, 9), np.int32)
  mask[2, 3:] = 0
  batch = {'ids': jnp.arange(27).reshape(3, 9) % 50,
           'mask': jnp.asarray(mask), 'y': jnp.asarray([2, 0, 1])}
  task = tasks.classification_task(input_key='ids', mask_key='mask',
                                   label_key='y')
  logits = np.asarray(model(batch['ids'], batch['mask']))
  want = np_ce(logits, np.array([2, 0, 1]))
  np.testing.assert_allclose(np.asarray(task.loss(model, batch, None)), want,
                             rtol=1e-5, atol=1e-6)
  split = peft.split_model(model, 'full')
  metrics = tasks.make_eval_fn(split.graphdef, task)(
      split.trainable, split.frozen, batch)
  np.testing.assert_allclose(np.asarray(metrics['loss']), want, rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_array_equal(
      np.asarray(metrics['correct']),
      (logits.argmax(-1) == np.array([2, 0, 1])).astype(np.float32))


@pytest.mark.slow
def test_causal_lm_task():
  cfg = DecoderConfig(vocab_size=37, dim=16, num_layers=2, num_heads=4,
                      num_kv_heads=2, mlp_dim=24, max_len=12)
  model = Decoder(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 37, (3, 7))
  mask = np.ones((3, 7), np.int32)
  mask[0, 5:] = 0  # right padding
  mask[1, :3] = 0  # left padding
  mask[2, 1:] = 0  # a single token: no valid target
  batch = {'input_ids': jnp.asarray(ids), 'attention_mask': jnp.asarray(mask)}
  task = tasks.causal_lm_task()
  logits = np.asarray(model(batch['input_ids'], batch['attention_mask']))
  nll = np_ce(logits[:, :-1], ids[:, 1:])
  valid = (mask[:, 1:] * mask[:, :-1]).astype(np.float64)
  num = valid.sum(-1)
  want = (nll * valid).sum(-1) / np.maximum(num, 1)
  assert want[2] == 0.0
  got = np.asarray(task.loss(model, batch, None))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert got[2] == 0.0
  m = task.metrics(model, batch)
  np.testing.assert_allclose(np.asarray(m['loss']), want, rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_array_equal(np.asarray(m['num_tokens']), num)
  correct = (logits[:, :-1].argmax(-1) == ids[:, 1:]) * valid
  np.testing.assert_array_equal(np.asarray(m['correct_tokens']),
                                correct.sum(-1))
  np.testing.assert_allclose(np.asarray(m['nll_sum']),
                             (nll * valid).sum(-1), rtol=1e-5, atol=1e-5)
  # Without a mask every target counts.
  unmasked = tasks.causal_lm_task(mask_key=None)
  np.testing.assert_allclose(
      np.asarray(unmasked.loss(model, batch, None)),
      np_ce(np.asarray(model(batch['input_ids']))[:, :-1], ids[:, 1:]).mean(-1),
      rtol=1e-5, atol=1e-6)
