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

The distributed Skellam mechanism (`fedjax_fm.privacy.distributed`) is not a
dp_accounting event; its RDP curve is computed here (`skellam_rdp`: Agarwal,
Kairouz, Liu 2021, Theorem 3.5, with the L1 and L2 sensitivities of the scaled,
rounded integer vectors), amplified by fixed-size sampling without replacement
with the general bound of Wang, Balle, Kasiviswanathan 2019, Theorem 9
(`subsampled_rdp_without_replacement`, valid for any mechanism's RDP curve at
integer orders), composed over rounds by adding RDP, and converted to
``(epsilon, delta)`` by `dp_accounting.rdp.compute_epsilon` (Canonne, Kamath,
Steinke 2020, Proposition 12). `SkellamAccountant` has the interface of
`Accountant`.

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
  * Agarwal, Kairouz, Liu 2021, "The Skellam Mechanism for Differentially
    Private Federated Learning", https://arxiv.org/abs/2110.04995
  * Canonne, Kamath, Steinke 2020, "The Discrete Gaussian for Differential
    Privacy", https://arxiv.org/abs/2004.00010
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import dp_accounting
from dp_accounting import pld as dp_pld
from dp_accounting import rdp as dp_rdp
import numpy as np

from fedjax_fm.privacy import distributed

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


# ------------------------------------------------------- distributed Skellam

# Integer orders (the Skellam bound and the subsampling bound hold at integers).
SKELLAM_ORDERS = (tuple(range(2, 129)) + tuple(range(136, 257, 8))
                  + (320, 384, 448, 512, 768, 1024))


def skellam_rdp(orders: Sequence[int], l1_sensitivity: float, l2_sensitivity: float,
                variance: float) -> np.ndarray:
  """RDP of the multi-dimensional Skellam mechanism (Agarwal et al. 2021, Thm 3.5).

  Adding ``Sk(mu) = Poisson(mu/2) - Poisson(mu/2)`` (variance ``mu``) to every
  coordinate of an integer vector whose neighbouring values differ by at most
  ``Delta_1`` in L1 and ``Delta_2`` in L2 is ``(alpha, eps(alpha))``-RDP for
  integer ``alpha > 1`` with::

    eps(alpha) = alpha Delta_2^2 / (2 mu)
                 + min(((2 alpha - 1) Delta_2^2 + 6 Delta_1) / (4 mu^2),
                       3 Delta_1 / (2 mu))

  The first term is the Gaussian mechanism's with variance ``mu``; the second
  vanishes relative to it as ``mu`` grows.

  Args:
    orders: integer orders ``alpha >= 2``.
    l1_sensitivity: ``Delta_1 >= 0`` (integer units).
    l2_sensitivity: ``Delta_2 >= 0`` (integer units).
    variance: ``mu >= 0`` (0: no noise, ``inf`` unless the sensitivity is 0).

  Returns:
    float64 array of RDP values, one per order.
  """
  a = np.asarray(orders, np.float64)
  if np.any(a < 2) or np.any(a != np.round(a)):
    raise ValueError(f'orders must be integers >= 2; got {orders!r}.')
  if not (l1_sensitivity >= 0 and l2_sensitivity >= 0):
    raise ValueError('sensitivities must be >= 0; got '
                     f'{l1_sensitivity!r}, {l2_sensitivity!r}.')
  if not variance >= 0:
    raise ValueError(f'variance must be >= 0; got {variance!r}.')
  d1, d2, mu = float(l1_sensitivity), float(l2_sensitivity), float(variance)
  if d1 == 0 and d2 == 0:
    return np.zeros_like(a)
  if mu == 0:
    return np.full_like(a, np.inf)
  extra = np.minimum(((2 * a - 1) * d2 * d2 + 6 * d1) / (4 * mu * mu), 3 * d1 / (2 * mu))
  return a * d2 * d2 / (2 * mu) + extra


def subsampled_rdp_without_replacement(orders: Sequence[int],
                                       rdp_fn: Callable[[np.ndarray], np.ndarray],
                                       sampling_rate: float) -> np.ndarray:
  """RDP of a mechanism run on a uniform subsample without replacement.

  Wang, Balle, Kasiviswanathan 2019, Theorem 9, for any mechanism ``M`` that is
  ``(j, eps(j))``-RDP under the replace-one relation at every integer
  ``j <= alpha`` (``eps(inf) = inf`` assumed), with ``gamma = m / N``::

    eps'(alpha) <= 1/(alpha-1) log(1
        + gamma^2 C(alpha, 2) min(4 (e^eps(2) - 1), 2 e^eps(2))
        + sum_{j=3}^alpha 2 gamma^j C(alpha, j) e^{(j-1) eps(j)})

  and ``eps'(alpha) <= eps(alpha)`` (the smaller is returned). Computed in log
  space.

  Args:
    orders: integer orders ``alpha >= 2``.
    rdp_fn: ``rdp_fn(js) -> eps(js)``, the base mechanism's RDP at integer
      orders ``js`` (an array).
    sampling_rate: ``gamma`` in (0, 1].

  Returns:
    float64 array, one value per order.
  """
  if not 0.0 < sampling_rate <= 1.0:
    raise ValueError(f'sampling_rate must be in (0, 1]; got {sampling_rate!r}.')
  orders = [int(a) for a in orders]
  if any(a < 2 for a in orders):
    raise ValueError(f'orders must be integers >= 2; got {orders!r}.')
  top = max(orders)
  base = np.concatenate([[0.0, 0.0], np.asarray(rdp_fn(np.arange(2, top + 1)),
                                                np.float64)])
  if sampling_rate == 1.0:
    return base[orders]
  log_q = math.log(sampling_rate)
  log_fact = np.asarray([math.lgamma(i + 1.0) for i in range(top + 1)])
  e2 = base[2]
  if e2 <= 0:
    second = -math.inf
  else:   # log min(4 (e^e2 - 1), 2 e^e2), without overflow
    second = min(math.log(4.0) + e2 + math.log1p(-math.exp(-e2)), math.log(2.0) + e2)
  out = []
  for a in orders:
    js = np.arange(2, a + 1)
    log_comb = log_fact[a] - log_fact[js] - log_fact[a - js]
    t = js * log_q + log_comb + (js - 1) * base[2:a + 1] + math.log(2.0)
    t[0] = 2 * log_q + log_comb[0] + second
    t = np.concatenate([[0.0], t])
    if np.any(np.isposinf(t)):
      bound = math.inf
    else:
      m = np.max(t)
      bound = (m + math.log(np.sum(np.exp(t - m)))) / (a - 1)
    out.append(min(bound, base[a]))
  return np.asarray(out, np.float64)


def skellam_sensitivities(params: distributed.SkellamParams) -> tuple[float, float]:
  """``(Delta_1, Delta_2)`` of the integer sum under replace-one (integer units).

  Replacing one client replaces one rounded vector ``v`` by another ``v'``,
  both with ``||v|| <= B`` and ``||v||_1 <= min(B^2, sqrt(d_pad) B)``
  (`distributed.skellam_params`), so the sum moves by at most ``2 B`` in L2 and
  ``2 min(B^2, sqrt(d_pad) B)`` in L1.
  """
  return 2.0 * params.l1_bound, 2.0 * params.norm_bound


def skellam_round_rdp(params: distributed.SkellamParams, sampling_rate: float,
                      orders: Sequence[int] = SKELLAM_ORDERS) -> np.ndarray:
  """RDP of one round: ``n`` of ``N`` clients (``sampling_rate = n / N``) drawn
  without replacement, their rounded vectors summed with ``Sk(mu)`` noise."""
  l1, l2 = skellam_sensitivities(params)
  return subsampled_rdp_without_replacement(
      orders, lambda js: skellam_rdp(js, l1, l2, params.variance), sampling_rate)


def skellam_epsilon(params: distributed.SkellamParams, sampling_rate: float,
                    steps: int, delta: float,
                    orders: Sequence[int] = SKELLAM_ORDERS) -> float:
  """Epsilon of ``steps`` rounds of the distributed Skellam mechanism at ``delta``.

  Fixed-size sampling without replacement under the replace-one relation (what
  `fedjax_fm.engine` samples; Poisson sampling is not supported for this
  mechanism). RDP adds over rounds; `dp_accounting.rdp.compute_epsilon`
  converts it.

  Args:
    params: the mechanism's `distributed.SkellamParams`.
    sampling_rate: ``n / N`` in (0, 1] (1: every client every round, no
      amplification).
    steps: rounds (>= 0).
    delta: in (0, 1).
    orders: integer RDP orders.

  Returns:
    Epsilon (0 for no steps, ``inf`` without noise).
  """
  if not 0.0 < sampling_rate <= 1.0:
    raise ValueError(f'sampling_rate must be in (0, 1]; got {sampling_rate!r}.')
  _check_delta(delta)
  _check_steps(steps)
  if steps == 0:
    return 0.0
  rdp = skellam_round_rdp(params, sampling_rate, orders) * int(steps)
  if np.all(np.isinf(rdp)):
    return math.inf
  eps, _ = dp_rdp.compute_epsilon(list(orders), list(rdp), delta)
  return float(eps)


def skellam_noise_multiplier_for_epsilon(
    target_epsilon: float, sampling_rate: float, steps: int, delta: float, *,
    dim: int, clip_norm: float, expected_clients: int,
    bits: int = distributed.DEFAULT_BITS, beta: float = distributed.DEFAULT_BETA,
    tol: float = 1e-3) -> float:
  """A noise multiplier whose distributed Skellam mechanism meets ``target_epsilon``.

  The scale, hence the rounding's inflation of the sensitivity, depends on the
  noise multiplier, so epsilon is found by bisection on ``z`` (doubling to a
  bracket first) and the returned ``z`` satisfies ``epsilon <= target_epsilon``
  by evaluation. With few bits and large noise the rounding dominates and no
  ``z`` may reach the target.

  Args:
    target_epsilon: > 0.
    sampling_rate: ``n / N`` in (0, 1].
    steps: rounds (>= 1).
    delta: in (0, 1).
    dim, clip_norm, expected_clients, bits, beta: see
      `distributed.skellam_params`.
    tol: relative tolerance on ``z``.

  Returns:
    ``z`` with ``skellam_epsilon(skellam_params(..., z, ...)) <= target_epsilon``,
    within ``tol`` (relative) of the smallest such value on the bisection bracket.

  Raises:
    ValueError: naming the argument, or when no ``z`` up to 2^12 reaches the
      target (increase ``bits``).
  """
  if not target_epsilon > 0:
    raise ValueError(f'target_epsilon must be > 0; got {target_epsilon!r}.')
  _check_steps(steps)
  if steps < 1:
    raise ValueError(f'steps must be >= 1; got {steps!r}.')
  if not tol > 0:
    raise ValueError(f'tol must be > 0; got {tol!r}.')

  def eps_of(z):
    p = distributed.skellam_params(dim, clip_norm, z, expected_clients, bits, beta=beta)
    return skellam_epsilon(p, sampling_rate, steps, delta)

  hi = 1.0
  while eps_of(hi) > target_epsilon:
    hi *= 2.0
    if hi > 2.0 ** 12:
      raise ValueError(
          f'no noise multiplier reaches target_epsilon={target_epsilon!r} at '
          f'delta={delta!r} with bits={bits!r}: the rounding to {bits}-bit integers '
          'dominates; increase bits.')
  lo = hi / 2.0
  while eps_of(lo) <= target_epsilon:
    hi, lo = lo, lo / 2.0
    if lo < 1e-6:
      return hi
  while (hi - lo) > tol * hi:
    mid = 0.5 * (lo + hi)
    if eps_of(mid) <= target_epsilon:
      hi = mid
    else:
      lo = mid
  return float(hi)


class SkellamAccountant:
  """`Accountant` for the distributed Skellam mechanism.

  Example::

    params = distributed.skellam_params(dim, 1.0, 1.0, expected_clients=100)
    acct = SkellamAccountant(params, sampling_rate=100 / 10_000, delta=1e-5)
    eps = acct.step()

  Attributes:
    params: the mechanism's `distributed.SkellamParams`.
    noise_multiplier: ``params.noise_multiplier``.
    rounds: rounds composed so far.
    history: ``[(round, epsilon), ...]`` for every `step`.
  """

  def __init__(self, params: distributed.SkellamParams, sampling_rate: float,
               delta: float, *, rounds: int = 0,
               orders: Sequence[int] = SKELLAM_ORDERS):
    """Creates an accountant (fixed-size sampling, replace-one; see `skellam_epsilon`).

    Args:
      params: the mechanism's parameters.
      sampling_rate: ``n / N`` in (0, 1].
      delta: target delta in (0, 1).
      rounds: rounds already spent (to resume from a checkpoint).
      orders: integer RDP orders.
    """
    if not 0.0 < sampling_rate <= 1.0:
      raise ValueError(f'sampling_rate must be in (0, 1]; got {sampling_rate!r}.')
    _check_delta(delta)
    _check_steps(rounds)
    self.params = params
    self.noise_multiplier = float(params.noise_multiplier)
    self.sampling_rate = float(sampling_rate)
    self.delta = float(delta)
    self.orders = tuple(int(a) for a in orders)
    self.round_rdp = skellam_round_rdp(params, sampling_rate, self.orders)
    self.rounds = int(rounds)
    self.history: list[tuple[int, float]] = []

  @property
  def epsilon(self) -> float:
    """Epsilon at ``delta`` after the rounds so far (0 before any round)."""
    if self.rounds == 0:
      return 0.0
    rdp = self.round_rdp * self.rounds
    if np.all(np.isinf(rdp)):
      return math.inf
    eps, _ = dp_rdp.compute_epsilon(list(self.orders), list(rdp), self.delta)
    return float(eps)

  def step(self, num_rounds: int = 1) -> float:
    """Composes ``num_rounds`` more rounds and returns the epsilon so far."""
    if int(num_rounds) != num_rounds or num_rounds < 1:
      raise ValueError(
          f'num_rounds must be a positive integer; got {num_rounds!r}.')
    self.rounds += int(num_rounds)
    eps = self.epsilon
    self.history.append((self.rounds, eps))
    return eps

  def __repr__(self):
    return (f'SkellamAccountant(noise_multiplier={self.noise_multiplier}, '
            f'bits={self.params.bits}, scale={self.params.scale:.4g}, '
            f'sampling_rate={self.sampling_rate}, delta={self.delta}, '
            f'rounds={self.rounds})')
