"""Encode + decode time of every compressor beside a plain copy of the same bytes.

One float32 matrix per size (``--sizes 1024 4096``: 1024x1024 = 1M and
4096x4096 = 16M parameters). Each operator's ``encode`` and ``decode`` are
jitted separately (so the payload is materialised, as on a real wire),
compiled once, then timed ``--repeats`` times each (median); ``time_s`` is
their sum. The copy ``x + 0`` of the same array is the memory-bandwidth floor,
timed in the same process (3x the repeats), so ``ratio_to_copy`` is meaningful
on a shared, noisy machine. The compression
ratio is input bytes / payload bytes (read off the payload arrays).

  python scripts/bench_compress.py                       # 1M and 16M, 5 repeats
  python scripts/bench_compress.py --sizes 1024 --repeats 5 --ops top_k sign

The last line printed is ``{"bench": "compress", ...}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

from fedjax_fm import compress


def _operators():
  c = compress
  return {
      'top_k_1%': lambda: c.top_k(0.01),
      'top_k_1%_threshold': lambda: c.top_k(0.01, approximate='threshold'),
      'random_k_1%': lambda: c.random_k(0.01),
      'threshold_2.576': lambda: c.threshold(2.576, max_fraction=0.02),
      'stochastic_uniform_4b': lambda: c.stochastic_uniform(4),
      'stochastic_uniform_4b_block256': lambda: c.stochastic_uniform(4, block_size=256),
      'deterministic_8b': lambda: c.deterministic(8),
      'qsgd_4b_block256': lambda: c.qsgd(4, block_size=256),
      'sign': lambda: c.sign(),
      'ternary': lambda: c.ternary(),
      'svd_r8': lambda: c.svd(8),
      'powersgd_r8': lambda: c.powersgd(8),
      'top_k_1%+su4b': lambda: c.chain(c.top_k(0.01), c.stochastic_uniform(4)),
      'ef(top_k_1%)': lambda: c.error_feedback(c.top_k(0.01)),
  }


def _parse():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--sizes', type=int, nargs='+', default=[1024, 4096],
                 help='sides of the square float32 matrices')
  p.add_argument('--repeats', type=int, default=5)
  p.add_argument('--ops', nargs='+', default=None, help=f'subset of {list(_operators())}')
  p.add_argument('--svd_max_side', type=int, default=2048,
                 help='skip the full SVD above this side (O(n^3) on CPU)')
  return p.parse_args()


def _time(fn, args, repeats):
  jax.block_until_ready(fn(*args))     # compile + warm up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main():
  args = _parse()
  ops = _operators()
  names = args.ops or list(ops)
  for n in names:
    if n not in ops:
      raise ValueError(f'unknown op {n!r}; allowed: {list(ops)}')
  result = {'bench': 'compress', 'device': jax.devices()[0].device_kind,
            'backend': jax.default_backend(), 'repeats': args.repeats, 'sizes': {}}
  key = jax.random.key(0)
  for side in args.sizes:
    x = jax.random.normal(jax.random.key(1), (side, side), jnp.float32)
    tree = {'w': x}
    copy = jax.jit(lambda t: jax.tree.map(lambda a: a + 0.0, t))
    copy_s = _time(copy, (tree,), 3 * args.repeats)
    label = f'{side}x{side}'
    entry = {'params': side * side, 'input_bytes': x.nbytes, 'copy_s': round(copy_s, 6),
             'ops': {}}
    print(f'[{label}] copy: {copy_s * 1e3:.2f} ms', flush=True)
    for name in names:
      if name.startswith('svd') and side > args.svd_max_side:
        print(f'[{label}] {name}: skipped (side > --svd_max_side)', flush=True)
        entry['ops'][name] = None
        continue
      c = ops[name]()
      state = c.init(tree)
      encode = jax.jit(c.encode)
      decode = jax.jit(c.decode)
      payload, _ = encode(key, tree, state)
      t_enc = _time(encode, (key, tree, state), args.repeats)
      t_dec = _time(decode, (payload,), args.repeats)
      t = t_enc + t_dec
      nbytes = compress.payload_nbytes(c, tree)
      entry['ops'][name] = {'time_s': round(t, 6), 'encode_s': round(t_enc, 6),
                            'decode_s': round(t_dec, 6), 'ratio_to_copy': round(t / copy_s, 2),
                            'payload_bytes': nbytes,
                            'compression_ratio': round(x.nbytes / nbytes, 2)}
      print(f'[{label}] {name}: {t * 1e3:.2f} ms = encode {t_enc * 1e3:.2f} + decode '
            f'{t_dec * 1e3:.2f} ({t / copy_s:.1f}x copy), compression {x.nbytes / nbytes:.1f}x',
            flush=True)
    result['sizes'][label] = entry
  print(json.dumps(result))


if __name__ == '__main__':
  main()
