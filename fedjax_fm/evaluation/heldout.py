"""The held-out split of a data set: by examples, by whole clients, or by a group field.

A pure function of per-example values and the config, run before the training
examples are partitioned over clients (and before a tokenizer is trained on
them), so that every run of the same data, seed and split (federated,
centralised, IID) is scored on the same held-out examples::

  split = heldout_split(config, n, clients=client_values, groups=group_values)
  train_rows, eval_rows = split.train, split.eval

``config.data.eval_split`` chooses the split:

* ``'examples'``: a seeded random ``data.eval_fraction`` of the examples;
* ``'clients'``: whole clients (unseen clients): a seeded ``data.eval_fraction``
  of the distinct values of the client field (``data.client_key``), every
  example of those clients;
* ``'group'``: every example whose ``data.eval_group_key`` field takes one of
  ``data.eval_group_values`` (e.g. a year, a domain, a language), or, when
  that is empty, of a seeded ``data.eval_fraction`` of the field's distinct
  values.

The training indices are sorted; the held-out indices come in random order,
so that the leading ``eval.max_examples`` of them are a random sample too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from fedjax_fm import config as config_lib

__all__ = [
    'EVAL_SPLITS',
    'HeldOut',
    'field_values',
    'heldout_split',
    'split_by_examples',
    'split_by_values',
]

EVAL_SPLITS = ('examples', 'clients', 'group')


@dataclasses.dataclass(frozen=True)
class HeldOut:
  """A held-out split.

  Attributes:
    train: sorted int64 indices of the training examples.
    eval: int64 indices of the held-out examples, in random order.
    held_out: the held-out clients or group values (sorted; empty for
      ``'examples'``).
    description: a phrase for the run's data description (``''`` for
      ``'examples'``), e.g. ``'; 2 of 8 clients held out (a, b)'``.
  """

  train: np.ndarray
  eval: np.ndarray
  held_out: tuple[str, ...] = ()
  description: str = ''


def _check_fraction(fraction: Any, field: str) -> float:
  if isinstance(fraction, bool) or not isinstance(
      fraction, (int, float, np.integer, np.floating)) or not 0.0 < float(fraction) < 1.0:
    raise config_lib.ConfigError(
        f'config.{field}={fraction!r} is invalid: must be a fraction in (0, 1)')
  return float(fraction)


def split_by_examples(n: int, fraction: float, seed: int) -> HeldOut:
  """A seeded random ``fraction`` of ``n`` examples held out.

  ``perm = np.random.default_rng(seed).permutation(n)``; the first
  ``max(1, round(n * fraction))`` of it are held out (in that order), the rest
  train.

  Args:
    n: number of examples (>= 2).
    fraction: held-out fraction in ``(0, 1)``.
    seed: integer seed.

  Returns:
    A :class:`HeldOut`.
  """
  fraction = _check_fraction(fraction, 'data.eval_fraction')
  if n < 2:
    raise config_lib.ConfigError(
        f'config.data.eval_fraction={fraction} is invalid: the data has {n} example(s); a '
        'held-out split needs at least 2')
  perm = np.random.default_rng(seed).permutation(n)
  n_eval = max(1, int(round(n * fraction)))
  if n_eval >= n:
    raise config_lib.ConfigError(
        f'config.data.eval_fraction={fraction} is invalid: it holds out all {n} examples')
  return HeldOut(train=np.sort(perm[n_eval:]).astype(np.int64),
                 eval=perm[:n_eval].astype(np.int64))


def _shown(values: Sequence[str], limit: int = 10) -> str:
  shown = ', '.join(str(v) for v in values[:limit])
  return shown + (f', ... ({len(values)} in all)' if len(values) > limit else '')


def split_by_values(values: np.ndarray, seed: int, *, fraction: float = 0.2,
                    held: Sequence[Any] = (), what: str = 'clients',
                    field: str = 'data.eval_fraction', key: str = '',
                    min_train_values: int = 1) -> HeldOut:
  """Holds out every example of some distinct values of a per-example field.

  With ``held`` empty, ``max(1, round(k * fraction))`` of the ``k`` distinct
  values are drawn, with ``rng = np.random.default_rng(seed)``, as the first
  ones of ``rng.permutation(sorted distinct values)``; the held-out examples
  are then ``rng.permutation`` of their indices. With ``held`` given, exactly
  those values are held out (the same ``rng`` orders the examples).

  Args:
    values: ``[N]`` per-example values (compared as strings).
    seed: integer seed.
    fraction: share of the distinct values held out when ``held`` is empty.
    held: the values to hold out (strings or ints, compared as strings).
    what: what the values are, for messages (``'clients'``, ``'groups'``).
    field: the config field named when the split is impossible.
    key: the data field the values come from, for messages.
    min_train_values: distinct values that must be left to train.

  Returns:
    A :class:`HeldOut` whose ``held_out`` are the held-out values.

  Raises:
    ConfigError: naming ``field`` when nothing would be held out or too little
      would be left to train.
  """
  values = np.asarray(values).astype(str)
  if values.ndim != 1:
    raise ValueError(f'`values` must be 1-D [num_examples], got shape {values.shape}.')
  names = np.unique(values)
  of_key = f' (distinct values of the field {key!r})' if key else ''
  rng = np.random.default_rng(seed)
  if len(held):
    wanted = np.unique(np.asarray([str(v) for v in held]))
    missing = [v for v in wanted if v not in set(names)]
    if missing:
      raise config_lib.ConfigError(
          f'config.{field}={tuple(held)!r} is invalid: {_shown(missing)} not among the '
          f'{len(names)} {what}{of_key}: {_shown(list(names))}')
    chosen = wanted
  else:
    fraction = _check_fraction(fraction, field)
    n_eval = max(1, int(round(len(names) * fraction)))
    chosen = np.sort(rng.permutation(names)[:n_eval])
  left = len(names) - len(chosen)
  if left < max(min_train_values, 1):
    raise config_lib.ConfigError(
        f'config.{field}={held and tuple(held) or fraction!r} is invalid: holding out '
        f'{len(chosen)} of the {len(names)} {what}{of_key} leaves {left} to train '
        f'(at least {max(min_train_values, 1)} needed)')
  is_eval = np.isin(values, chosen)
  eval_idx = rng.permutation(np.flatnonzero(is_eval)).astype(np.int64)
  train_idx = np.flatnonzero(~is_eval).astype(np.int64)
  held_out = tuple(str(v) for v in chosen)
  return HeldOut(train=train_idx, eval=eval_idx, held_out=held_out,
                 description=(f'; {len(chosen)} of {len(names)} {what} held out '
                              f'({", ".join(held_out)})'))


def field_values(arrays: dict[str, Any], key: str, field: str) -> np.ndarray:
  """``arrays[key]`` as strings, or a ConfigError naming ``config.<field>``.

  Args:
    arrays: the data's per-example fields.
    key: the field's name.
    field: the config field that named it (e.g. ``'data.eval_group_key'``).

  Returns:
    A ``[N]`` str array.
  """
  if key not in arrays:
    raise config_lib.ConfigError(
        f'config.{field}={key!r} is invalid: not a field of the data; fields: '
        f'{sorted(arrays)}')
  return np.asarray(arrays[key]).astype(str)


def heldout_split(config, n: int | None = None, *, clients: Any = None,
                  groups: Any = None, client_key: str = '') -> HeldOut:
  """The held-out split that ``config.data`` asks for.

  Args:
    config: the experiment config (reads ``seed``, ``fl.clients_per_round``
      and ``data.eval_split``, ``eval_fraction``, ``eval_group_key``,
      ``eval_group_values``).
    n: number of examples (taken from ``clients`` or ``groups`` when None).
    clients: ``[N]`` client field values (``eval_split='clients'``).
    groups: ``[N]`` values of ``data.eval_group_key`` (``eval_split='group'``).
    client_key: the client field's name, for messages.

  Returns:
    A :class:`HeldOut`. ``'examples'`` draws exactly as
    :func:`split_by_examples`; ``'clients'`` leaves at least
    ``fl.clients_per_round`` clients to train.

  Raises:
    ConfigError: naming the field when the split is impossible or its values
      are missing.
  """
  d = config.data
  mode = d.eval_split
  if mode not in EVAL_SPLITS:
    raise config_lib.ConfigError(
        f'config.data.eval_split={mode!r} is invalid: must be one of {EVAL_SPLITS}')
  if n is None:
    for v in (clients, groups):
      if v is not None:
        n = len(v)
        break
  if n is None:
    raise ValueError('`n` is needed when neither `clients` nor `groups` is given.')
  for name, v in (('clients', clients), ('groups', groups)):
    if v is not None and len(v) != n:
      raise ValueError(f'`{name}` has {len(v)} values for {n} examples.')
  if mode == 'examples':
    return split_by_examples(n, d.eval_fraction, config.seed)
  if mode == 'clients':
    if clients is None:
      raise config_lib.ConfigError(
          'config.data.eval_split="clients" is invalid: the data has no client field; set '
          'config.data.client_key')
    cpr = config.fl.clients_per_round
    names = np.unique(np.asarray(clients).astype(str))
    n_eval = max(1, int(round(len(names) * _check_fraction(d.eval_fraction,
                                                           'data.eval_fraction'))))
    if len(names) - n_eval < cpr:
      raise config_lib.ConfigError(
          f'config.data.eval_fraction={d.eval_fraction} is invalid: holding out {n_eval} of '
          f'the {len(names)} clients (distinct values of the field {client_key!r}) leaves '
          f'fewer than config.fl.clients_per_round={cpr} to train; lower '
          'config.data.eval_fraction or config.fl.clients_per_round, or set '
          'config.data.client_key to a field with more distinct values')
    return split_by_values(clients, config.seed, fraction=d.eval_fraction, what='clients',
                           field='data.eval_fraction', key=client_key)
  if groups is None:
    raise config_lib.ConfigError(
        f'config.data.eval_group_key={d.eval_group_key!r} is invalid: data.eval_split='
        '"group" needs the field whose values make the groups')
  held = tuple(d.eval_group_values)
  return split_by_values(groups, config.seed, fraction=d.eval_fraction, held=held,
                         what='groups',
                         field='data.eval_group_values' if held else 'data.eval_fraction',
                         key=d.eval_group_key)
