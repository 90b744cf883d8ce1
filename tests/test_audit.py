"""Tests for fedjax_fm.privacy.audit."""

import dp_accounting
from dp_accounting import pld as dp_pld
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_fm.privacy import audit
from fedjax_fm.privacy import dp_fedavg

DELTA = 1e-5


def _gaussian_epsilon(z):
  acc = dp_pld.PLDAccountant()
  acc.compose(dp_accounting.GaussianDpEvent(z))
  return acc.get_epsilon(DELTA)


@pytest.mark.parametrize('z', [0.5, 1.0, 4.0])
@pytest.mark.slow
def test_lower_bound_below_accountant(z):
  s_out, s_in = audit.gaussian_mechanism_scores(
      jax.random.key(int(z * 10)), 20_000, clip_norm=1.0, noise_multiplier=z,
      num_clients=3, dim=16)
  result = audit.empirical_epsilon(s_out, s_in, DELTA)
  theory = _gaussian_epsilon(z)
  assert 0.0 <= result.epsilon_lower_bound < theory
  assert result.fpr <= result.fpr_upper and result.fnr <= result.fnr_upper
  if z == 0.5:  # little noise: the canary is clearly detectable
    assert result.epsilon_lower_bound > 2.0
  if z == 1.0:
    assert result.epsilon_lower_bound > 1.0


def test_no_noise_is_detected_and_identical_worlds_are_not():
  rng = np.random.default_rng(0)
  same = audit.empirical_epsilon(rng.normal(size=5000), rng.normal(size=5000),
                                 DELTA)
  assert same.epsilon_lower_bound < 0.3
  apart = audit.empirical_epsilon(np.zeros(5000), np.ones(5000), DELTA)
  assert apart.epsilon_lower_bound > 6.0  # only limited by the trial count
  assert apart.fpr == 0.0 and apart.fnr == 0.0


def test_audit_mechanism_generic():
  dim = 8
  canary = audit.canary_update(jax.random.key(0), jnp.zeros((dim,)), 1.0)
  np.testing.assert_allclose(jnp.linalg.norm(canary), 1.0, rtol=1e-5)
  dp = dp_fedavg.gaussian_dp(1.0, 1.0)

  def mechanism(key, with_canary):
    total = jnp.where(with_canary, 1.0, 0.0) * dp.clip(canary)[0]
    return dp.noise(key, total, 1)

  result = audit.audit_mechanism(jax.random.key(1), mechanism, canary, 10_000,
                                 DELTA)
  assert 0.5 < result.epsilon_lower_bound < _gaussian_epsilon(1.0)


def test_clopper_pearson():
  assert audit.clopper_pearson_upper(0, 100, 0.95) == pytest.approx(
      1 - 0.05 ** (1 / 100), rel=1e-6)
  assert audit.clopper_pearson_upper(100, 100) == 1.0
  with pytest.raises(ValueError, match='delta'):
    audit.empirical_epsilon([0, 1], [0, 1], 1.0)
  with pytest.raises(ValueError, match='confidence'):
    audit.empirical_epsilon([0, 1], [0, 1], 0.0, confidence=1.0)
