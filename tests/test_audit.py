"""Tests for fedjax_fm.privacy.audit."""

import importlib.util
import math
import os

import dp_accounting
from dp_accounting import pld as dp_pld
from dp_accounting import rdp as dp_rdp
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


# ------------------------------------------------- through the real federated round

def _audit_script():
  """scripts/privacy_audit.py as a module (its families and `main`)."""
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      'scripts', 'privacy_audit.py')
  spec = importlib.util.spec_from_file_location('privacy_audit_script', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _round_families():
  return [f for f in _audit_script().families() if f != 'mechanism']


def _rdp_replace_one_epsilon(z, rounds, delta):
  """Independent reference: `rounds` Gaussian mechanisms of sensitivity 2 C, noise z C."""
  acc = dp_rdp.RdpAccountant(
      neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
  acc.compose(dp_accounting.GaussianDpEvent(z / 2.0), rounds)
  return acc.get_epsilon(delta)


@pytest.mark.slow
@pytest.mark.parametrize('family', _round_families())
def test_round_audit_stays_below_the_accountant(family):
  """Canary trials through the round built from the family's config: the empirical
  lower bound stays below the accountant's epsilon for the same rounds."""
  script = _audit_script()
  out = script.main(['--family', family, '--noise', '1', '--rounds', '2', '--trials', '1500',
                     '--batch', '1024', '--delta', str(DELTA)])
  (row,) = out['results']
  if family != 'skellam':   # the Gaussian mechanism: replace-one, noise z C on the sum
    claim = _rdp_replace_one_epsilon(1.0, 2, DELTA)
    assert row['accountant_epsilon'] == pytest.approx(claim, rel=1e-3)
  assert row['accountant_epsilon_sampled'] <= row['accountant_epsilon'] + 1e-6
  # The canary reaches the released params (in units of C / m, over the 2 rounds).
  assert row['canary_distance'] > 0.3
  assert 0.0 <= row['empirical_lower_bound'] < row['accountant_epsilon']
  assert row['empirical_lower_bound'] > 0.2   # the test sees the canary through the noise


@pytest.mark.slow
def test_round_audit_catches_a_mechanism_without_noise():
  """The round runs without noise while the accountant claims z = 1: the audit's lower
  bound rises above the claimed epsilon (the trial count is what that needs)."""
  script = _audit_script()
  delta = DELTA
  claim = _rdp_replace_one_epsilon(1.0, 1, delta)
  # Zero errors in n trials: the bound is log((1 - delta - u) / u), u ~ -log(0.025) / n.
  u = (1 - delta) / (1 + math.exp(claim)) / 1.2
  n_eval = math.ceil(math.log(0.025) / math.log1p(-u))
  trials = math.ceil(n_eval / 0.95)
  out = script.main(['--family', 'plain', '--broken', '--noise', '1', '--rounds', '1',
                     '--trials', str(trials), '--batch', '8192', '--delta', str(delta),
                     '--calibration', '0.05'])
  (row,) = out['results']
  assert row['noise_in_round'] == 0.0 and row['noise_multiplier'] == 1.0
  assert row['accountant_epsilon'] == pytest.approx(claim, rel=1e-3)
  assert row['empirical_lower_bound'] > row['accountant_epsilon']
