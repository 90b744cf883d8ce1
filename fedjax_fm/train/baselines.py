"""Baselines written beside a run's numbers: majority class, centralised, IID.

A federated model's held-out numbers mean little alone. The "before" line of a
run is the untrained model, not a baseline; these are:

* ``majority``: the majority class of the training labels, predicted for
  every held-out example (``majority_class``); and per client
  (``majority_per_client``), every client predicting its own training
  majority: on its local test data when ``eval.federated_test_fraction > 0``,
  else on the held-out examples of that client (known when the held-out
  examples carry their client, e.g. a natural partition). Classification only.
* ``centralised``: the same experiment with one client holding all the
  training data (`baseline_config`).
* ``iid``: the same experiment with the training examples partitioned IID
  over the same number of clients.

``centralised`` and ``iid`` run through the real `fedjax_fm.train.run` into
``workdir/baseline_<kind>/``; both draw the same held-out set as the run
(the held-out split comes before the partition), so their numbers compare
with the run's. `write_baselines` adds them to ``workdir/summary.json`` under
``'baselines'``::

  summary = train.run(config, workdir)
  baselines.write_baselines(config, workdir, ('majority', 'centralised', 'iid'))
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from fedjax_fm import config as config_lib
from fedjax_fm import evaluation
from fedjax_fm import sharding
from fedjax_fm.data.federated import FederatedDataset
from fedjax_fm.train import logs

__all__ = [
    'KINDS',
    'baseline_config',
    'check_kinds',
    'config_changes',
    'majority_baselines',
    'majority_class',
    'majority_from_task_data',
    'run_baselines',
    'write_baselines',
]

KINDS = ('majority', 'centralised', 'iid')
# What a baseline run's summary contributes (those it has).
_COLLECTED = ('after', 'generation', 'em_normalize', 'generation_clients', 'generation_groups',
              'heldout_clients', 'heldout_groups', 'client_distribution', 'rounds')


# ------------------------------------------------------------------ majority


def majority_class(labels: Any) -> int:
  """The most frequent label (the smallest on ties).

  Args:
    labels: non-empty int labels ``>= 0``.

  Returns:
    The label, an int.
  """
  labels = np.asarray(labels).reshape(-1)
  if labels.size == 0:
    raise ValueError('`labels` is empty: no majority class.')
  if labels.min() < 0:
    raise ValueError(f'`labels` must be >= 0, got {labels.min()}.')
  return int(np.argmax(np.bincount(labels.astype(np.int64))))


def _name(names: Sequence[str], i: int) -> str:
  return str(names[i]) if 0 <= i < len(names) else str(i)


def _per_client(correct_by_client: dict[str, np.ndarray]) -> dict:
  """Pooled accuracy and the distribution over clients of per-client accuracy."""
  acc = np.asarray([c.mean() for c in correct_by_client.values()], np.float64)
  counts = np.asarray([c.size for c in correct_by_client.values()], np.float64)
  total = float(counts.sum())
  pooled = float(sum(c.sum() for c in correct_by_client.values()) / total) if total else 0.0
  return {'accuracy': pooled, 'num_examples': int(total),
          'distribution': {'accuracy': evaluation.distribution(acc, counts)},
          'per_client': {k: float(v) for k, v in zip(correct_by_client, acc)}}


def majority_baselines(
    train: FederatedDataset,
    eval_labels: Any,
    *,
    eval_clients: Sequence[str] | None = None,
    client_names: Sequence[str] = (),
    client_test: FederatedDataset | None = None,
    label_names: Sequence[str] = (),
    label_key: str = 'label',
) -> dict:
  """Majority-class accuracies overall and per client.

  Args:
    train: the clients' training data (``label_key`` labels).
    eval_labels: ``[N]`` held-out labels (those the run's held-out metrics
      score).
    eval_clients: optional ``[N]`` client of each held-out example (names as
      ``client_names``); used for the per-client baseline when there is no
      ``client_test``.
    client_names: the name of each training client (``train`` client ``i`` is
      ``client_names[i]``); needed with ``eval_clients``.
    client_test: optional per-client local test data (client ``i`` of
      ``train`` is client ``i`` here).
    label_names: optional names of the labels.
    label_key: the labels' key in the datasets.

  Returns:
    ``{'majority_class': {'label', 'label_id', 'accuracy', 'num_examples'},
    'majority_per_client': {'accuracy' (pooled over examples), 'num_examples',
    'distribution': {'accuracy': distribution over clients}, 'per_client':
    {client: accuracy}, 'evaluated_on': 'local test data' | 'held-out
    examples', 'clients_without_training_data'}}``; ``majority_per_client``
    is absent when neither ``client_test`` nor ``eval_clients`` is given.
    A client without training labels predicts the overall majority.
  """
  labels = np.asarray(train.arrays[label_key]).astype(np.int64)
  eval_labels = np.asarray(eval_labels).astype(np.int64).reshape(-1)
  overall = majority_class(labels)
  out = {'majority_class': {
      'label': _name(label_names, overall), 'label_id': overall,
      'accuracy': float(np.mean(eval_labels == overall)) if eval_labels.size else 0.0,
      'num_examples': int(eval_labels.size)}}
  sizes = train.client_sizes
  client_of = np.repeat(np.arange(train.num_clients), sizes)
  own = np.full(train.num_clients, overall, np.int64)
  for c in np.flatnonzero(sizes):
    own[c] = majority_class(labels[client_of == c])
  if client_test is not None:
    if client_test.num_clients != train.num_clients:
      raise ValueError(f'`client_test` has {client_test.num_clients} clients, `train` '
                       f'{train.num_clients}.')
    test_labels = np.asarray(client_test.arrays[label_key]).astype(np.int64)
    test_client = np.repeat(np.arange(client_test.num_clients), client_test.client_sizes)
    names = list(client_names) if len(client_names) == train.num_clients else [
        str(i) for i in range(train.num_clients)]
    correct = {names[c]: (test_labels[test_client == c] == own[c]).astype(np.float64)
               for c in np.flatnonzero(client_test.client_sizes)}
    per = _per_client(correct)
    per['evaluated_on'] = 'local test data'
    per['clients_without_training_data'] = int(np.sum((sizes == 0)
                                                      & (client_test.client_sizes > 0)))
    out['majority_per_client'] = per
  elif eval_clients is not None:
    eval_clients = np.asarray(eval_clients).astype(str).reshape(-1)
    if eval_clients.size != eval_labels.size:
      raise ValueError(f'`eval_clients` has {eval_clients.size} values for '
                       f'{eval_labels.size} held-out labels.')
    index = {str(n): i for i, n in enumerate(client_names)}
    correct, unseen = {}, 0
    for name in np.unique(eval_clients):
      c = index.get(str(name))
      pred = overall if c is None or sizes[c] == 0 else own[c]
      unseen += c is None or sizes[c] == 0
      correct[str(name)] = (eval_labels[eval_clients == name] == pred).astype(np.float64)
    per = _per_client(correct)
    per['evaluated_on'] = 'held-out examples'
    per['clients_without_training_data'] = int(unseen)
    out['majority_per_client'] = per
  return out


def majority_from_task_data(config, task_data) -> dict:
  """:func:`majority_baselines` of a run's task data (classification only).

  Scores the held-out examples the run's held-out metrics score (the leading
  ``eval.max_examples``). Reads ``TaskData.eval_clients`` and
  ``TaskData.client_names`` where the task data carries them.
  """
  labels = np.asarray(task_data.eval['label'])
  n = min(len(labels), config.eval.max_examples) if config.eval.max_examples else len(labels)
  eval_clients = getattr(task_data, 'eval_clients', None)
  if eval_clients is not None:
    eval_clients = list(eval_clients)[:n]
  return majority_baselines(
      task_data.train, labels[:n], eval_clients=eval_clients,
      client_names=tuple(getattr(task_data, 'client_names', ()) or ()),
      client_test=task_data.client_test, label_names=tuple(task_data.label_names or ()))


# ----------------------------------------------------- centralised and IID


def _client_key(d) -> str:
  """The client field of the natural partition (its default when data.client_key is empty)."""
  if d.client_key:
    return d.client_key
  return 'category' if d.source in config_lib.INSTRUCTION_SOURCES else 'module'


def _flat(c, prefix: str = '') -> dict[str, Any]:
  out = {}
  for k in c.keys():
    v = c[k]
    if isinstance(v, ml_collections.ConfigDict):
      out.update(_flat(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def config_changes(config, other) -> dict[str, list]:
  """``{field: [value in config, value in other]}`` of the fields that differ."""
  a, b = _flat(config), _flat(other)
  return {k: [a[k], b[k]] for k in a if k in b and a[k] != b[k]}


def baseline_config(config: ml_collections.ConfigDict, kind: str,
                    num_clients: int | None = None) -> ml_collections.ConfigDict:
  """The config of the same experiment run as a centralised or an IID baseline.

  ``'iid'``: ``data.partition="iid"`` over ``num_clients`` clients (default
  ``data.num_clients``; pass the run's number of clients for a natural
  partition, whose client count comes from the data); nothing else changes.

  ``'centralised'``: one client holding all the training data
  (``data.partition="iid"``, ``data.num_clients=1``,
  ``fl.clients_per_round=1``, ``fl.chunk_size=1``, the sharded strategy
  replaced by ``chunked``), with ``fl.local_steps`` multiplied by
  ``fl.clients_per_round``: each round trains on as many examples (``K * S``
  batches of ``B``) as a round of the federated run, in one sequence of
  ``K * S`` optimizer steps, and the server optimizer applies that one
  client's update. With ``fl.max_epochs`` the single client's cap (epochs of
  all the data) is never below the federated clients' caps together, so no
  round sees fewer examples. Parts that only exist across clients are off:
  privacy, attacks, robust or secure aggregation (``aggregator.name="mean"``),
  compression, personalisation.

  Both keep the held-out split: with ``data.eval_split="clients"`` of a
  natural partition, ``data.client_key`` is set to the partition's client
  field so the same whole clients are held out.

  Args:
    config: the run's config (not modified).
    kind: ``'centralised'`` or ``'iid'``.
    num_clients: ``'iid'``: the number of clients (default
      ``data.num_clients``).

  Returns:
    A new, validated ConfigDict.

  Raises:
    ValueError: on an unknown kind.
    ConfigError: when the baseline's config is invalid.
  """
  if kind not in ('centralised', 'iid'):
    raise ValueError(f'`kind` must be "centralised" or "iid", got {kind!r}.')
  c = copy.deepcopy(config)
  d, f = c.data, c.fl
  if d.eval_split == 'clients' and d.partition == 'natural' and not d.client_key:
    d.client_key = _client_key(d)
  d.partition = 'iid'
  if kind == 'iid':
    if num_clients is not None:
      d.num_clients = int(num_clients)
  else:
    d.num_clients = 1
    f.local_steps = f.local_steps * f.clients_per_round
    f.clients_per_round = 1
    f.chunk_size = 1
    if f.strategy == 'sharded':
      f.strategy = 'chunked'
      f.model_axis = 1
    c.privacy.enabled = False
    c.attack.kind = 'none'
    c.attack.fraction = 0.0
    c.aggregator.name = 'mean'
    c.compress.uplink = 'identity'
    c.compress.downlink = 'identity'
    c.compress.then = 'none'
    c.compress.error_feedback = False
    c.eval.personalize_steps = 0
  config_lib.validate(c, num_devices=1)
  return c


def _num_clients(config, workdir: str) -> int | None:
  """The run's number of clients: from its summary, else from its task data."""
  try:
    with open(os.path.join(workdir, 'summary.json')) as fh:
      n = json.load(fh).get('num_clients')
    if isinstance(n, int):
      return n
  except (OSError, json.JSONDecodeError, AttributeError):
    pass
  return None


def _task_data(config):
  """The run's task data (built in a scratch directory), local test split included."""
  from fedjax_fm.train import build  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as scratch:
    return build.split_task_data(config, build.build_task_data(config, scratch))


def _collect(summary: dict) -> dict:
  return {k: summary[k] for k in _COLLECTED if k in summary}


def check_kinds(kinds: Sequence[str]) -> list[str]:
  """The baseline names of ``kinds`` (stripped, empty ones dropped), all from :data:`KINDS`.

  Raises:
    ValueError: naming the unknown ones and the allowed names.
  """
  if isinstance(kinds, str):
    kinds = kinds.split(',')
  kinds = [str(k).strip() for k in kinds if str(k).strip()]
  unknown = [k for k in kinds if k not in KINDS]
  if unknown:
    raise ValueError(f'--baselines: unknown baseline(s) {", ".join(unknown)}; allowed: '
                     f'{", ".join(KINDS)}')
  return kinds


def run_baselines(config: ml_collections.ConfigDict, workdir: str,
                  kinds: Sequence[str]) -> dict:
  """Computes or runs the baselines ``kinds`` of the experiment of ``config``.

  Args:
    config: the run's config.
    workdir: the run's workdir; ``centralised`` and ``iid`` run (and resume)
      in ``workdir/baseline_<kind>/``.
    kinds: names from :data:`KINDS`.

  Returns:
    ``{'majority_class': ..., 'majority_per_client': ...}`` (``majority``;
    classification only, else ``{'majority': 'skipped: ...'}``) and
    ``{kind: {'after': held-out metrics, ... the baseline summary's
    generation / per-client / per-group entries, 'workdir', 'changes':
    {field: [run value, baseline value]}}}`` for ``centralised`` and ``iid``.

  Raises:
    ValueError: on an unknown kind.
  """
  kinds = check_kinds(kinds)
  out: dict[str, Any] = {}
  task_data = None
  if 'majority' in kinds:
    if config.data.task != 'classification':
      out['majority'] = f'skipped: data.task={config.data.task!r} is not classification'
    else:
      task_data = _task_data(config)
      out.update(majority_from_task_data(config, task_data))
      m = out['majority_class']
      msg = (f'baseline majority class ({m["label"]}): held-out accuracy '
             f'{m["accuracy"]:.4f}')
      if 'majority_per_client' in out:
        p = out['majority_per_client']
        msg += (f'; per-client majority ({p["evaluated_on"]}): accuracy {p["accuracy"]:.4f}, '
                f'p10 {p["distribution"]["accuracy"]["p10"]:.4f}')
      logs.log(msg)
  from fedjax_fm.train import loop  # pylint: disable=g-import-not-at-top
  for kind in ('centralised', 'iid'):
    if kind not in kinds:
      continue
    num_clients = None
    if kind == 'iid' and config.data.partition == 'natural':
      num_clients = _num_clients(config, workdir)
      if num_clients is None:
        task_data = task_data or _task_data(config)
        num_clients = task_data.train.num_clients
    cfg = baseline_config(config, kind, num_clients)
    sub = os.path.join(workdir, f'baseline_{kind}')
    changes = config_changes(config, cfg)
    if kind == 'iid' and not changes:
      out[kind] = {'same_as_run': True, 'changes': {}}
      logs.log('baseline iid: the run is already IID; nothing to run')
      continue
    logs.log(f'baseline {kind}: ' + ', '.join(f'{k}={v[1]!r}' for k, v in changes.items()))
    summary = loop.run(cfg, sub)
    out[kind] = {**_collect(summary), 'workdir': sub, 'changes': changes}
    logs.log(f'baseline {kind}: held-out ' + logs.fmt_metrics(summary['after']))
  return out


def write_baselines(config: ml_collections.ConfigDict, workdir: str,
                    kinds: Sequence[str]) -> dict:
  """`run_baselines`, merged into ``workdir/summary.json`` under ``'baselines'``.

  Returns:
    The baselines dict (process 0 writes the summary).
  """
  result = run_baselines(config, workdir, kinds)
  path = os.path.join(workdir, 'summary.json')
  if sharding.is_main_process():
    try:
      with open(path) as fh:
        summary = json.load(fh)
    except (OSError, json.JSONDecodeError):
      summary = {}
    summary['baselines'] = {**summary.get('baselines', {}), **result}
    with open(path + '.tmp', 'w') as fh:
      json.dump(summary, fh, indent=2)
    os.replace(path + '.tmp', path)
  return result
