"""Tests for fedjax_fm.privacy.accounting."""

import math

import dp_accounting
from dp_accounting import pld as dp_pld
from dp_accounting import rdp as dp_rdp
import numpy as np
import pytest

from fedjax_fm.privacy import accounting
from fedjax_fm.privacy import distributed


def test_poisson_rdp_equals_direct_dp_accounting():
  acc = dp_rdp.RdpAccountant()
  acc.compose(dp_accounting.PoissonSampledDpEvent(
      0.01, dp_accounting.GaussianDpEvent(1.1)), 500)
  direct = acc.get_epsilon(1e-5)
  assert accounting.epsilon(1.1, 0.01, 500, 1e-5) == pytest.approx(direct)
  # Known value ballpark (Abadi et al. style settings): a few units.
  assert 0.5 < direct < 5


def test_poisson_pld_equals_direct_and_is_tighter():
  acc = dp_pld.PLDAccountant()
  acc.compose(dp_accounting.PoissonSampledDpEvent(
      0.05, dp_accounting.GaussianDpEvent(1.0)), 50)
  direct = acc.get_epsilon(1e-5)
  pld = accounting.epsilon(1.0, 0.05, 50, 1e-5, accountant='pld')
  assert pld == pytest.approx(direct)
  assert pld <= accounting.epsilon(1.0, 0.05, 50, 1e-5) + 1e-9


def test_fixed_size_uses_replace_one_with_doubled_sensitivity():
  acc = dp_rdp.RdpAccountant(
      neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
  acc.compose(dp_accounting.SampledWithoutReplacementDpEvent(
      1000, 20, dp_accounting.GaussianDpEvent(0.75)), 30)
  direct = acc.get_epsilon(1e-5)
  ours = accounting.epsilon(1.5, 0.02, 30, 1e-5, sampling='fixed',
                            population=1000)
  assert ours == pytest.approx(direct)
  event = accounting.dp_event(1.5, 0.02, sampling='fixed', population=1000)
  assert event.sample_size == 20 and event.event.noise_multiplier == 0.75


def test_monotonic_in_steps_and_noise():
  eps_steps = [accounting.epsilon(1.0, 0.02, s, 1e-5) for s in (1, 10, 100)]
  assert eps_steps[0] < eps_steps[1] < eps_steps[2]
  eps_noise = [accounting.epsilon(z, 0.02, 100, 1e-5) for z in (0.8, 1.2, 2.0)]
  assert eps_noise[0] > eps_noise[1] > eps_noise[2]
  assert accounting.epsilon(1.0, 0.02, 0, 1e-5) == 0.0
  assert accounting.epsilon(0.0, 0.02, 1, 1e-5) == float('inf')


@pytest.mark.slow
def test_calibration_hits_target():
  z = accounting.noise_multiplier_for_epsilon(3.0, 0.02, 200, 1e-5)
  assert accounting.epsilon(z, 0.02, 200, 1e-5) <= 3.0
  assert accounting.epsilon(z * 0.99, 0.02, 200, 1e-5) > 3.0
  assert accounting.epsilon(z, 0.02, 200, 1e-5) == pytest.approx(3.0, rel=1e-2)
  # Fixed-size sampling (slower accountant: coarser tolerance).
  zf = accounting.noise_multiplier_for_epsilon(
      3.0, 0.02, 50, 1e-5, sampling='fixed', population=500, tol=1e-3)
  eps = accounting.epsilon(zf, 0.02, 50, 1e-5, sampling='fixed',
                           population=500)
  assert eps <= 3.0 and eps == pytest.approx(3.0, rel=2e-2)


def test_accountant_tracks_rounds():
  acct = accounting.Accountant(1.0, 0.05, 1e-5)
  assert acct.epsilon == 0.0
  eps = [acct.step() for _ in range(5)]
  assert all(a < b for a, b in zip(eps, eps[1:]))
  assert acct.rounds == 5
  assert eps[-1] == pytest.approx(accounting.epsilon(1.0, 0.05, 5, 1e-5))
  assert acct.history[-1] == (5, eps[-1])
  acct.step(5)
  assert acct.epsilon == pytest.approx(accounting.epsilon(1.0, 0.05, 10, 1e-5))
  resumed = accounting.Accountant(1.0, 0.05, 1e-5, rounds=10)
  assert resumed.epsilon == pytest.approx(acct.epsilon)
  pld = accounting.Accountant(1.0, 0.05, 1e-5, accountant='pld')
  pld.step(3)
  assert pld.epsilon == pytest.approx(
      accounting.epsilon(1.0, 0.05, 3, 1e-5, accountant='pld'), rel=1e-3)


def test_invalid_arguments():
  with pytest.raises(ValueError, match="accountant='pld' does not support"):
    accounting.epsilon(1.0, 0.1, 1, 1e-5, accountant='pld', sampling='fixed',
                       population=100)
  with pytest.raises(ValueError, match='population'):
    accounting.epsilon(1.0, 0.1, 1, 1e-5, sampling='fixed')
  with pytest.raises(ValueError, match='accountant must be one of'):
    accounting.epsilon(1.0, 0.1, 1, 1e-5, accountant='moments')
  with pytest.raises(ValueError, match='sampling must be one of'):
    accounting.epsilon(1.0, 0.1, 1, 1e-5, sampling='shuffle')
  with pytest.raises(ValueError, match='sampling_rate'):
    accounting.epsilon(1.0, 0.0, 1, 1e-5)
  with pytest.raises(ValueError, match='delta'):
    accounting.epsilon(1.0, 0.1, 1, 1.0)
  with pytest.raises(ValueError, match='steps'):
    accounting.epsilon(1.0, 0.1, -1, 1e-5)
  with pytest.raises(ValueError, match='target_epsilon'):
    accounting.noise_multiplier_for_epsilon(0.0, 0.1, 1, 1e-5)


# ------------------------------------------------------- distributed Skellam

_REPLACE_ONE = dp_accounting.NeighboringRelation.REPLACE_ONE


def _renyi_shifted_skellam(alpha, shift, mu):
  """D_alpha(Sk(mu) + shift || Sk(mu)) in 1-D, summed numerically from scipy's pmf."""
  stats = pytest.importorskip('scipy.stats')
  sd = math.sqrt(mu)
  k = np.arange(int(-60 * sd - 300 - shift * alpha), int(60 * sd + 300 + shift * alpha))
  log_q = stats.skellam.logpmf(k, mu / 2, mu / 2)
  log_p = stats.skellam.logpmf(k - shift, mu / 2, mu / 2)
  ok = np.isfinite(log_q) & np.isfinite(log_p)   # the rest underflows: negligible mass
  t = alpha * log_p[ok] + (1 - alpha) * log_q[ok]
  m = t.max()
  return (m + math.log(np.exp(t - m).sum())) / (alpha - 1)


@pytest.mark.parametrize('mu', [2.0, 50.0, 2000.0])
def test_skellam_rdp_bounds_the_exact_divergence(mu):
  """Agarwal et al.'s bound against the exact Renyi divergence of a shifted Skellam
  (1-D: Delta_1 = Delta_2 = shift): never below it, and tight as mu grows."""
  for shift in (1, 3):
    orders = [2, 5, 20, 100]
    bound = accounting.skellam_rdp(orders, shift, shift, mu)
    exact = np.array([_renyi_shifted_skellam(a, shift, mu) for a in orders])
    assert np.all(exact <= bound * (1 + 1e-9)), (exact, bound)
    if mu >= 2000:
      np.testing.assert_allclose(exact[:3], bound[:3], rtol=2e-3)


def test_skellam_rdp_approaches_the_gaussian_of_dp_accounting():
  """For large mu the Skellam epsilon tends to dp_accounting's Gaussian mechanism with
  noise multiplier sqrt(mu) / Delta_2 (from above)."""
  orders = list(accounting.SKELLAM_ORDERS)
  l2 = 1000.0
  for ratio in (0.8, 2.0):                      # sqrt(mu) / Delta_2
    mu = (ratio * l2) ** 2
    ours = dp_rdp.compute_epsilon(
        orders, 10 * accounting.skellam_rdp(orders, l2 * 30, l2, mu), 1e-5)[0]
    acc = dp_rdp.RdpAccountant(orders=orders)
    acc.compose(dp_accounting.GaussianDpEvent(ratio), 10)
    gauss = acc.get_epsilon(1e-5)
    assert gauss <= ours <= gauss * (1 + 1e-3), (ours, gauss)
  np.testing.assert_array_equal(accounting.skellam_rdp([2, 3], 1.0, 1.0, 0.0), np.inf)


def _theorem9_direct(alpha, q, eps):
  """Wang et al. 2019, Theorem 9, in plain floats (small alpha only)."""
  total = 1 + q ** 2 * math.comb(alpha, 2) * min(4 * (math.exp(eps(2)) - 1),
                                                 2 * math.exp(eps(2)))
  for j in range(3, alpha + 1):
    total += 2 * q ** j * math.comb(alpha, j) * math.exp((j - 1) * eps(j))
  return min(math.log(total) / (alpha - 1), eps(alpha))


def test_subsampled_bound_is_theorem_9_and_bounds_dp_accounting_gaussian():
  orders = list(range(2, 13))
  for sigma, q in ((1.0, 0.01), (0.7, 0.05), (3.0, 0.2)):
    def gauss(js, sigma=sigma):
      return np.asarray(js, np.float64) / (2 * sigma ** 2)
    ours = accounting.subsampled_rdp_without_replacement(orders, gauss, q)
    direct = [_theorem9_direct(a, q, lambda j, s=sigma: j / (2 * s ** 2)) for a in orders]
    np.testing.assert_allclose(ours, direct, rtol=1e-10)
    # dp_accounting's sampled-without-replacement Gaussian (Theorem 27, a refinement of
    # Theorem 9 for the Gaussian) can only be tighter; at small sigma they coincide.
    acc = dp_rdp.RdpAccountant(orders=orders, neighboring_relation=_REPLACE_ONE)
    acc.compose(dp_accounting.SampledWithoutReplacementDpEvent(
        10_000, int(q * 10_000), dp_accounting.GaussianDpEvent(sigma)))
    theirs = acc.get_epsilon(1e-5)
    mine = dp_rdp.compute_epsilon(orders, ours, 1e-5)[0]
    assert mine >= theirs * (1 - 1e-12)
    if sigma <= 1.0:
      assert mine == pytest.approx(theirs, rel=1e-9)
  np.testing.assert_allclose(
      accounting.subsampled_rdp_without_replacement([2, 7], lambda js: js * 0.3, 1.0),
      [0.6, 2.1])


def _params(z, bits=16, dim=5000, clients=50):
  return distributed.skellam_params(dim, 1.0, z, clients, bits)


def test_skellam_epsilon_is_the_direct_conversion_of_composed_rdp():
  p = _params(1.2)
  q, steps, delta = 50 / 2000, 300, 1e-6
  l1, l2 = accounting.skellam_sensitivities(p)
  assert l2 == 2 * p.norm_bound and l1 == 2 * min(p.norm_bound ** 2,
                                                  math.sqrt(p.padded_dim) * p.norm_bound)
  orders = accounting.SKELLAM_ORDERS
  rdp = steps * accounting.subsampled_rdp_without_replacement(
      orders, lambda js: accounting.skellam_rdp(js, l1, l2, p.variance), q)
  # Canonne, Kamath, Steinke 2020, Proposition 12, minimised over the orders.
  direct = min(r + math.log1p(-1 / a) - math.log(delta * a) / (a - 1)
               for a, r in zip(orders, rdp))
  assert accounting.skellam_epsilon(p, q, steps, delta) == pytest.approx(direct, rel=1e-12)
  # Close to the Gaussian accountant at the same noise multiplier (rounding inflates
  # the sensitivity by a little, Theorem 9 is a little looser than dp_accounting's).
  gauss = accounting.epsilon(1.2, q, steps, delta, sampling='fixed', population=2000)
  assert gauss <= direct <= 1.1 * gauss
  acct = accounting.SkellamAccountant(p, q, delta)
  assert acct.epsilon == 0.0
  eps = [acct.step() for _ in range(3)]
  assert eps[0] < eps[1] < eps[2]
  assert eps[2] == pytest.approx(accounting.skellam_epsilon(p, q, 3, delta))
  assert accounting.SkellamAccountant(p, q, delta, rounds=3).epsilon == pytest.approx(eps[2])
  assert acct.noise_multiplier == 1.2
  assert accounting.skellam_epsilon(_params(0.0), q, 3, delta) == math.inf
  assert accounting.skellam_epsilon(p, q, 0, delta) == 0.0


def test_skellam_calibration_hits_the_target():
  kw = dict(dim=5000, clip_norm=1.0, expected_clients=50, bits=16)
  q, steps, delta = 50 / 2000, 200, 1e-5
  z = accounting.skellam_noise_multiplier_for_epsilon(4.0, q, steps, delta, tol=1e-4, **kw)
  p = distributed.skellam_params(kw['dim'], 1.0, z, 50, 16)
  eps = accounting.skellam_epsilon(p, q, steps, delta)
  assert eps <= 4.0 and eps == pytest.approx(4.0, rel=1e-2)
  less = distributed.skellam_params(kw['dim'], 1.0, z * 0.99, 50, 16)
  assert accounting.skellam_epsilon(less, q, steps, delta) > 4.0
  with pytest.raises(ValueError, match='increase bits'):
    accounting.skellam_noise_multiplier_for_epsilon(0.05, 1.0, 1000, 1e-5, dim=2 ** 20,
                                                    clip_norm=1.0, expected_clients=2000,
                                                    bits=14)
