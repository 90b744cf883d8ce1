"""Host time to build one round's data: round_batch vs a plain NumPy gather.

A synthetic federated dataset (50,000 clients with log-normal sizes, so most
clients hold fewer examples than a round's ``local_steps x batch`` slots and a
few hold many) of MLP-style examples: 32 float32 features and an int32 label.
For 500 and 5,000 clients per round, side by side in one process:

* ``gather``: ``np.take`` of precomputed row indices for every array, the
  floor for any data path that copies the rows of a round;
* ``round_batch``: ``sample_clients`` + ``FederatedDataset.round_batch``
  (shuffled, the default) on the dataset built by ``from_partition`` (as the
  training pipeline builds it: its store ends with a zero row that padding
  slots read); ``ordered``: the same with ``shuffle=False``;
  ``round_batch_views``: a ``FederatedDataset(arrays, offsets)`` over the
  caller's arrays, whose padding slots are zeroed after the gather;
* ``previous``: the implementation of round_batch this one replaced (a
  lexsort over ``(segment, key, position)`` and a 2-D scatter of the rows),
  kept here as the baseline; its output is checked equal to round_batch's.

Medians over repeats of wall-clock and of process CPU time (the latter less
sensitive to other processes on a shared machine), rounds interleaved so that
the machine's noise hits each method alike.

  python scripts/bench_data.py
  python scripts/bench_data.py --clients 5000 --repeats 5

The last line printed is ``{"bench": "data", ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fedjax_fm.data import FederatedDataset  # noqa: E402
from fedjax_fm.data.federated import _segment_arange, shuffle_keys  # noqa: E402
from fedjax_fm.engine.sampling import sample_clients  # noqa: E402


def _parse():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--num_clients', type=int, default=50_000)
  p.add_argument('--clients', type=int, nargs='+', default=[500, 5000])
  p.add_argument('--local_steps', type=int, default=5)
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--features', type=int, default=32)
  p.add_argument('--mean_size', type=float, default=30.0,
                 help='mean examples per client (log-normal, sigma 1)')
  p.add_argument('--repeats', type=int, default=9)
  return p.parse_args()


def make_dataset(num_clients, mean_size, features, seed=0):
  rng = np.random.default_rng(seed)
  sigma = 1.0
  sizes = np.maximum(1, np.round(rng.lognormal(np.log(mean_size) - sigma**2 / 2, sigma,
                                               num_clients))).astype(np.int64)
  n = int(sizes.sum())
  arrays = {'x': rng.normal(size=(n, features)).astype(np.float32),
            'label': rng.integers(0, 10, n).astype(np.int32)}
  offsets = np.concatenate([[0], np.cumsum(sizes)])
  # As the training pipeline builds it (a partition of the examples), and as a
  # plain view of arrays the caller owns (padding is then zeroed after).
  parts = [np.arange(a, b) for a, b in zip(offsets[:-1], offsets[1:])]
  return FederatedDataset.from_partition(arrays, parts), FederatedDataset(arrays, offsets)


def previous_round_batch(ds, ids, num_steps, batch_size, *, seed, round_idx):
  """round_batch as it was (max_epochs=1, no padding clients), for comparison."""
  ids = np.asarray(ids, np.int64)
  num_real = num_total = ids.size
  slots = num_steps * batch_size
  sizes = ds.client_sizes[ids]
  used = np.minimum(sizes, slots)
  epochs = np.where(sizes > 0, -(-used // np.maximum(sizes, 1)), 0)
  seg_client = np.repeat(np.arange(num_real, dtype=np.int64), epochs)
  seg_epoch = _segment_arange(epochs)
  seg_len = sizes[seg_client]
  item_seg = np.repeat(np.arange(seg_client.size, dtype=np.int64), seg_len)
  item_pos = _segment_arange(seg_len)
  item_client = seg_client[item_seg]
  keys = shuffle_keys(seed, round_idx, ids[item_client], seg_epoch[item_seg], item_pos)
  order = np.lexsort((item_pos, keys, item_seg))
  shuffled_pos = item_pos[order]
  slot = _segment_arange(sizes * epochs)
  keep = slot < used[item_client]
  rows = np.full((num_total, slots), -1, dtype=np.int64)
  rows[item_client[keep], slot[keep]] = ds.offsets[ids][item_client[keep]] + shuffled_pos[keep]
  mask = rows >= 0
  flat_rows = np.maximum(rows.reshape(-1), 0)
  flat_pad = ~mask.reshape(-1)
  batch = {}
  for key, arr in ds.arrays.items():
    data = arr[flat_rows]
    data[flat_pad] = 0
    batch[key] = data.reshape((num_total, num_steps, batch_size) + arr.shape[1:])
  example_mask = mask.reshape(num_total, num_steps, batch_size)
  return {'batch': batch, 'example_mask': example_mask,
          'step_mask': example_mask.any(axis=2), 'weight': used.astype(np.float32),
          'client_id': ids.astype(np.int32), 'client_mask': np.ones(num_total, bool)}


def bench(ds, views, clients, args):
  steps, batch = args.local_steps, args.batch

  def ids_of(r):
    return sample_clients(ds.num_clients, clients, seed=0, round_idx=r)

  # The gather baseline gets the round's rows for free: computed outside the timer.
  rows = {r: _rows_of(ds, ids_of(r), steps, batch, r) for r in range(args.repeats + 1)}
  methods = {
      'gather': lambda r: {k: np.take(v, rows[r], axis=0) for k, v in ds.arrays.items()},
      'round_batch': lambda r: ds.round_batch(ids_of(r), steps, batch, seed=0, round_idx=r),
      'ordered': lambda r: ds.round_batch(ids_of(r), steps, batch, seed=0, round_idx=r,
                                          shuffle=False),
      'round_batch_views': lambda r: views.round_batch(ids_of(r), steps, batch, seed=0,
                                                       round_idx=r),
      'previous': lambda r: previous_round_batch(ds, ids_of(r), steps, batch, seed=0,
                                                 round_idx=r),
  }
  new = methods['round_batch'](0)
  for other in (methods['previous'](0), methods['round_batch_views'](0)):
    for key in new:
      if key == 'batch':
        for k in new['batch']:
          np.testing.assert_array_equal(new['batch'][k], other['batch'][k])
      else:
        np.testing.assert_array_equal(new[key], other[key])
  wall = {m: [] for m in methods}
  cpu = {m: [] for m in methods}
  for r in range(args.repeats + 1):   # round 0 warms up
    for m, fn in methods.items():
      t0, c0 = time.perf_counter(), time.process_time()
      fn(r)
      if r:
        wall[m].append(time.perf_counter() - t0)
        cpu[m].append(time.process_time() - c0)
  out = {}
  for clock, times in (('wall', wall), ('cpu', cpu)):
    med = {m: float(np.median(t)) for m, t in times.items()}
    out.update({f'c{clients}_{m}_{clock}_ms': round(1e3 * v, 2) for m, v in med.items()})
    for m in ('round_batch', 'ordered', 'round_batch_views', 'previous'):
      out[f'c{clients}_{m}_over_gather_{clock}'] = round(med[m] / med['gather'], 2)
    out[f'c{clients}_previous_over_round_batch_{clock}'] = round(
        med['previous'] / med['round_batch'], 2)
  slots = clients * steps * batch
  out[f'c{clients}_padding_fraction'] = round(
      1 - float(ds.client_sizes[ids_of(0)].clip(max=steps * batch).sum()) / slots, 3)
  print(json.dumps({'clients': clients, **out}), flush=True)
  return out


def _rows_of(ds, ids, steps, batch, r):
  """The store rows round_batch reads for round r (padding slots read row 0)."""
  tagged = FederatedDataset({'row': np.arange(ds.num_examples, dtype=np.int64)}, ds.offsets)
  return tagged.round_batch(ids, steps, batch, seed=0, round_idx=r)['batch']['row'].reshape(-1)


def main():
  args = _parse()
  t0 = time.perf_counter()
  ds, views = make_dataset(args.num_clients, args.mean_size, args.features)
  build_s = time.perf_counter() - t0
  result = {'bench': 'data', 'num_clients': ds.num_clients, 'num_examples': ds.num_examples,
            'local_steps': args.local_steps, 'batch': args.batch, 'features': args.features,
            'mean_size': args.mean_size, 'repeats': args.repeats,
            'dataset_build_s': round(build_s, 2)}
  for clients in args.clients:
    result.update(bench(ds, views, clients, args))
  print(json.dumps(result))


if __name__ == '__main__':
  main()
