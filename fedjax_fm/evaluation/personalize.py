"""Personalisation baseline: a few local fine-tuning steps per client.

Starting from the global model, every client runs ``steps`` optimizer steps
on its own training data and is then scored on its own test data. Clients are
an array axis: a chunk of ``K`` clients is one jitted program that vmaps
:func:`fedjax_fm.engine.client.make_client_update` (local training, a
``lax.scan`` over steps) and then the evaluation scan of
:func:`fedjax_fm.evaluation.federated.client_metric_sums`, so personalised
models exist only one chunk at a time::

  out = personalize(loss_fn, eval_fn, trainable, frozen, train_ds, test_ds,
                    steps=10, batch_size=16, optimizer=optax.sgd(0.1), seed=0)
  out['after_distribution']['accuracy']['p10']
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax

from fedjax_fm import tree_util
from fedjax_fm.data.federated import FederatedDataset
from fedjax_fm.data.federated import prefetch
from fedjax_fm.engine.client import make_client_update
from fedjax_fm.evaluation import federated

__all__ = ['personalize']

# loss_fn(trainable, frozen, batch, key) -> per-example loss [B]
LossFn = Callable[[Any, Any, Any, jax.Array], jax.Array]


def _check_datasets(train_ds: Any, test_ds: Any) -> None:
  for name, ds in (('train_ds', train_ds), ('test_ds', test_ds)):
    if not isinstance(ds, FederatedDataset):
      raise ValueError(
          f'`{name}` must be a FederatedDataset, got {type(ds).__name__}.')
  if train_ds.num_clients != test_ds.num_clients:
    raise ValueError(
        f'`train_ds` has {train_ds.num_clients} clients but `test_ds` has '
        f'{test_ds.num_clients}; client c of both must be the same client.')


def _build_chunk_fn(loss_fn: LossFn, eval_fn: federated.EvalFn,
                    optimizer: optax.GradientTransformation):
  """Jitted chunk: personalise K clients, then score them on their test data."""
  client_update = make_client_update(loss_fn, optimizer)

  def one_client(trainable, frozen, train_data, key, test_batch, test_mask):
    delta, train_metrics = client_update(trainable, frozen, train_data, key)
    personal = tree_util.tree_add(trainable, delta)
    sums = federated.client_metric_sums(eval_fn, personal, frozen, test_batch,
                                        test_mask)
    return sums, train_metrics

  def run(trainable, frozen, train_data, client_id, seed_key, test_batch,
          test_mask):
    keys = jax.vmap(lambda i: jax.random.fold_in(seed_key, i))(client_id)
    return jax.vmap(one_client, in_axes=(None, None, 0, 0, 0, 0))(
        trainable, frozen, train_data, keys, test_batch, test_mask)

  return jax.jit(run)


def personalize(
    loss_fn: LossFn,
    eval_fn: federated.EvalFn,
    trainable: Any,
    frozen: Any,
    train_ds: FederatedDataset,
    test_ds: FederatedDataset,
    *,
    steps: int,
    batch_size: int,
    optimizer: optax.GradientTransformation,
    seed: int = 0,
    chunk_size: int | None = None,
    eval_batch_size: int | None = None,
    max_eval_batches: int | None = None,
) -> dict[str, Any]:
  """Fine-tunes the global model on each client and scores it locally.

  Client ``c`` starts from ``trainable`` and runs ``steps`` steps of
  ``optimizer`` (fresh state) on batches of its own training data from
  ``train_ds.round_batch(..., seed=seed)``, walking through its shuffled
  examples as many epochs as the steps need; a client without training
  data keeps the global model. Its personalised model is then scored on
  client ``c`` of ``test_ds``, as is the global model. Training keys are
  ``fold_in(key(seed), c)``, so results do not depend on ``chunk_size``.

  Args:
    loss_fn: ``loss_fn(trainable, frozen, batch, key) -> [B]`` per-example
      loss (e.g. :func:`fedjax_fm.models.make_loss_fn`).
    eval_fn: ``eval_fn(trainable, frozen, batch) -> {name: [B]}``.
    trainable: the global model's trainable params.
    frozen: frozen params, shared by all clients.
    train_ds: the clients' local training data.
    test_ds: the clients' local test data (same clients, same order).
    steps: local fine-tuning steps ``>= 1``.
    batch_size: local training batch size ``>= 1``.
    optimizer: optax client optimizer.
    seed: integer seed of the batches and training keys.
    chunk_size: clients per jitted chunk (default
      ``federated.DEFAULT_CHUNK_SIZE``).
    eval_batch_size: evaluation batch size (default ``batch_size``).
    max_eval_batches: optional cap on evaluation batches per client.

  Returns:
    A dict with ``'before'`` and ``'after'`` (per-client metrics ``{name:
    [C]}`` of the global and personalised models, as
    :func:`~fedjax_fm.evaluation.federated.per_client_eval` returns them),
    ``'before_distribution'`` and ``'after_distribution'`` (``{name:
    distribution}``, see :func:`~fedjax_fm.evaluation.federated.summarize`)
    and ``'train'`` (per-client ``'loss'``, mean training loss over the local
    steps, ``'steps'`` and ``'examples'``).

  Raises:
    ValueError: on invalid arguments.
  """
  _check_datasets(train_ds, test_ds)
  steps = federated.check_int(steps, 'steps', 1)
  batch_size = federated.check_int(batch_size, 'batch_size', 1)
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
    raise ValueError(f'`seed` must be an int, got {seed!r}.')
  if not isinstance(optimizer, optax.GradientTransformation):
    raise ValueError(
        '`optimizer` must be an optax.GradientTransformation, got '
        f'{type(optimizer).__name__}.')
  eval_bs = batch_size if eval_batch_size is None else eval_batch_size
  nb = federated.num_eval_batches(test_ds, eval_bs, max_eval_batches)

  before = federated.per_client_eval(
      eval_fn, trainable, frozen, test_ds, batch_size=eval_bs,
      max_batches=max_eval_batches, chunk_size=chunk_size)

  sizes = train_ds.client_sizes
  smallest = int(sizes[sizes > 0].min()) if np.any(sizes > 0) else 1
  max_epochs = max(-(-steps * batch_size // smallest), 1)
  num_clients = train_ds.num_clients
  k, chunks = federated.client_chunks(num_clients, chunk_size)
  run = _build_chunk_fn(loss_fn, eval_fn, optimizer)
  seed_key = jax.random.key(int(seed))

  def host_chunks():
    for ids in chunks:
      rd = train_ds.round_batch(ids, steps, batch_size, seed=int(seed),
                                max_epochs=max_epochs, pad_clients_to=k)
      test = federated.client_eval_batches(test_ds, ids, nb, eval_bs,
                                           pad_clients_to=k)
      yield ids, rd, test

  sums: dict[str, list[np.ndarray]] = {}
  train: dict[str, list[np.ndarray]] = {}
  for ids, rd, (test_batch, test_mask) in prefetch(host_chunks()):
    data = {key: rd[key] for key in ('batch', 'example_mask', 'step_mask')}
    out, train_metrics = jax.device_get(
        run(trainable, frozen, data, rd['client_id'], seed_key, test_batch,
            test_mask))
    for name, value in out.items():
      sums.setdefault(name, []).append(np.asarray(value)[:ids.size])
    for name, value in train_metrics.items():
      train.setdefault(name, []).append(np.asarray(value)[:ids.size])
  sums = {name: np.concatenate(v) for name, v in sums.items()}
  counts = np.rint(sums.pop('count')).astype(np.int64)
  after = federated.finalize_client_sums(sums, counts)
  train_out = {name: np.concatenate(v).astype(np.float64)
               for name, v in train.items()}
  return {
      'before': before,
      'after': after,
      'before_distribution': federated.summarize(before),
      'after_distribution': federated.summarize(after),
      'train': train_out,
  }
