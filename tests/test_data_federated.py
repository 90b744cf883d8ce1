"""Tests for fedjax_fm.data.federated."""

import threading
import time

import numpy as np
import pytest

from fedjax_fm.data import federated
from fedjax_fm.data.federated import FederatedDataset


def _make_dataset(sizes=(5, 0, 12, 3, 30, 1), feature_dim=2):
  """Each example's `id` is its global row; `owner` is its client."""
  sizes = np.asarray(sizes)
  n = int(sizes.sum())
  offsets = np.concatenate([[0], np.cumsum(sizes)])
  arrays = {
      'id': np.arange(n, dtype=np.int64) + 1,  # 1-based so 0 means padding
      'owner': np.repeat(np.arange(sizes.size), sizes).astype(np.int32),
      'x': np.arange(n * feature_dim, dtype=np.float32).reshape(
          n, feature_dim) + 1.0,
  }
  return FederatedDataset(arrays, offsets)


class TestConstruction:

  def test_csr_invariants(self):
    ds = _make_dataset()
    assert ds.num_clients == 6
    assert ds.num_examples == 51
    assert ds.client_sizes.dtype == np.int64
    np.testing.assert_array_equal(ds.client_sizes, [5, 0, 12, 3, 30, 1])
    assert sorted(ds.keys) == ['id', 'owner', 'x']
    for i in range(ds.num_clients):
      arrays = ds.client_arrays(i)
      assert arrays['owner'].shape[0] == ds.client_sizes[i]
      assert np.all(arrays['owner'] == i)

  @pytest.mark.parametrize('offsets, match', [
      ([1, 3, 4], r'offsets\[0\]'),
      ([0, 3, 5], r'offsets\[-1\]'),
      ([0, 3, 2, 4], 'non-decreasing'),
      ([0], 'length'),
      ([0.0, 4.0], 'integers'),
  ])
  def test_bad_offsets(self, offsets, match):
    with pytest.raises(ValueError, match=match):
      FederatedDataset({'x': np.zeros(4)}, np.asarray(offsets))

  def test_bad_arrays(self):
    with pytest.raises(ValueError, match='leading dimension'):
      FederatedDataset({'x': np.zeros(4), 'y': np.zeros(3)}, np.array([0, 4]))
    with pytest.raises(ValueError, match='non-empty'):
      FederatedDataset({}, np.array([0]))

  def test_from_partition_reorders(self):
    arrays = {'v': np.arange(10) * 10}
    ds = FederatedDataset.from_partition(
        arrays, [np.array([7, 2]), np.array([], dtype=np.int64),
                 np.array([0, 9, 4])])
    np.testing.assert_array_equal(ds.offsets, [0, 2, 2, 5])
    np.testing.assert_array_equal(ds.client_arrays(0)['v'], [70, 20])
    np.testing.assert_array_equal(ds.client_arrays(2)['v'], [0, 90, 40])
    assert ds.client_arrays(1)['v'].size == 0

  def test_from_partition_errors(self):
    arrays = {'v': np.arange(5)}
    with pytest.raises(ValueError, match='more than once'):
      FederatedDataset.from_partition(arrays, [np.array([0, 1]),
                                               np.array([1, 2])])
    with pytest.raises(ValueError, match='outside'):
      FederatedDataset.from_partition(arrays, [np.array([0, 5])])
    with pytest.raises(ValueError, match='outside'):
      FederatedDataset.from_partition(arrays, [np.array([-1])])

  def test_subset(self):
    ds = _make_dataset()
    sub = ds.subset([4, 0, 1])
    np.testing.assert_array_equal(sub.client_sizes, [30, 5, 0])
    for j, i in enumerate([4, 0, 1]):
      for k in ds.keys:
        np.testing.assert_array_equal(sub.client_arrays(j)[k],
                                      ds.client_arrays(i)[k])
    with pytest.raises(ValueError, match='client_ids'):
      ds.subset([6])
    with pytest.raises(ValueError, match='repeat'):
      ds.subset([1, 1])

  def test_client_arrays_out_of_range(self):
    with pytest.raises(ValueError, match=r'\[0, 6\)'):
      _make_dataset().client_arrays(6)


class TestRoundBatch:

  def test_shapes_and_dtypes(self):
    ds = _make_dataset()
    out = ds.round_batch([0, 2, 4], num_steps=3, batch_size=4, seed=0)
    assert out['batch']['id'].shape == (3, 3, 4)
    assert out['batch']['id'].dtype == np.int64
    assert out['batch']['x'].shape == (3, 3, 4, 2)
    assert out['batch']['x'].dtype == np.float32
    assert out['batch']['owner'].dtype == np.int32
    assert out['example_mask'].shape == (3, 3, 4)
    assert out['example_mask'].dtype == np.bool_
    assert out['step_mask'].shape == (3, 3)
    assert out['step_mask'].dtype == np.bool_
    assert out['weight'].dtype == np.float32
    assert out['client_id'].dtype == np.int32
    assert out['client_mask'].dtype == np.bool_
    np.testing.assert_array_equal(out['client_id'], [0, 2, 4])

  def test_examples_from_right_client_and_masks(self):
    ds = _make_dataset()
    ids = [0, 1, 2, 3, 4, 5]
    out = ds.round_batch(ids, num_steps=2, batch_size=4, seed=3)
    mask = out['example_mask']
    owner = out['batch']['owner']
    row = out['batch']['id']
    for c, cid in enumerate(ids):
      n = ds.client_sizes[cid]
      used = min(n, 8)
      # Real slots first, in order, then padding.
      flat = mask[c].reshape(-1)
      assert flat.sum() == used == out['weight'][c]
      assert np.all(flat[:used]) and not np.any(flat[used:])
      assert np.all(owner[c][mask[c]] == cid)
      # Used rows belong to the client's CSR range and never repeat.
      real = row[c][mask[c]] - 1
      assert np.all((real >= ds.offsets[cid]) & (real < ds.offsets[cid + 1]))
      assert np.unique(real).size == real.size
      # Padding slots are zeros.
      assert np.all(row[c][~mask[c]] == 0)
      assert np.all(out['batch']['x'][c][~mask[c]] == 0)
    np.testing.assert_array_equal(out['step_mask'], mask.any(axis=2))
    np.testing.assert_array_equal(out['client_mask'], True)

  def test_batch_data_matches_rows(self):
    ds = _make_dataset()
    out = ds.round_batch([4], num_steps=2, batch_size=5, seed=1)
    rows = out['batch']['id'][0].reshape(-1) - 1
    np.testing.assert_array_equal(out['batch']['x'][0].reshape(-1, 2),
                                  ds.arrays['x'][rows])

  def test_one_epoch_covers_client_without_repeats(self):
    ds = _make_dataset()
    out = ds.round_batch([2], num_steps=4, batch_size=3, seed=5)  # 12 slots
    real = np.sort(out['batch']['id'][0][out['example_mask'][0]] - 1)
    np.testing.assert_array_equal(real, np.arange(ds.offsets[2],
                                                  ds.offsets[3]))

  def test_is_shuffled(self):
    ds = _make_dataset()
    orders = {tuple(ds.round_batch([4], 6, 5, seed=s)['batch']['id'].ravel())
              for s in range(5)}
    assert len(orders) == 5
    identity = tuple(ds.arrays['id'][ds.offsets[4]:ds.offsets[5]])
    assert identity not in orders

  def test_max_epochs_repeats_with_reshuffle(self):
    ds = _make_dataset()
    # Client 3 has 3 examples; 3 epochs fill 9 of 10 slots.
    out = ds.round_batch([3], num_steps=5, batch_size=2, seed=2, max_epochs=3)
    assert out['weight'][0] == 9
    rows = out['batch']['id'][0].reshape(-1)
    mask = out['example_mask'][0].reshape(-1)
    assert mask[:9].all() and not mask[9]
    expected = set(range(ds.offsets[3] + 1, ds.offsets[4] + 1))
    for e in range(3):
      assert set(rows[3 * e:3 * e + 3]) == expected
    # Limited by the slots rather than by the epochs.
    out = ds.round_batch([4], num_steps=5, batch_size=10, seed=2,
                         max_epochs=3)
    assert out['weight'][0] == 50
    real = out['batch']['id'][0].reshape(-1) - 1
    counts = np.bincount(real - ds.offsets[4], minlength=30)
    np.testing.assert_array_equal(np.sort(counts), [1] * 10 + [2] * 20)
    # Epochs are reshuffled independently.
    orders = set()
    for s in range(4):
      rows = ds.round_batch([4], 6, 10, seed=s, max_epochs=2)['batch']['id']
      rows = rows[0].reshape(-1)
      orders.add(tuple(rows[:30]) == tuple(rows[30:]))
    assert orders == {False}

  def test_zero_size_client(self):
    ds = _make_dataset()
    out = ds.round_batch([1, 1], num_steps=2, batch_size=3, seed=0,
                         max_epochs=4)
    assert not out['example_mask'].any()
    assert not out['step_mask'].any()
    np.testing.assert_array_equal(out['weight'], [0, 0])
    np.testing.assert_array_equal(out['client_mask'], [True, True])

  def test_pad_clients(self):
    ds = _make_dataset()
    out = ds.round_batch([4, 2], num_steps=2, batch_size=3, seed=0,
                         pad_clients_to=5)
    assert out['batch']['x'].shape == (5, 2, 3, 2)
    np.testing.assert_array_equal(out['client_mask'],
                                  [True, True, False, False, False])
    np.testing.assert_array_equal(out['client_id'], [4, 2, 0, 0, 0])
    np.testing.assert_array_equal(out['weight'], [6, 6, 0, 0, 0])
    assert not out['example_mask'][2:].any()
    assert not out['step_mask'][2:].any()
    for k in ds.keys:
      assert np.all(out['batch'][k][2:] == 0)

  def test_deterministic_and_independent_of_other_clients(self):
    ds = _make_dataset()
    kwargs = dict(num_steps=3, batch_size=4, seed=11, round_idx=7,
                  max_epochs=2)
    a = ds.round_batch([0, 2, 4], **kwargs)
    b = ds.round_batch([0, 2, 4], **kwargs)
    c = ds.round_batch([5, 4, 3, 1], pad_clients_to=6, **kwargs)
    for k in ds.keys:
      np.testing.assert_array_equal(a['batch'][k], b['batch'][k])
      np.testing.assert_array_equal(a['batch'][k][2], c['batch'][k][1])
    np.testing.assert_array_equal(a['example_mask'][2], c['example_mask'][1])
    # The subset view gives the same shuffles when client ids are preserved.
    d = ds.round_batch([4], **kwargs)
    np.testing.assert_array_equal(a['batch']['id'][2], d['batch']['id'][0])

  def test_round_and_seed_change_shuffle(self):
    ds = _make_dataset()
    base = ds.round_batch([4], 2, 4, seed=0, round_idx=0)['batch']['id']
    other_round = ds.round_batch([4], 2, 4, seed=0, round_idx=1)['batch']['id']
    other_seed = ds.round_batch([4], 2, 4, seed=1, round_idx=0)['batch']['id']
    assert not np.array_equal(base, other_round)
    assert not np.array_equal(base, other_seed)

  def test_shuffle_is_uniform(self):
    # First slot of a 4-example client should be uniform over its examples.
    ds = FederatedDataset({'v': np.arange(4)}, np.array([0, 4]))
    first = np.array([ds.round_batch([0], 1, 1, seed=0, round_idx=r)
                      ['batch']['v'][0, 0, 0] for r in range(800)])
    counts = np.bincount(first, minlength=4)
    chi2 = ((counts - 200.0)**2 / 200.0).sum()
    assert chi2 < 16.3  # p ~ 0.001 for 3 degrees of freedom.

  @pytest.mark.parametrize('kwargs, match', [
      (dict(client_ids=[0, 6], num_steps=1, batch_size=1), 'client_ids'),
      (dict(client_ids=[-1], num_steps=1, batch_size=1), 'client_ids'),
      (dict(client_ids=[0], num_steps=-1, batch_size=1), 'num_steps'),
      (dict(client_ids=[0], num_steps=0, batch_size=1), 'num_steps'),
      (dict(client_ids=[0], num_steps=1, batch_size=0), 'batch_size'),
      (dict(client_ids=[0], num_steps=1, batch_size=1, max_epochs=0),
       'max_epochs'),
      (dict(client_ids=[0, 2], num_steps=1, batch_size=1, pad_clients_to=1),
       'pad_clients_to'),
      (dict(client_ids=[[0, 2]], num_steps=1, batch_size=1), '1-D'),
  ])
  def test_errors(self, kwargs, match):
    with pytest.raises(ValueError, match=match):
      _make_dataset().round_batch(seed=0, **kwargs)

  def test_empty_store(self):
    ds = FederatedDataset({'v': np.zeros((0, 3), np.int32)}, np.array([0, 0]))
    out = ds.round_batch([0], 2, 2, seed=0, pad_clients_to=2)
    assert out['batch']['v'].shape == (2, 2, 2, 3)
    assert not out['example_mask'].any()


class TestShuffleKeys:

  def test_depends_on_every_input(self):
    base = federated.shuffle_keys(1, 2, np.array([3]), np.array([4]),
                                  np.array([5]))
    for args in [(0, 2, 3, 4, 5), (1, 0, 3, 4, 5), (1, 2, 0, 4, 5),
                 (1, 2, 3, 0, 5), (1, 2, 3, 4, 0)]:
      s, r, c, e, p = args
      other = federated.shuffle_keys(s, r, np.array([c]), np.array([e]),
                                     np.array([p]))
      assert other[0] != base[0]
    assert base.dtype == np.uint64


class TestPrefetch:

  def test_order(self):
    assert list(federated.prefetch(range(100), buffer_size=3)) == list(
        range(100))
    assert list(federated.prefetch(iter([]))) == []

  def test_runs_in_background(self):
    produced = []

    def gen():
      for i in range(5):
        produced.append(i)
        yield i

    it = federated.prefetch(gen(), buffer_size=2)
    assert next(it) == 0
    deadline = time.monotonic() + 5
    while len(produced) < 4 and time.monotonic() < deadline:
      time.sleep(0.01)
    time.sleep(0.1)
    # The producer ran ahead of the consumer: two items wait in the buffer and
    # a third is blocked on it.
    assert len(produced) == 4
    assert list(it) == [1, 2, 3, 4]

  def test_exception_propagates(self):
    def gen():
      yield 1
      yield 2
      raise RuntimeError('boom')

    it = federated.prefetch(gen())
    assert next(it) == 1
    assert next(it) == 2
    with pytest.raises(RuntimeError, match='boom'):
      next(it)

  def test_close_stops_producer(self):
    count = [0]

    def gen():
      while True:
        count[0] += 1
        yield count[0]

    it = federated.prefetch(gen(), buffer_size=1)
    assert next(it) == 1
    start = time.monotonic()
    it.close()
    assert time.monotonic() - start < 1.0
    threads = [t for t in threading.enumerate()
               if t.name == 'fedjax_fm-prefetch']
    for t in threads:
      t.join(timeout=2.0)
    assert not any(t.is_alive() for t in threads)
    assert count[0] <= 4

  def test_bad_buffer_size(self):
    with pytest.raises(ValueError, match='buffer_size'):
      federated.prefetch(range(3), buffer_size=0)
