"""Tests for fedjax_fm.engine.sampling."""

import numpy as np
import pytest

from fedjax_fm.engine import sampling


def test_shape_dtype_range_sorted_unique():
  for round_idx in range(20):
    ids = sampling.sample_clients(50, 7, seed=3, round_idx=round_idx)
    assert ids.dtype == np.int32 and ids.shape == (7,)
    assert np.all(np.diff(ids) > 0)  # sorted, no duplicates
    assert ids.min() >= 0 and ids.max() < 50


def test_deterministic_in_seed_and_round():
  a = sampling.sample_clients(1000, 10, seed=1, round_idx=5)
  b = sampling.sample_clients(1000, 10, seed=1, round_idx=5)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, sampling.sample_clients(1000, 10, seed=1,
                                                       round_idx=6))
  assert not np.array_equal(a, sampling.sample_clients(1000, 10, seed=2,
                                                       round_idx=5))


def test_all_clients():
  np.testing.assert_array_equal(
      sampling.sample_clients(6, 6, seed=0, round_idx=0), np.arange(6))


def test_uniform_inclusion_frequencies():
  num_clients, per_round, rounds = 20, 5, 2000
  counts = np.zeros(num_clients)
  for r in range(rounds):
    counts[sampling.sample_clients(num_clients, per_round, seed=0,
                                   round_idx=r)] += 1
  expected = rounds * per_round / num_clients
  # Each count is Binomial(rounds, 1/4); the sum of squared z-scores is
  # roughly chi-square with ~19 degrees of freedom (p ~ 0.001 at 43.8).
  var = rounds * (per_round / num_clients) * (1 - per_round / num_clients)
  chi2 = ((counts - expected)**2 / var).sum()
  assert chi2 < 43.8
  assert counts.sum() == rounds * per_round


def test_pairs_are_not_correlated_across_rounds():
  # Consecutive rounds should overlap like independent draws (5*5/20 = 1.25).
  overlaps = [np.intersect1d(
      sampling.sample_clients(20, 5, seed=0, round_idx=r),
      sampling.sample_clients(20, 5, seed=0, round_idx=r + 1)).size
              for r in range(400)]
  assert np.mean(overlaps) == pytest.approx(1.25, abs=0.2)


@pytest.mark.parametrize('args, match', [
    ((10, 11), r'clients_per_round.*\[1, 10\]'),
    ((10, 0), r'clients_per_round.*\[1, 10\]'),
    ((0, 1), 'num_clients'),
    ((10, 2.5), 'clients_per_round'),
])
def test_errors(args, match):
  with pytest.raises(ValueError, match=match):
    sampling.sample_clients(*args, seed=0, round_idx=0)


def test_bad_seed_and_round():
  with pytest.raises(ValueError, match='seed'):
    sampling.sample_clients(10, 2, seed=-1, round_idx=0)
  with pytest.raises(ValueError, match='round_idx'):
    sampling.sample_clients(10, 2, seed=0, round_idx=-3)
