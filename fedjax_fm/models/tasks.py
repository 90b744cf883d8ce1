"""Tasks: pure per-example loss and metric functions over NNX models.

A :class:`Task` bundles ``loss(model, batch, rngs) -> [B]`` and
``metrics(model, batch) -> {name: [B]}``. :func:`make_loss_fn` and
:func:`make_eval_fn` turn a task into functions of pure-dict pytrees, the form
the federated engine vmaps over clients, scans over steps and jits::

  split = peft.split_model(model, 'lora', extra_trainable=('classifier',))
  loss_fn = make_loss_fn(split.graphdef, classification_task())
  per_example = loss_fn(split.trainable, split.frozen, batch, key)  # [B]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

__all__ = [
    'Task',
    'causal_lm_task',
    'classification_task',
    'features_classification_task',
    'make_eval_fn',
    'make_loss_fn',
]

Batch = Mapping[str, jax.Array]


class Task(NamedTuple):
  """Pure loss/metrics functions of ``(model, batch)``.

  Attributes:
    loss: ``loss(model, batch, rngs) -> [B]`` per-example loss; ``rngs`` (an
      ``nnx.Rngs`` or ``None`` for deterministic) drives dropout.
    metrics: ``metrics(model, batch) -> {name: [B]}`` per-example float32
      metrics, always deterministic; includes ``'loss'``.
  """

  loss: Callable[[nnx.Module, Batch, nnx.Rngs | None], jax.Array]
  metrics: Callable[[nnx.Module, Batch], dict[str, jax.Array]]


def _classification_metrics(logits, labels):
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  return {'loss': loss, 'correct': correct}


def classification_task(
    input_key: str = 'input_ids',
    mask_key: str | None = 'attention_mask',
    label_key: str = 'label',
    type_key: str | None = None,
) -> Task:
  """Sequence classification with an :class:`~fedjax_fm.models.Encoder`.

  Calls ``model(batch[input_key], batch[mask_key], batch[type_key],
  rngs=rngs)`` (mask/type omitted when their key is ``None`` or absent).

  Args:
    input_key: batch key of the ``[B, L]`` token ids.
    mask_key: batch key of the ``[B, L]`` attention mask.
    label_key: batch key of the ``[B]`` integer labels.
    type_key: optional batch key of token type ids.

  Returns:
    A :class:`Task` with metrics ``loss`` and ``correct``.
  """

  def logits_fn(model, batch, rngs):
    mask = batch.get(mask_key) if mask_key is not None else None
    types = batch.get(type_key) if type_key is not None else None
    return model(batch[input_key], mask, types, rngs=rngs)

  def loss(model, batch, rngs):
    logits = logits_fn(model, batch, rngs)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, batch[label_key]
    )

  def metrics(model, batch):
    return _classification_metrics(
        logits_fn(model, batch, None), batch[label_key]
    )

  return Task(loss, metrics)


def features_classification_task(
    x_key: str = 'x', label_key: str = 'label'
) -> Task:
  """Classification of feature vectors with an ``MLPClassifier``.

  Args:
    x_key: batch key of the ``[B, D]`` features.
    label_key: batch key of the ``[B]`` integer labels.

  Returns:
    A :class:`Task` with metrics ``loss`` and ``correct``.
  """

  def loss(model, batch, rngs):
    logits = model(batch[x_key], rngs=rngs)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, batch[label_key]
    )

  def metrics(model, batch):
    return _classification_metrics(model(batch[x_key]), batch[label_key])

  return Task(loss, metrics)


def _lm_terms(model, batch, rngs, ids_key, mask_key, loss_mask_key=None):
  ids = batch[ids_key]
  mask = batch.get(mask_key) if mask_key is not None else None
  logits = model(ids, mask, rngs=rngs)[:, :-1]
  targets = ids[:, 1:]
  if mask is None:
    valid = jnp.ones(targets.shape, jnp.float32)
  else:
    mask = mask.astype(bool)
    valid = (mask[:, 1:] & mask[:, :-1]).astype(jnp.float32)
  if loss_mask_key is not None:
    valid = valid * batch[loss_mask_key][:, 1:].astype(bool)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  num = valid.sum(-1)
  nll_sum = (nll * valid).sum(-1)
  correct_sum = (correct * valid).sum(-1)
  denom = jnp.maximum(num, 1.0)
  return nll_sum, correct_sum, num, denom


def causal_lm_task(
    ids_key: str = 'input_ids',
    mask_key: str | None = 'attention_mask',
    loss_mask_key: str | None = None,
) -> Task:
  """Next-token prediction with a :class:`~fedjax_fm.models.Decoder`.

  Target ``ids[t+1]`` is predicted from position ``t`` and counts when both
  tokens are real (``mask[t] == mask[t+1] == 1``; all count without a mask)
  and, with ``loss_mask_key``, when ``loss_mask[t+1] == 1`` (e.g. only the
  response tokens of instruction tuning, see
  :func:`fedjax_fm.data.tokenize_instructions`).
  The per-example loss is the mean NLL over its valid targets (0 if none).

  Args:
    ids_key: batch key of the ``[B, L]`` token ids.
    mask_key: batch key of the ``[B, L]`` attention mask (optional).
    loss_mask_key: optional batch key of a ``[B, L]`` 0/1 mask of the
      tokens to predict.

  Returns:
    A :class:`Task` with metrics ``loss``, ``accuracy`` (per-example token
    accuracy), and the sums ``nll_sum``, ``correct_tokens``, ``num_tokens``
    for token-weighted aggregation.
  """

  def loss(model, batch, rngs):
    nll_sum, _, _, denom = _lm_terms(
        model, batch, rngs, ids_key, mask_key, loss_mask_key
    )
    return nll_sum / denom

  def metrics(model, batch):
    nll_sum, correct_sum, num, denom = _lm_terms(
        model, batch, None, ids_key, mask_key, loss_mask_key
    )
    return {
        'loss': nll_sum / denom,
        'accuracy': correct_sum / denom,
        'nll_sum': nll_sum,
        'correct_tokens': correct_sum,
        'num_tokens': num,
    }

  return Task(loss, metrics)


def _graphdef(graphdef_or_split: Any):
  return getattr(graphdef_or_split, 'graphdef', graphdef_or_split)


def make_loss_fn(graphdef: Any, task: Task):
  """Builds ``loss_fn(trainable, frozen, batch, key) -> [B]``.

  Args:
    graphdef: an ``nnx.GraphDef`` (or a ``peft.Split``).
    task: the :class:`Task`.

  Returns:
    A pure function of pure-dict pytrees. ``key`` (a PRNG key, or ``None`` for
    deterministic) seeds the ``dropout`` stream.
  """
  graphdef = _graphdef(graphdef)

  def loss_fn(trainable, frozen, batch, key=None):
    model = nnx.merge(graphdef, trainable, frozen)
    rngs = None if key is None else nnx.Rngs(dropout=key)
    return task.loss(model, batch, rngs)

  return loss_fn


def make_eval_fn(graphdef: Any, task: Task):
  """Builds ``eval_fn(trainable, frozen, batch) -> {name: [B]}``."""
  graphdef = _graphdef(graphdef)

  def eval_fn(trainable, frozen, batch):
    model = nnx.merge(graphdef, trainable, frozen)
    return task.metrics(model, batch)

  return eval_fn
