"""Tests for fedjax_fm.data.partition."""

import numpy as np
import pytest

from fedjax_fm.data import partition as partition_lib


def _assert_exact_cover(parts, num_examples):
  assert all(p.dtype == np.int64 for p in parts)
  assert all(np.all(np.diff(p) > 0) for p in parts)  # sorted, unique
  allidx = np.concatenate(parts)
  np.testing.assert_array_equal(np.sort(allidx), np.arange(num_examples))


def _label_client_counts(parts, labels, num_labels):
  counts = np.zeros((num_labels, len(parts)))
  for i, p in enumerate(parts):
    counts[:, i] = np.bincount(labels[p], minlength=num_labels)
  return counts


LABELS = np.random.default_rng(0).integers(0, 7, size=1000)

CASES = {
    'iid': dict(num_examples=1000, num_clients=13, seed=1),
    'dirichlet': dict(labels=LABELS, num_clients=13, alpha=0.5, seed=1),
    'shards': dict(labels=LABELS, num_clients=13, labels_per_client=2,
                   seed=1),
    'quantity_skew': dict(num_examples=1000, num_clients=13, sigma=1.0,
                          seed=1),
    'natural': dict(keys=LABELS),
}


@pytest.mark.parametrize('name', sorted(CASES))
def test_every_example_exactly_once_and_deterministic(name):
  parts = partition_lib.partition(name, **CASES[name])
  _assert_exact_cover(parts, 1000)
  again = partition_lib.partition(name, **CASES[name])
  assert len(parts) == len(again)
  for a, b in zip(parts, again):
    np.testing.assert_array_equal(a, b)
  if 'seed' in CASES[name]:
    other = partition_lib.partition(name, **{**CASES[name], 'seed': 2})
    assert any(a.shape != b.shape or np.any(a != b)
               for a, b in zip(parts, other))


def test_unknown_name_lists_allowed():
  with pytest.raises(ValueError, match="'nope'.*dirichlet.*iid"):
    partition_lib.partition('nope')


def test_iid_sizes_balanced():
  parts = partition_lib.iid(103, 10, seed=0)
  sizes = [p.size for p in parts]
  assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 103


def test_iid_label_mix_is_representative():
  labels = np.repeat(np.arange(4), 2500)
  parts = partition_lib.iid(labels.size, 10, seed=0)
  props = _label_client_counts(parts, labels, 4) / 1000
  np.testing.assert_allclose(props, 0.25, atol=0.06)


class TestDirichlet:

  def test_proportions_match_dirichlet_moments(self):
    num_labels, n_per_label, n = 200, 200, 10
    labels = np.repeat(np.arange(num_labels), n_per_label)
    for alpha in (0.1, 1.0, 10.0):
      parts = partition_lib.dirichlet(labels, n, alpha, seed=0)
      _assert_exact_cover(parts, labels.size)
      shares = _label_client_counts(parts, labels, num_labels) / n_per_label
      np.testing.assert_allclose(shares.mean(), 1 / n, rtol=1e-9)
      expected_var = (1 / n) * (1 - 1 / n) / (n * alpha + 1)
      # Rounding to integer counts adds ~1/(12 * 200^2), negligible here.
      assert shares.var() == pytest.approx(expected_var, rel=0.25), alpha

  def test_small_alpha_concentrates_labels(self):
    labels = np.repeat(np.arange(10), 300)

    def top_share(alpha):
      parts = partition_lib.dirichlet(labels, 10, alpha, seed=3)
      counts = _label_client_counts(parts, labels, 10)
      return (counts.max(axis=1) / counts.sum(axis=1)).mean()

    low, high = top_share(0.05), top_share(100.0)
    assert low > 0.6
    assert high < 0.2
    assert low > 3 * high

  def test_min_size(self):
    labels = np.repeat(np.arange(5), 40)
    parts = partition_lib.dirichlet(labels, 10, 0.3, seed=0, min_size=5)
    assert min(p.size for p in parts) >= 5
    _assert_exact_cover(parts, labels.size)

  def test_min_size_unreachable(self):
    labels = np.repeat(np.arange(2), 50)
    with pytest.raises(ValueError, match='min_size'):
      partition_lib.dirichlet(labels, 10, 0.01, seed=0, min_size=10,
                              max_attempts=3)

  @pytest.mark.parametrize('kwargs, match', [
      (dict(alpha=0.0), 'alpha'),
      (dict(alpha=-1.0), 'alpha'),
      (dict(num_clients=0), 'num_clients'),
      (dict(num_clients=101), 'num_clients'),
      (dict(min_size=-1), 'min_size'),
      (dict(min_size=11), 'min_size'),
  ])
  def test_errors(self, kwargs, match):
    args = dict(labels=np.arange(100) % 3, num_clients=10, alpha=1.0, seed=0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
      partition_lib.dirichlet(**args)


class TestShards:

  def test_at_most_k_labels_per_client(self):
    labels = np.random.default_rng(1).permutation(np.repeat(np.arange(10),
                                                            100))
    for k in (1, 2, 5):
      parts = partition_lib.shards(labels, 10, k, seed=0)
      _assert_exact_cover(parts, labels.size)
      distinct = [np.unique(labels[p]).size for p in parts]
      assert max(distinct) <= k
      assert all(p.size == 100 for p in parts)

  def test_pathological_skew_vs_iid(self):
    labels = np.repeat(np.arange(10), 100)
    sharded = partition_lib.shards(labels, 20, 2, seed=0)
    iid = partition_lib.iid(labels.size, 20, seed=0)
    mean_distinct = lambda parts: np.mean(
        [np.unique(labels[p]).size for p in parts])
    assert mean_distinct(sharded) <= 2
    assert mean_distinct(iid) > 8

  def test_unaligned_shards_at_most_2k(self):
    parts = partition_lib.shards(LABELS, 13, 2, seed=0)
    assert max(np.unique(LABELS[p]).size for p in parts) <= 4

  @pytest.mark.parametrize('kwargs, match', [
      (dict(labels_per_client=0), 'labels_per_client'),
      (dict(labels_per_client=11), 'exceed'),
      (dict(num_clients=0), 'num_clients'),
  ])
  def test_errors(self, kwargs, match):
    args = dict(labels=np.arange(100) % 3, num_clients=10,
                labels_per_client=2, seed=0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
      partition_lib.shards(**args)


class TestQuantitySkew:

  def test_log_size_std_matches_sigma(self):
    for sigma in (0.5, 1.0):
      parts = partition_lib.quantity_skew(400_000, 400, sigma, seed=0)
      _assert_exact_cover(parts, 400_000)
      log_sizes = np.log([p.size for p in parts])
      assert log_sizes.std() == pytest.approx(sigma, rel=0.15)

  def test_sigma_zero_equal_sizes(self):
    parts = partition_lib.quantity_skew(1003, 10, 0.0, seed=0)
    sizes = [p.size for p in parts]
    assert max(sizes) - min(sizes) <= 1

  def test_min_size(self):
    parts = partition_lib.quantity_skew(200, 50, 3.0, seed=0, min_size=2)
    assert min(p.size for p in parts) >= 2
    _assert_exact_cover(parts, 200)

  @pytest.mark.parametrize('kwargs, match', [
      (dict(sigma=-0.1), 'sigma'),
      (dict(num_clients=0), 'num_clients'),
      (dict(num_clients=11), 'num_clients'),
      (dict(min_size=3), 'min_size'),
      (dict(min_size=-1), 'min_size'),
  ])
  def test_errors(self, kwargs, match):
    args = dict(num_examples=10, num_clients=5, sigma=1.0, seed=0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
      partition_lib.quantity_skew(**args)


class TestNatural:

  def test_groups_match_keys(self):
    keys = np.array(['b', 'a', 'c', 'a', 'b', 'b'], dtype=object)
    parts, unique = partition_lib.natural(keys)
    assert list(unique) == ['a', 'b', 'c']
    np.testing.assert_array_equal(parts[0], [1, 3])
    np.testing.assert_array_equal(parts[1], [0, 4, 5])
    np.testing.assert_array_equal(parts[2], [2])
    for p, k in zip(parts, unique):
      assert np.all(keys[p] == k)
    _assert_exact_cover(parts, keys.size)

  def test_errors(self):
    with pytest.raises(ValueError, match='keys'):
      partition_lib.natural(np.array([]))
