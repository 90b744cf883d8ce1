"""Tests for fedjax_fm.privacy.accounting."""

import dp_accounting
from dp_accounting import pld as dp_pld
from dp_accounting import rdp as dp_rdp
import pytest

from fedjax_fm.privacy import accounting


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
