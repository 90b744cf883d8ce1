"""Compile time of the federated round against a hand-written jitted round.

FedAvg of an MLP 32-64-64-10, 100 clients x 5 local steps of SGD per round.
Each variant is lowered and compiled from scratch several times (the caches
cleared and a fresh function jitted each time), interleaved so that a noisy,
shared machine slows them alike; the median is reported:

* ``round``: `fedjax_fm.engine.build_round`, ``chunked`` with 25 clients per
  chunk, with its default uplink (the non-finite guard) and metrics;
* ``round_no_guard``: the same with ``guard_nonfinite=False``, which
  attributes the guard's share;
* ``round_vmap``: the real round with the ``vmap`` strategy;
* ``hand_vmap``: a round written by hand in one ``jax.jit``: ``vmap`` over
  clients of a ``lax.scan`` of SGD steps, then the weighted mean of the
  deltas added to the params (the same model, loss and data; no masks,
  metrics or guard).

Besides seconds (wall and process CPU, the latter less disturbed by other
processes), it reports the size of each program: lines of the lowered
StableHLO and the operations of the compiled module (`count_kernels`: on CPU
XLA compiles each fused kernel as its own LLVM module, and their number, far
more than the lines of StableHLO, drives the compile time).

  python scripts/bench_compile.py
  python scripts/bench_compile.py --repeats=5 --clients=100 --chunk=25

The last line printed is ``{"bench": "compile", ...}``.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fedjax_fm import engine
from fedjax_fm import models
from fedjax_fm import peft

# Instructions of a compiled module that are not kernels of their own.
_NOT_KERNELS = frozenset({'parameter', 'get-tuple-element', 'tuple', 'bitcast', 'constant',
                          'while', 'conditional', 'call', 'after-all', 'opt-barrier'})


def mlp_problem(in_dim=32, hidden=(64, 64), classes=10):
  model = models.MLPClassifier(in_dim, hidden, classes, rngs=nnx.Rngs(0))
  split = peft.split_model(model, 'full')
  loss_fn = models.make_loss_fn(split.graphdef, models.features_classification_task())

  def make_data(clients, steps, batch, seed=0):
    rng = np.random.default_rng(seed)
    shape = (clients, steps, batch)
    return {
        'batch': {'x': rng.normal(size=shape + (in_dim,)).astype(np.float32),
                  'label': rng.integers(0, classes, size=shape).astype(np.int32)},
        'example_mask': np.ones(shape, bool),
        'step_mask': np.ones(shape[:2], bool),
        'weight': np.full((clients,), steps * batch, np.float32),
        'client_id': np.arange(clients, dtype=np.int32),
        'client_mask': np.ones((clients,), bool),
    }
  return split, loss_fn, make_data


def hand_round(loss_fn, learning_rate):
  """A FedAvg round written directly: vmap over clients of a scan of SGD steps."""

  def apply(params, frozen, data):
    def client(batch):
      def step(p, b):
        loss, grads = jax.value_and_grad(lambda q: jnp.mean(loss_fn(q, frozen, b, None)))(p)
        return jax.tree.map(lambda w, g: w - learning_rate * g, p, grads), loss
      local, losses = jax.lax.scan(step, params, batch)
      return jax.tree.map(jnp.subtract, local, params), jnp.mean(losses)

    deltas, losses = jax.vmap(client)(data['batch'])
    w = data['weight'] / jnp.sum(data['weight'])
    mean = jax.tree.map(lambda d: jnp.tensordot(w, d, axes=1), deltas)
    return jax.tree.map(jnp.add, params, mean), jnp.mean(losses)

  return apply


def count_kernels(compiled_text: str) -> int:
  """Operations a compiled CPU module runs: fusions, library calls, copies.

  The non-trivial instructions of the computations that are not fusion bodies
  and not scalar reducers or loop conditions (those whose every instruction
  is a scalar). Most are kernels XLA generates code for, one LLVM module
  each; their count drives the compile time.
  """
  count = 0
  for comp in re.split(r'\n(?=\S)', compiled_text):
    head = comp.split('\n', 1)[0]
    if head.startswith(('%fused', '%wrapped')) or 'fused_computation' in head:
      continue
    ops = re.findall(r'= (\S+) ([a-z][a-z0-9\-]*)\(', comp)
    if all(shape.endswith('[]') for shape, _ in ops):
      continue
    count += sum(op not in _NOT_KERNELS for _, op in ops)
  return count


def compile_once(fn, args) -> dict:
  jax.clear_caches()
  fresh = jax.jit(lambda *a: fn(*a))   # a new function object: nothing cached
  wall, cpu = time.perf_counter(), time.process_time()
  lowered = fresh.lower(*args)
  lower_s = time.perf_counter() - wall
  compiled = lowered.compile()
  out = {'wall_s': time.perf_counter() - wall, 'cpu_s': time.process_time() - cpu,
         'lower_s': lower_s}
  out['stablehlo_lines'] = len(lowered.as_text().splitlines())
  out['kernels'] = count_kernels(compiled.as_text())
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--clients', type=int, default=100)
  p.add_argument('--local_steps', type=int, default=5)
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--chunk', type=int, default=25)
  p.add_argument('--repeats', type=int, default=3)
  args = p.parse_args()

  split, loss_fn, make_data = mlp_problem()
  data = make_data(args.clients, args.local_steps, args.batch)
  lr = 0.05

  def build(**kw):
    kw.setdefault('strategy', 'chunked')
    kw.setdefault('chunk_size', args.chunk if kw['strategy'] == 'chunked' else None)
    return engine.build_round(loss_fn, split.trainable, client_optimizer=optax.sgd(lr),
                              server_optimizer=optax.sgd(1.0), num_clients=args.clients,
                              **kw)

  state = build().init(split.trainable, jax.random.key(0))
  round_args = (state, split.frozen, data)
  variants = {
      'hand_vmap': (hand_round(loss_fn, lr), (split.trainable, split.frozen, data)),
      'round': (build().apply_fn, round_args),
      'round_no_guard': (build(guard_nonfinite=False).apply_fn, round_args),
      'round_vmap': (build(strategy='vmap').apply_fn, round_args),
  }
  runs = {name: [] for name in variants}
  for _ in range(args.repeats):   # interleaved: the machine's noise hits all alike
    for name, (fn, fn_args) in variants.items():
      runs[name].append(compile_once(fn, fn_args))

  result = {'bench': 'compile', 'backend': jax.default_backend(),
            'model': 'MLP 32-64-64-10, FedAvg (SGD)', 'clients': args.clients,
            'local_steps': args.local_steps, 'batch': args.batch, 'chunk': args.chunk,
            'repeats': args.repeats}
  for name, rs in runs.items():
    row = {k: statistics.median(r[k] for r in rs) for k in ('wall_s', 'cpu_s', 'lower_s')}
    row.update(stablehlo_lines=rs[0]['stablehlo_lines'], kernels=rs[0]['kernels'])
    print(json.dumps({'variant': name, **{k: round(v, 3) for k, v in row.items()}}),
          flush=True)
    for k, v in row.items():
      result[f'{name}_{k}'] = round(v, 3)
  for name in ('round', 'round_no_guard', 'round_vmap'):
    for k in ('wall_s', 'cpu_s'):
      result[f'{name}_over_hand_{k}'] = round(result[f'{name}_{k}'] / result[f'hand_vmap_{k}'],
                                              2)
  result['guard_cost_cpu_s'] = round(result['round_cpu_s'] - result['round_no_guard_cpu_s'],
                                     3)
  print(json.dumps(result))


if __name__ == '__main__':
  main()
