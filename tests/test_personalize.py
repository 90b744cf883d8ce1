"""Tests for fedjax_fm.evaluation.personalize on a tiny non-IID MLP problem."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from fedjax_fm import models
from fedjax_fm import peft
from fedjax_fm.data.federated import FederatedDataset
from fedjax_fm.evaluation import federated
from fedjax_fm.evaluation.personalize import personalize

D, K, H = 6, 3, 16
NUM_CLIENTS, PER_CLIENT = 6, 80
# Clients 0-3 use the shared labels; clients 4 and 5 their own relabelings,
# which a single global model cannot fit at the same time.
MAPPINGS = [(0, 1, 2)] * 4 + [(1, 2, 0), (2, 0, 1)]


def _clients(seed=0):
  rng = np.random.default_rng(seed)
  w_true = rng.normal(size=(D, K))
  x = rng.normal(size=(NUM_CLIENTS * PER_CLIENT, D)).astype(np.float32)
  base = np.argmax(x @ w_true, -1)
  client = np.repeat(np.arange(NUM_CLIENTS), PER_CLIENT)
  label = np.asarray(MAPPINGS)[client, base].astype(np.int32)
  offsets = np.arange(NUM_CLIENTS + 1) * PER_CLIENT
  return FederatedDataset({'x': x, 'label': label}, offsets)


def _setup():
  model = models.MLPClassifier(D, [H], K, rngs=nnx.Rngs(0))
  split = peft.split_model(model, 'full')
  task = models.features_classification_task()
  loss_fn = models.make_loss_fn(split.graphdef, task)
  eval_fn = models.make_eval_fn(split.graphdef, task)
  train_ds, test_ds = federated.split_clients(_clients(), 0.25, seed=0)

  # Global model: centralised training on the pooled training data (the
  # majority labeling wins).
  opt = optax.adam(0.05)
  pooled = {k: jnp.asarray(v) for k, v in train_ds.arrays.items()}

  @jax.jit
  def train(params):
    def step(carry, _):
      p, s = carry
      g = jax.grad(lambda q: loss_fn(q, split.frozen, pooled).mean())(p)
      u, s = opt.update(g, s, p)
      return (optax.apply_updates(p, u), s), None
    (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), None,
                                  length=100)
    return params

  trainable = train(split.trainable)
  return split, loss_fn, eval_fn, trainable, train_ds, test_ds


@pytest.fixture(scope='module')
def setup():
  return _setup()


def _run(setup, chunk_size, steps=25):
  split, loss_fn, eval_fn, trainable, train_ds, test_ds = setup
  return personalize(
      loss_fn, eval_fn, trainable, split.frozen, train_ds, test_ds,
      steps=steps, batch_size=10, optimizer=optax.adam(0.05), seed=1,
      chunk_size=chunk_size)


@pytest.mark.slow
def test_personalization_improves_mean_and_p10(setup):
  out = _run(setup, chunk_size=4)
  before = out['before_distribution']['accuracy']
  after = out['after_distribution']['accuracy']
  assert before['num_clients'] == after['num_clients'] == NUM_CLIENTS
  # The minority clients are badly served by the global model ...
  assert before['p10'] < 0.5
  # ... and personalisation lifts them without sacrificing the mean.
  assert after['mean'] > before['mean'] + 0.1
  assert after['p10'] > before['p10'] + 0.3
  np.testing.assert_array_equal(out['before']['num_examples'],
                                setup[5].client_sizes)
  np.testing.assert_array_equal(out['after']['num_examples'],
                                setup[5].client_sizes)
  np.testing.assert_array_equal(out['train']['steps'], np.full(NUM_CLIENTS, 25))
  assert np.all(np.isfinite(out['train']['loss']))
  assert set(out['after_distribution']) >= {'loss', 'accuracy', 'correct'}


def test_personalize_matches_per_client_loop(setup):
  """'after' equals a per-client reference (the last chunk is padded)."""
  split, loss_fn, eval_fn, trainable, train_ds, test_ds = setup
  steps = 3
  out = _run(setup, chunk_size=4, steps=steps)
  # Reference: plain optax loop per client on the same batches.
  opt = optax.adam(0.05)

  @jax.jit
  def sgd_step(params, state, batch, m):
    g = jax.grad(lambda p: jnp.sum(
        loss_fn(p, split.frozen, batch) * m) / m.sum())(params)
    u, state = opt.update(g, state, params)
    return optax.apply_updates(params, u), state

  rd = train_ds.round_batch(np.arange(NUM_CLIENTS), steps, 10, seed=1,
                            max_epochs=100)
  for c in range(NUM_CLIENTS):
    params, state = trainable, opt.init(trainable)
    for s in range(steps):
      batch = {k: v[c, s] for k, v in rd['batch'].items()}
      m = rd['example_mask'][c, s].astype(np.float32)
      params, state = sgd_step(params, state, batch, m)
    metrics = jax.jit(eval_fn)(params, split.frozen, test_ds.client_arrays(c))
    np.testing.assert_allclose(out['after']['loss'][c],
                               float(np.mean(metrics['loss'])), rtol=1e-4)
    np.testing.assert_allclose(out['after']['accuracy'][c],
                               float(np.mean(metrics['correct'])), atol=1e-6)


def test_personalize_validates(setup):
  split, loss_fn, eval_fn, trainable, train_ds, test_ds = setup
  kwargs = dict(steps=1, batch_size=4, optimizer=optax.sgd(0.1), seed=0)
  with pytest.raises(ValueError, match='clients'):
    personalize(loss_fn, eval_fn, trainable, split.frozen,
                                train_ds, test_ds.subset([0, 1]), **kwargs)
  with pytest.raises(ValueError, match='steps'):
    personalize(loss_fn, eval_fn, trainable, split.frozen,
                                train_ds, test_ds, **{**kwargs, 'steps': 0})
  with pytest.raises(ValueError, match='optimizer'):
    personalize(loss_fn, eval_fn, trainable, split.frozen,
                                train_ds, test_ds,
                                **{**kwargs, 'optimizer': 'sgd'})
