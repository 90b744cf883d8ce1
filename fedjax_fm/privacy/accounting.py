"""Privacy accounting for DP-FedAvg with `dp_accounting` (RDP or PLD).

One round of DP-FedAvg (`fedjax_fm.privacy.gaussian_dp`) is a sampled Gaussian
mechanism at the client (user) level:

* ``sampling='poisson'``: every client joins independently with probability
  ``q``; the event is ``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` under the
  add-or-remove-one relation (McMahan et al. 2018). RDP and PLD both support it.
* ``sampling='fixed'``: ``m = round(q N)`` clients drawn uniformly without
  replacement out of a known population ``N`` (what `fedjax_fm.engine` samples);
  the event is ``SampledWithoutReplacementDpEvent(N, m, GaussianDpEvent(z / 2))``
  under the replace-one relation (Wang, Balle, Kasiviswanathan 2019). The ``/ 2``
  is the sensitivity: replacing one client changes the sum of updates clipped to
  ``C`` by up to ``2 C``, and dp_accounting's noise multiplier is relative to the
  sensitivity under the accountant's relation, so noise ``z C`` is a multiplier
  of ``z / 2``. Only the RDP accountant supports this event; ``accountant='pld'``
  with ``sampling='fixed'`` raises a ValueError (use ``'rdp'``, or account the
  fixed-size sample as Poisson, which is an approximation, not a bound).

``steps`` rounds compose as ``SelfComposedDpEvent(event, steps)``.

References:
  * McMahan et al. 2018, https://arxiv.org/abs/1710.06963
  * Mironov 2017, "Renyi Differential Privacy", https://arxiv.org/abs/1702.07476
  * Mironov, Talwar, Zhang 2019, "Renyi Differential Privacy of the Sampled
    Gaussian Mechanism", https://arxiv.org/abs/1908.10530
  * Wang, Balle, Kasiviswanathan 2019, "Subsampled Renyi Differential Privacy
    and Analytical Moments Accountant", https://arxiv.org/abs/1808.00087
  * Koskela, Jalko, Honkela 2020, "Computing Tight Differential Privacy
    Guarantees Using FFT" (PLD), https://arxiv.org/abs/1906.03049
  * Doroshenko et al. 2022, "Connect the Dots: Tighter Discrete Approximations
    of Privacy Loss Distributions", https://arxiv.org/abs/2207.04380
"""

from __future__ import annotations

from typing import Optional

import dp_accounting
from dp_accounting import pld as dp_pld
from dp_accounting import rdp as dp_rdp

ACCOUNTANTS = ('rdp', 'pld')
SAMPLINGS = ('poisson', 'fixed')

_Rel = dp_accounting.NeighboringRelation


def _check_common(noise_multiplier, sampling_rate, accountant, sampling,
                  population):
  if not noise_multiplier >= 0:
    raise ValueError(
        f'noise_multiplier must be >= 0; got {noise_multiplier!r}.')
  if not 0.0 < sampling_rate <= 1.0:
    raise ValueError(
        f'sampling_rate must be in (0, 1]; got {sampling_rate!r}.')
  if accountant not in ACCOUNTANTS:
    raise ValueError(
        f'accountant must be one of {ACCOUNTANTS}; got {accountant!r}.')
  if sampling not in SAMPLINGS:
    raise ValueError(f'sampling must be one of {SAMPLINGS}; got {sampling!r}.')
  if sampling == 'fixed':
    if accountant == 'pld':
      raise ValueError(
          "accountant='pld' does not support sampling='fixed' (dp_accounting's "
          "PLD accountant has no SampledWithoutReplacementDpEvent); use "
          "accountant='rdp'.")
    if population is None or int(population) != population or population < 1:
      raise ValueError(
          "population must be a positive integer with sampling='fixed'; got "
          f'{population!r}.')
    if round(sampling_rate * population) < 1:
      raise ValueError(
          f'sampling_rate * population must round to >= 1 client; got '
          f'{sampling_rate!r} * {population!r}.')


def _check_delta(delta):
  if not 0.0 < delta < 1.0:
    raise ValueError(f'delta must be in (0, 1); got {delta!r}.')


def _check_steps(steps):
  if int(steps) != steps or steps < 0:
    raise ValueError(f'steps must be a non-negative integer; got {steps!r}.')


def dp_event(noise_multiplier: float, sampling_rate: float, *,
             sampling: str = 'poisson',
             population: Optional[int] = None) -> dp_accounting.DpEvent:
  """The `dp_accounting.DpEvent` of one DP-FedAvg round.

  Args:
    noise_multiplier: ``z``: noise standard deviation on the sum of clipped
      updates divided by the clip bound ``C``.
    sampling_rate: ``q`` in (0, 1]: Poisson rate, or sample size / population.
    sampling: ``'poisson'`` or ``'fixed'`` (see the module docstring).
    population: Number of clients ``N``; required for ``'fixed'``.

  Returns:
    ``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` or
    ``SampledWithoutReplacementDpEvent(N, round(q N), GaussianDpEvent(z / 2))``.

  Raises:
    ValueError: naming the offending argument.
  """
  _check_common(noise_multiplier, sampling_rate, 'rdp', sampling, population)
  if sampling == 'poisson':
    return dp_accounting.PoissonSampledDpEvent(
        sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier))
  return dp_accounting.SampledWithoutReplacementDpEvent(
      int(population), int(round(sampling_rate * population)),
      dp_accounting.GaussianDpEvent(noise_multiplier / 2.0))


def make_accountant(accountant: str = 'rdp', sampling: str = 'poisson'
                    ) -> dp_accounting.PrivacyAccountant:
  """A fresh dp_accounting accountant with the relation that ``sampling`` needs.

  Args:
    accountant: ``'rdp'`` or ``'pld'``.
    sampling: ``'poisson'`` (add-or-remove-one) or ``'fixed'`` (replace-one).

  Returns:
    A `dp_accounting.PrivacyAccountant`.

  Raises:
    ValueError: for unknown values or the unsupported ``('pld', 'fixed')``.
  """
  if accountant not in ACCOUNTANTS:
    raise ValueError(
        f'accountant must be one of {ACCOUNTANTS}; got {accountant!r}.')
  if sampling not in SAMPLINGS:
    raise ValueError(f'sampling must be one of {SAMPLINGS}; got {sampling!r}.')
  relation = _Rel.ADD_OR_REMOVE_ONE if sampling == 'poisson' else _Rel.REPLACE_ONE
  if accountant == 'rdp':
    return dp_rdp.RdpAccountant(neighboring_relation=relation)
  if sampling == 'fixed':
    raise ValueError(
        "accountant='pld' does not support sampling='fixed'; use "
        "accountant='rdp'.")
  return dp_pld.PLDAccountant(neighboring_relation=relation)


def epsilon(noise_multiplier: float, sampling_rate: float, steps: int,
            delta: float, *, accountant: str = 'rdp',
            sampling: str = 'poisson',
            population: Optional[int] = None) -> float:
  """Epsilon of ``steps`` DP-FedAvg rounds at ``delta``.

  Args:
    noise_multiplier: ``z >= 0`` (0 gives ``inf``).
    sampling_rate: ``q`` in (0, 1].
    steps: Number of rounds (>= 0).
    delta: Target delta in (0, 1).
    accountant: ``'rdp'`` or ``'pld'``.
    sampling: ``'poisson'`` or ``'fixed'``.
    population: Number of clients; required for ``'fixed'``.

  Returns:
    Epsilon (``inf`` for no noise, 0 for no steps).

  Raises:
    ValueError: naming the offending argument.
  """
  _check_common(noise_multiplier, sampling_rate, accountant, sampling,
                population)
  _check_delta(delta)
  _check_steps(steps)
  if steps == 0:
    return 0.0
  acc = make_accountant(accountant, sampling)
  event = dp_event(noise_multiplier, sampling_rate, sampling=sampling,
                   population=population)
  acc.compose(dp_accounting.SelfComposedDpEvent(event, int(steps)))
  return float(acc.get_epsilon(delta))


def noise_multiplier_for_epsilon(target_epsilon: float, sampling_rate: float,
                                 steps: int, delta: float, *,
                                 accountant: str = 'rdp',
                                 sampling: str = 'poisson',
                                 population: Optional[int] = None,
                                 tol: float = 1e-4) -> float:
  """Smallest noise multiplier whose ``epsilon`` is at most ``target_epsilon``.

  Brackets the answer by doubling/halving (for PLD, starting from the RDP
  answer, an upper bound), then calls `dp_accounting.calibrate_dp_mechanism`
  (a bracketed root search on the epsilon gap, which decreases with ``z``).

  Args:
    target_epsilon: Target epsilon (> 0).
    sampling_rate: ``q`` in (0, 1].
    steps: Number of rounds (>= 1).
    delta: Target delta in (0, 1).
    accountant: ``'rdp'`` or ``'pld'``.
    sampling: ``'poisson'`` or ``'fixed'``.
    population: Number of clients; required for ``'fixed'``.
    tol: Tolerance on the noise multiplier.

  Returns:
    ``z`` with ``epsilon(z, ...) <= target_epsilon`` and ``z`` within ``tol`` of
    the smallest such value.

  Raises:
    ValueError: naming the offending argument.
  """
  if not target_epsilon > 0:
    raise ValueError(f'target_epsilon must be > 0; got {target_epsilon!r}.')
  _check_common(1.0, sampling_rate, accountant, sampling, population)
  _check_delta(delta)
  _check_steps(steps)
  if steps < 1:
    raise ValueError(f'steps must be >= 1; got {steps!r}.')
  if not tol > 0:
    raise ValueError(f'tol must be > 0; got {tol!r}.')

  def make_event(z):
    return dp_accounting.SelfComposedDpEvent(
        dp_event(z, sampling_rate, sampling=sampling, population=population),
        int(steps))

  def eps_of(z):
    return epsilon(z, sampling_rate, steps, delta, accountant=accountant,
                   sampling=sampling, population=population)

  # Bracket [lo, hi] with eps(lo) > target >= eps(hi). For PLD start from the
  # RDP answer (RDP is looser, so its z suffices): tiny multipliers make the
  # PLD discretisation huge and must not be probed.
  if accountant == 'pld':
    hi = noise_multiplier_for_epsilon(
        target_epsilon, sampling_rate, steps, delta, accountant='rdp',
        sampling=sampling, population=population, tol=tol)
  else:
    hi = 1.0
  while eps_of(hi) > target_epsilon:
    hi *= 2.0
    if hi > 2.0 ** 30:
      raise ValueError(
          f'no noise multiplier reaches target_epsilon={target_epsilon!r} '
          f'at delta={delta!r}.')
  lo = hi / 2.0
  while eps_of(lo) <= target_epsilon:
    hi, lo = lo, lo / 2.0
  return float(dp_accounting.calibrate_dp_mechanism(
      lambda: make_accountant(accountant, sampling), make_event,
      target_epsilon, delta,
      dp_accounting.ExplicitBracketInterval(lo, hi), tol=tol))


class Accountant:
  """Tracks DP-FedAvg rounds and reports epsilon after each one.

  Example::

    acct = Accountant(noise_multiplier=1.0, sampling_rate=0.01, delta=1e-5)
    for r in range(rounds):
      ...
      eps = acct.step()   # epsilon spent so far

  Attributes:
    rounds: Rounds composed so far.
    history: ``[(round, epsilon), ...]`` for every `step`.
  """

  def __init__(self, noise_multiplier: float, sampling_rate: float,
               delta: float, *, accountant: str = 'rdp',
               sampling: str = 'poisson', population: Optional[int] = None,
               rounds: int = 0):
    """Creates an accountant.

    Args:
      noise_multiplier: ``z >= 0``.
      sampling_rate: ``q`` in (0, 1].
      delta: Target delta in (0, 1).
      accountant: ``'rdp'`` or ``'pld'``.
      sampling: ``'poisson'`` or ``'fixed'``.
      population: Number of clients; required for ``'fixed'``.
      rounds: Rounds already spent (to resume from a checkpoint).

    Raises:
      ValueError: naming the offending argument.
    """
    _check_common(noise_multiplier, sampling_rate, accountant, sampling,
                  population)
    _check_delta(delta)
    _check_steps(rounds)
    self.noise_multiplier = float(noise_multiplier)
    self.sampling_rate = float(sampling_rate)
    self.delta = float(delta)
    self.accountant = accountant
    self.sampling = sampling
    self.population = population
    self._event = dp_event(noise_multiplier, sampling_rate, sampling=sampling,
                           population=population)
    self._acc = make_accountant(accountant, sampling)
    self.rounds = 0
    self.history: list[tuple[int, float]] = []
    if rounds:
      self._acc.compose(self._event, int(rounds))
      self.rounds = int(rounds)

  @property
  def epsilon(self) -> float:
    """Epsilon at ``delta`` after the rounds so far (0 before any round)."""
    if self.rounds == 0:
      return 0.0
    return float(self._acc.get_epsilon(self.delta))

  def step(self, num_rounds: int = 1) -> float:
    """Composes ``num_rounds`` more rounds and returns the epsilon so far."""
    if int(num_rounds) != num_rounds or num_rounds < 1:
      raise ValueError(
          f'num_rounds must be a positive integer; got {num_rounds!r}.')
    self._acc.compose(self._event, int(num_rounds))
    self.rounds += int(num_rounds)
    eps = self.epsilon
    self.history.append((self.rounds, eps))
    return eps

  def __repr__(self):
    return (f'Accountant(noise_multiplier={self.noise_multiplier}, '
            f'sampling_rate={self.sampling_rate}, delta={self.delta}, '
            f'accountant={self.accountant!r}, sampling={self.sampling!r}, '
            f'population={self.population!r}, rounds={self.rounds})')
