"""System heterogeneity: local step budgets, dropout and deadlines, seeded per client.

Clients of a real federation differ in compute and availability. This module
draws, for each sampled client of a round, how many of its ``local_steps`` it
completes and whether its update arrives at all, and applies that to the
round's padded data (`apply_to_round`), so every execution strategy and every
algorithm (FedAvg, FedProx, FedNova, SCAFFOLD) sees the same schedule::

  budget_i  = the client's step budget (``step_budget``, below)
  steps_i   = min(budget_i, floor(deadline * speed_i))       (with a deadline)
  reports_i = not dropped_i and steps_i >= 1

* ``step_budget``: ``none`` (every client runs ``local_steps``); ``uniform``
  (uniform over the integers ``[step_budget_min, local_steps]``, drawn per
  round); ``lognormal`` (``round(local_steps * exp(sigma z - sigma^2 / 2))``
  with ``z ~ N(0, 1)`` drawn per round: the uncapped budget has mean
  ``local_steps``; clipped to ``[step_budget_min, local_steps]``); ``tiers``
  (each client belongs to one tier for the whole run, drawn uniformly from
  ``step_budget_tiers``, fractions of ``local_steps``: budget
  ``max(step_budget_min, ceil(fraction * local_steps))``).
* ``dropout``: probability, per client and round, that the client drops out
  mid-round: its update never arrives (the model usual in the literature; the
  server neither waits for nor receives a partial update). It is masked out of
  the round (``client_mask`` False): it sends nothing, adds no bytes and its
  per-client state (error feedback, SCAFFOLD's control variate) is unchanged.
* ``deadline`` (> 0, in step units): every client has a fixed speed (steps per
  unit of time, ``exp(speed_sigma z)`` drawn once per client for the run) and
  completes ``floor(deadline * speed)`` steps at most. A client that completes
  no step does not report (as a dropped client).

Every draw is a pure function of ``(seed, round, client_id)`` (speeds and tiers
of ``(seed, client_id)``), so resuming a run and changing the strategy, the
chunk size or the devices give the same schedule. Aggregation weights are left
as they are (the clients' data weights): heterogeneity changes how much each
client computes, not how much its data counts.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

STEP_BUDGETS = ('none', 'uniform', 'lognormal', 'tiers')

# Distinct streams of the per-client draws.
_BUDGET, _DROPOUT, _SPEED, _TIER = 1, 2, 3, 4


class SystemHeterogeneity(NamedTuple):
  """How the clients' compute and availability vary (see the module docstring)."""
  step_budget: str = 'none'
  step_budget_min: int = 1
  step_budget_sigma: float = 0.5
  step_budget_tiers: tuple[float, ...] = (1.0, 0.5, 0.25)
  dropout: float = 0.0
  deadline: float = 0.0
  speed_sigma: float = 0.5

  @property
  def active(self) -> bool:
    return self.step_budget != 'none' or self.dropout > 0 or self.deadline > 0


def check(het: SystemHeterogeneity, local_steps: int) -> None:
  """Raises ValueError naming the bad field of ``het``."""
  if het.step_budget not in STEP_BUDGETS:
    raise ValueError(f'step_budget={het.step_budget!r} is unknown; allowed: {STEP_BUDGETS}')
  if not 1 <= het.step_budget_min <= local_steps:
    raise ValueError(f'step_budget_min={het.step_budget_min} must be in [1, local_steps='
                     f'{local_steps}]')
  if het.step_budget_sigma < 0 or het.speed_sigma < 0:
    raise ValueError('step_budget_sigma and speed_sigma must be >= 0')
  if not het.step_budget_tiers or any(not 0 < t <= 1 for t in het.step_budget_tiers):
    raise ValueError(f'step_budget_tiers={het.step_budget_tiers!r} must be fractions in '
                     '(0, 1]')
  if not 0 <= het.dropout < 1:
    raise ValueError(f'dropout={het.dropout} must be in [0, 1)')
  if het.deadline < 0:
    raise ValueError(f'deadline={het.deadline} must be >= 0 (0: no deadline)')


def _rng(seed: int, stream: int, *words: int) -> np.random.Generator:
  return np.random.default_rng(np.random.SeedSequence([seed, stream] + [int(w) for w in words]))


def client_speeds(het: SystemHeterogeneity, seed: int, client_ids) -> np.ndarray:
  """Each client's fixed speed (steps per unit of time), ``exp(speed_sigma z)``."""
  return np.asarray([np.exp(het.speed_sigma * _rng(seed, _SPEED, c).standard_normal())
                     for c in np.asarray(client_ids)], np.float64)


def client_schedule(het: SystemHeterogeneity, local_steps: int, seed: int, round_idx: int,
                    client_ids) -> tuple[np.ndarray, np.ndarray]:
  """Steps each client completes and whether its update arrives.

  Args:
    het: the heterogeneity model.
    local_steps: the round's local steps (the most any client runs).
    seed: the run's seed.
    round_idx: the round.
    client_ids: int ``[C]`` global client ids.

  Returns:
    ``(steps int32 [C], reports bool [C])``: a client that does not report
    completes 0 steps.
  """
  check(het, local_steps)
  ids = np.asarray(client_ids, np.int64)
  lo = het.step_budget_min
  budget = np.full(ids.shape, local_steps, np.int64)
  for i, c in enumerate(ids):
    if het.step_budget == 'uniform':
      budget[i] = _rng(seed, _BUDGET, round_idx, c).integers(lo, local_steps + 1)
    elif het.step_budget == 'lognormal':
      z = _rng(seed, _BUDGET, round_idx, c).standard_normal()
      s = het.step_budget_sigma
      budget[i] = np.clip(np.round(local_steps * np.exp(s * z - 0.5 * s * s)), lo, local_steps)
    elif het.step_budget == 'tiers':
      tiers = het.step_budget_tiers
      frac = tiers[int(_rng(seed, _TIER, c).integers(len(tiers)))]
      budget[i] = min(local_steps, max(lo, int(np.ceil(frac * local_steps - 1e-9))))
  steps = budget
  if het.deadline > 0:
    reach = np.floor(het.deadline * client_speeds(het, seed, ids) + 1e-9).astype(np.int64)
    steps = np.minimum(steps, reach)
  dropped = np.zeros(ids.shape, bool)
  if het.dropout > 0:
    dropped = np.asarray([_rng(seed, _DROPOUT, round_idx, c).random() < het.dropout
                          for c in ids], bool)
  reports = ~dropped & (steps >= 1)
  return np.where(reports, steps, 0).astype(np.int32), reports


def apply_to_round(round_data: dict, het: SystemHeterogeneity, local_steps: int, *, seed: int,
                   round_idx: int) -> dict:
  """The round's data with the clients' schedule applied (host side, NumPy).

  ``step_mask`` keeps only each client's first ``steps_i`` steps (and
  ``example_mask`` the examples of those steps); a client that does not report
  gets ``client_mask`` False. Adds ``dropped`` (bool ``[C]``: real clients whose
  update does not arrive), which the round counts in its metrics
  (``dropped_clients``, ``mean_steps``). With an inactive ``het`` the data is
  returned unchanged.
  """
  if not het.active:
    return round_data
  out = dict(round_data)
  ids = np.asarray(round_data['client_id'])
  real = np.asarray(round_data.get('client_mask', np.asarray(round_data['weight']) > 0), bool)
  steps, reports = client_schedule(het, local_steps, seed, round_idx, ids)
  num_steps = np.asarray(round_data['step_mask']).shape[1]
  keep = np.arange(num_steps)[None, :] < steps[:, None]
  step_mask = np.asarray(round_data['step_mask'], bool) & keep
  out['step_mask'] = step_mask
  out['example_mask'] = np.asarray(round_data['example_mask'], bool) & step_mask[..., None]
  out['client_mask'] = real & reports
  out['dropped'] = real & ~reports
  return out
