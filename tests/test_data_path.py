"""The round data path: round_batch against a per-client loop, ordered batches,
FederatedDataset.from_clients, prefetching, and their config fields."""

import gc
import json
import threading
import time

import numpy as np
import pytest

from fedjax_fm import config as config_lib
from fedjax_fm.data import federated
from fedjax_fm.data.federated import FederatedDataset


def _random_dataset(rng, num_clients):
  """Ragged clients (empty ones, ones smaller than a batch, large ones) over
  arrays of several dtypes and trailing shapes, one of them not C-contiguous."""
  sizes = rng.choice([0, 1, 2, 3, 5, 9, 17, 40], size=num_clients)
  n = int(sizes.sum())
  arrays = {
      'x': rng.normal(size=(n, 3)).astype(np.float32),
      'label': rng.integers(0, 1000, size=n),
      'flag': rng.random(n) < 0.5,
      'tokens': rng.integers(1, 255, size=(n, 2, 2)).astype(np.uint8),
      'half': rng.normal(size=(n,)).astype(np.float16),
      'fortran': np.asfortranarray(rng.normal(size=(n, 4))),
      'text': np.array([f'w{i}' for i in range(n)], dtype='<U6'),
  }
  return FederatedDataset(arrays, np.concatenate([[0], np.cumsum(sizes)]))


def _reference_round_batch(ds, ids, num_steps, batch_size, *, seed, round_idx,
                           max_epochs, pad_clients_to, shuffle):
  """Client by client and slot by slot, from the definition."""
  slots = num_steps * batch_size
  total = len(ids) if pad_clients_to is None else pad_clients_to
  rows = np.full((total, slots), -1, dtype=np.int64)
  weight = np.zeros(total, np.float32)
  for c, cid in enumerate(ids):
    lo, hi = int(ds.offsets[cid]), int(ds.offsets[cid + 1])
    n = hi - lo
    walk = []
    epoch = 0
    while n and epoch < max_epochs and len(walk) < slots:
      if shuffle:
        keys = federated.shuffle_keys(seed, round_idx, np.full(n, cid), np.full(n, epoch),
                                      np.arange(n))
        walk += sorted(range(n), key=lambda p: (int(keys[p]), p))
      else:
        walk += list(range(n))
      epoch += 1
    walk = walk[:slots]
    weight[c] = len(walk)
    for s, p in enumerate(walk):
      rows[c, s] = lo + p
  mask = rows >= 0
  batch = {}
  for key, arr in ds.arrays.items():
    out = np.empty((total, slots) + arr.shape[1:], arr.dtype)
    out[...] = 0   # padding: 0 converted to the dtype ('0' for strings)
    for c in range(total):
      for s in range(slots):
        if mask[c, s]:
          out[c, s] = arr[rows[c, s]]
    batch[key] = out.reshape((total, num_steps, batch_size) + arr.shape[1:])
  client_id = np.zeros(total, np.int32)
  client_id[:len(ids)] = ids
  example_mask = mask.reshape(total, num_steps, batch_size)
  return {'batch': batch, 'example_mask': example_mask,
          'step_mask': example_mask.any(axis=2), 'weight': weight,
          'client_id': client_id, 'client_mask': np.arange(total) < len(ids)}


def _assert_same(got, want):
  assert set(got) == set(want)
  for key in want:
    if key == 'batch':
      assert set(got['batch']) == set(want['batch'])
      for k, v in want['batch'].items():
        assert got['batch'][k].dtype == v.dtype, k
        assert got['batch'][k].shape == v.shape, k
        np.testing.assert_array_equal(got['batch'][k], v, err_msg=k)
    else:
      assert got[key].dtype == want[key].dtype, key
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def _rebuilt(ds, how):
  """The same clients through another constructor (whose store has a zero row)."""
  if how == 'views':
    return ds
  if how == 'partition':
    parts = [np.arange(ds.offsets[i], ds.offsets[i + 1]) for i in range(ds.num_clients)]
    return FederatedDataset.from_partition(ds.arrays, parts)
  if how == 'clients':
    return FederatedDataset.from_clients([ds.client_arrays(i) for i in range(ds.num_clients)])
  return ds.subset(np.arange(ds.num_clients))


@pytest.mark.parametrize('how', ['views', 'partition', 'clients', 'subset'])
@pytest.mark.parametrize('shuffle', [True, False])
@pytest.mark.parametrize('trial', range(4))
def test_round_batch_matches_per_client_loop(trial, shuffle, how):
  rng = np.random.default_rng(trial)
  ds = _rebuilt(_random_dataset(rng, int(rng.integers(1, 30))), how)
  # Built copies gather padding from their zero row; views zero it afterwards.
  assert (ds._zero_row_store('x') is None) == (how == 'views')
  ids = rng.integers(0, ds.num_clients, size=int(rng.integers(1, 8)))  # repeats allowed
  kwargs = dict(num_steps=int(rng.integers(1, 5)), batch_size=int(rng.integers(1, 7)),
                seed=int(rng.integers(0, 2**31)), round_idx=int(rng.integers(0, 1000)),
                max_epochs=int(rng.integers(1, 4)),
                pad_clients_to=[None, len(ids), len(ids) + 3][trial % 3])
  got = ds.round_batch(ids, shuffle=shuffle, **kwargs)
  _assert_same(got, _reference_round_batch(ds, ids, shuffle=shuffle, **kwargs))


def test_round_batch_wraps_small_clients_and_pads():
  # Client sizes 3 (smaller than a batch of 4) and 0; 3 epochs fill 9 of 12 slots.
  ds = FederatedDataset({'v': np.arange(1, 4, dtype=np.int32)}, np.array([0, 3, 3]))
  for shuffle in (True, False):
    out = ds.round_batch([0, 1], 3, 4, seed=7, max_epochs=3, pad_clients_to=3,
                         shuffle=shuffle)
    v = out['batch']['v'].reshape(3, 12)
    np.testing.assert_array_equal(out['weight'], [9, 0, 0])
    np.testing.assert_array_equal(out['example_mask'].reshape(3, 12)[0],
                                  np.arange(12) < 9)
    np.testing.assert_array_equal(out['step_mask'], [[1, 1, 1], [0, 0, 0], [0, 0, 0]])
    for e in range(3):  # each epoch is a permutation of the client's examples
      assert sorted(v[0, 3 * e:3 * e + 3]) == [1, 2, 3]
    assert not v[0, 9:].any() and not v[1:].any()
    if not shuffle:
      np.testing.assert_array_equal(v[0, :9], [1, 2, 3] * 3)


def test_ordered_mode_ignores_seed_and_round():
  rng = np.random.default_rng(3)
  ds = _random_dataset(rng, 12)
  ids = np.arange(12)
  a = ds.round_batch(ids, 3, 4, seed=0, round_idx=0, max_epochs=2, shuffle=False)
  b = ds.round_batch(ids, 3, 4, seed=5, round_idx=9, max_epochs=2, shuffle=False)
  _assert_same(a, b)
  shuffled = ds.round_batch(ids, 3, 4, seed=0, round_idx=0, max_epochs=2)
  assert not np.array_equal(a['batch']['label'], shuffled['batch']['label'])
  # Same examples per epoch, only their order differs.
  np.testing.assert_array_equal(a['weight'], shuffled['weight'])


def test_shuffle_must_be_bool():
  ds = _random_dataset(np.random.default_rng(0), 3)
  with pytest.raises(ValueError, match='`shuffle` must be True or False'):
    ds.round_batch([0], 1, 1, seed=0, shuffle=1)


def test_replaced_arrays_are_not_read_from_the_old_store():
  ds = FederatedDataset.from_partition({'v': np.arange(1, 7)}, [np.arange(3), np.arange(3, 6)])
  assert ds._zero_row_store('v') is not None
  ds.arrays['v'] = ds.arrays['v'] * 10
  assert ds._zero_row_store('v') is None
  out = ds.round_batch([1], 2, 2, seed=0, shuffle=False)
  np.testing.assert_array_equal(out['batch']['v'].ravel(), [40, 50, 60, 0])


def test_round_batch_string_and_empty_store():
  # Non-numeric arrays take the generic path; an empty store gives all padding.
  ds = FederatedDataset({'s': np.array(['ab', 'c', 'de']), 'n': np.arange(3)},
                        np.array([0, 2, 3]))
  out = ds.round_batch([0, 1], 1, 3, seed=1, shuffle=False)
  np.testing.assert_array_equal(out['batch']['s'][:, 0, :2], [['ab', 'c'], ['de', '0']])
  empty = FederatedDataset({'x': np.zeros((0, 2), np.float32)}, np.array([0, 0, 0]))
  out = empty.round_batch([0, 1], 2, 2, seed=0)
  assert out['batch']['x'].shape == (2, 2, 2, 2) and not out['batch']['x'].any()
  assert not out['example_mask'].any() and not out['weight'].any()


def _weak_splitmix64(x, inplace=False):
  """A poor hash: 3 mixed high bits and the input's low 6 bits, so that sort
  keys often agree in their high bits (and sometimes entirely)."""
  x = np.asarray(x).astype(np.uint64)
  with np.errstate(over='ignore'):
    y = ((x * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(61) << np.uint64(61)
         | (x & np.uint64(63)))
  return y


@pytest.mark.parametrize('whole_epochs', [False, True])
@pytest.mark.parametrize('trial', range(3))
def test_round_batch_exact_when_keys_tie(trial, whole_epochs, monkeypatch):
  # With keys that tie, the draws still follow (full key, position), as in
  # the per-client loop (which uses the same hash). whole_epochs: every
  # client's epochs are used whole, so ties can only be among the drawn.
  monkeypatch.setattr(federated, '_splitmix64', _weak_splitmix64)
  rng = np.random.default_rng(100 + trial)
  sizes = rng.choice([1, 2, 5, 7, 30, 64, 90, 200], size=12)
  ds = FederatedDataset({'v': np.arange(int(sizes.sum()))},
                        np.concatenate([[0], np.cumsum(sizes)]))
  ids = np.arange(12)
  steps, batch = (int(sizes.max()), 2) if whole_epochs else (int(rng.integers(1, 6)), 7)
  kwargs = dict(num_steps=steps, batch_size=batch, seed=trial, round_idx=3,
                max_epochs=2, pad_clients_to=None)
  got = ds.round_batch(ids, **kwargs)
  _assert_same(got, _reference_round_batch(ds, ids, shuffle=True, **kwargs))


def test_round_batch_exact_when_the_first_draw_left_out_ties(monkeypatch):
  # Keys of positions 0..9 (seed, round, client and epoch 0 hash to 0): high
  # bits 0, 1, 2, 3, 3, 4, ... so that positions 3 and 4 tie there, and
  # position 4 has the smaller key. With 4 slots, the 4th draw is position 4.
  high = np.array([0, 1, 2, 3, 3, 4, 5, 6, 7, 8], dtype=np.uint64)
  low = np.array([0, 0, 0, 1, 0, 0, 0, 0, 0, 0], dtype=np.uint64)

  def table(x, inplace=False):
    x = np.minimum(np.asarray(x).astype(np.uint64), 9)   # beyond 9: padding
    return (high[x] << np.uint64(58)) | low[x]

  monkeypatch.setattr(federated, '_splitmix64', table)
  ds = FederatedDataset({'v': np.arange(10)}, np.array([0, 10]))
  out = ds.round_batch([0], 1, 4, seed=0, round_idx=0)
  np.testing.assert_array_equal(out['batch']['v'].ravel(), [0, 1, 2, 4])
  want = _reference_round_batch(ds, [0], 1, 4, seed=0, round_idx=0, max_epochs=1,
                                pad_clients_to=None, shuffle=True)
  _assert_same(out, want)


# ---- from_clients


def test_from_clients_list_and_mapping():
  clients = [
      {'x': np.ones((2, 3), np.float32), 'y': [1, 2]},
      {'x': [[4.0, 5.0, 6.0]], 'y': np.array([7], np.int32)},
      {'x': [], 'y': []},
      {'x': np.zeros((0, 3), np.float32), 'y': np.zeros(0, np.int32)},
      {'x': np.full((3, 3), 2, np.float32), 'y': np.array([8, 9, 10], np.int32)},
  ]
  ds = FederatedDataset.from_clients(clients)
  np.testing.assert_array_equal(ds.offsets, [0, 2, 3, 3, 3, 6])
  assert ds.arrays['x'].dtype == np.float32 and ds.arrays['x'].shape == (6, 3)
  assert ds.arrays['y'].dtype == np.int32
  for j, client in enumerate(clients):
    got = ds.client_arrays(j)
    for k in ('x', 'y'):
      np.testing.assert_array_equal(got[k], np.asarray(client[k]).reshape(got[k].shape))
  by_name = FederatedDataset.from_clients({f'user{j}': c for j, c in enumerate(clients)})
  np.testing.assert_array_equal(by_name.offsets, ds.offsets)
  for k in ('x', 'y'):
    np.testing.assert_array_equal(by_name.arrays[k], ds.arrays[k])
  # Strings of different lengths share one dtype.
  s = FederatedDataset.from_clients([{'s': np.array(['a'])}, {'s': np.array(['abc', 'de'])}])
  np.testing.assert_array_equal(s.arrays['s'], ['a', 'abc', 'de'])


def test_from_clients_round_batch_matches_from_partition():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(20, 2)).astype(np.float32)
  parts = [np.array([3, 1, 4]), np.array([], np.int64), np.array([0, 5, 9, 2, 6, 8])]
  a = FederatedDataset.from_partition({'x': x}, parts)
  b = FederatedDataset.from_clients([{'x': x[p]} for p in parts])
  _assert_same(b.round_batch([0, 2, 1], 2, 2, seed=4), a.round_batch([0, 2, 1], 2, 2, seed=4))


@pytest.mark.parametrize('clients, match', [
    ([], r'at least one client'),
    ('abc', r'sequence of dicts'),
    ([{'x': [1]}, 3], r'clients\[1\] must be a non-empty dict'),
    ([{'x': [1]}, {'x': [1], 'y': [2]}], r"clients\[1\] has keys \['x', 'y'\].*extra \['y'\]"),
    ({'a': {'x': [1]}, 'b': {'z': [1]}}, r"clients\['b'\] has keys \['z'\].*missing \['x'\]"),
    ([{'x': [1]}, {'x': 5}], r"clients\[1\]\['x'\] must have a leading example axis"),
    ([{'x': [1, 2], 'y': [1]}], r"clients\[0\] has 1 examples in 'y' but 2 in 'x'"),
    ([{'x': np.ones((2, 3))}, {'x': np.ones((1, 4))}],
     r"clients\[1\]\['x'\] has examples of shape \(4,\) but clients\[0\]\['x'\] has \(3,\)"),
    ([{'x': [[1, 2], [3]]}], r"clients\[0\]\['x'\] is not a rectangular array"),
    ([{'x': np.ones(2, np.float32)}, {'x': np.ones(2, np.float64)}],
     r"clients\[1\]\['x'\] has dtype float64 but clients\[0\]\['x'\] has float32"),
    ([{'x': np.ones(2, np.int32)}, {'x': [1.5]}],
     r"clients\[1\]\['x'\] holds float64 values that do not convert to the dtype int32"),
    ([{'x': np.ones(2, np.int8)}, {'x': [300]}], r"clients\[1\]\['x'\] holds int64 values"),
    ([{'x': ['a']}, {'x': [1]}], r"clients\[1\]\['x'\] holds int64 values but"),
    ([{'x': [object()]}], r"clients\[0\]\['x'\] has dtype object"),
])
def test_from_clients_errors_name_client_and_key(clients, match):
  with pytest.raises(ValueError, match=match):
    FederatedDataset.from_clients(clients)


# ---- prefetch


def _prefetch_threads():
  return {t for t in threading.enumerate() if t.name == 'fedjax_fm-prefetch'}


def _wait_gone(threads, timeout=5.0):
  for t in threads:
    t.join(timeout)
  return not any(t.is_alive() for t in threads)


@pytest.mark.parametrize('buffer_size', [1, 2, 5])
def test_prefetch_same_items_in_order(buffer_size):
  items = [{'r': r, 'a': np.full(3, r)} for r in range(25)]
  got = list(federated.prefetch(iter(items), buffer_size=buffer_size))
  assert [g['r'] for g in got] == list(range(25))
  assert all(g is i for g, i in zip(got, items))


def test_prefetch_propagates_worker_exception_while_consumer_waits():
  release = threading.Event()

  def source():
    yield 0
    release.wait(5)
    raise KeyError('round 1 failed')

  it = federated.prefetch(source(), buffer_size=2)
  assert next(it) == 0
  threading.Timer(0.05, release.set).start()   # the consumer is already blocked on get
  with pytest.raises(KeyError, match='round 1 failed'):
    next(it)


def test_prefetch_consumer_stopping_early_ends_the_worker():
  before = _prefetch_threads()
  closed = threading.Event()
  produced = []

  def source():
    try:
      for i in range(10**6):
        produced.append(i)
        yield i
    finally:
      closed.set()

  for i, item in enumerate(federated.prefetch(source(), buffer_size=2)):
    assert item == i
    if i == 3:
      break  # the generator is dropped without an explicit close
  gc.collect()
  assert closed.wait(5), 'the source generator was not closed'
  assert _wait_gone(_prefetch_threads() - before)
  assert len(produced) <= 4 + 2 + 1


def test_prefetch_stops_while_worker_is_busy():
  before = _prefetch_threads()
  started = threading.Event()

  def source():
    yield 0
    started.set()
    time.sleep(0.3)   # the consumer stops while this item is being built
    yield 1
    yield 2

  it = federated.prefetch(source(), buffer_size=1)
  assert next(it) == 0
  assert started.wait(5)
  t0 = time.monotonic()
  it.close()
  assert time.monotonic() - t0 < 0.25   # close does not wait for the worker
  assert _wait_gone(_prefetch_threads() - before)


def test_prefetch_of_a_non_iterable_raises():
  with pytest.raises(TypeError):
    next(federated.prefetch(42))


# ---- config


def test_config_defaults_and_validation():
  c = config_lib.base_config()
  assert c.data.shuffle is True and c.data.prefetch == 2
  config_lib.validate(c)
  c.data.prefetch = 0
  config_lib.validate(c)
  for field, value, message in [
      ('shuffle', None, 'config.data.shuffle=None is invalid: must be True or False'),
      ('prefetch', -1, 'config.data.prefetch=-1 is invalid: must be >= 0'),
      ('prefetch', True, 'config.data.prefetch=True is invalid: must be an integer'),
  ]:
    c = config_lib.base_config()
    c.data[field] = value
    with pytest.raises(config_lib.ConfigError, match=message.replace('(', r'\(')):
      config_lib.validate(c)


# ---- the training loop


def _tiny_mlp_config(prefetch, strategy='chunked'):
  import importlib.util   # pylint: disable=g-import-not-at-top
  import os   # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      'experiments', 'configs', 'mlp_synthetic.py')
  spec = importlib.util.spec_from_file_location('mlp_synthetic', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config('tiny')
  c.progress = False
  c.data.prefetch = prefetch
  c.fl.strategy = strategy
  if strategy == 'sharded':
    c.fl.chunk_size = 1
  return c


@pytest.mark.slow
@pytest.mark.parametrize('strategy', ['chunked', 'sharded'])
def test_loop_prefetch_copies_rounds_on_its_thread_and_changes_nothing(
    tmp_path, monkeypatch, strategy):
  import jax   # pylint: disable=g-import-not-at-top
  from fedjax_fm import train   # pylint: disable=g-import-not-at-top
  put_threads = []
  device_put = jax.device_put

  def recording_put(x, *args, **kwargs):
    if isinstance(x, dict) and 'example_mask' in x:   # a round's data
      put_threads.append(threading.current_thread().name)
    return device_put(x, *args, **kwargs)

  monkeypatch.setattr(jax, 'device_put', recording_put)
  summaries = {}
  for prefetch in (0, 2):
    put_threads.clear()
    summaries[prefetch] = train.run(_tiny_mlp_config(prefetch, strategy),
                                    str(tmp_path / str(prefetch)))
    rounds = summaries[prefetch]['rounds']
    worker = 'fedjax_fm-prefetch' if prefetch else threading.current_thread().name
    assert put_threads == [worker] * rounds
  assert summaries[0]['after'] == summaries[2]['after']
  lines = [(tmp_path / str(p) / 'metrics.jsonl').read_text().splitlines() for p in (0, 2)]
  strip = lambda line: {k: v for k, v in json.loads(line).items()   # noqa: E731
                        if not k.endswith('time_s')}
  assert [strip(x) for x in lines[0]] == [strip(x) for x in lines[1]]


def test_experiment_data_shuffle_false_gives_stored_order():
  """`data.shuffle=False` reaches the run: each client's batches are its stored rows."""
  from experiments.configs import mlp_synthetic  # pylint: disable=g-import-not-at-top
  from fedjax_fm import train  # pylint: disable=g-import-not-at-top
  c = mlp_synthetic.get_config('tiny')
  c.data.shuffle = False
  exp = train.build_experiment(c)
  data = exp.round_data(0)
  ds = exp.data.train
  for row, cid in enumerate(np.asarray(data['client_id'])[:3]):
    stored = ds.client_arrays(int(cid))
    n = min(len(next(iter(stored.values()))), c.fl.batch_size)
    for key, value in stored.items():
      got = np.asarray(data['batch'][key])[row, 0, :n]
      np.testing.assert_array_equal(got, value[:n], err_msg=key)
  c.data.shuffle = True
  shuffled = train.build_experiment(c).round_data(0)
  assert any(not np.array_equal(np.asarray(shuffled['batch'][k]), np.asarray(data['batch'][k]))
             for k in data['batch'])
