"""Stacked layers in the round (`fedjax_fm.stacking`, ``build_round(stack_layers=)``).

The reference is the canonical layout (one subtree per layer, the layers run in
a Python loop): a round whose layers are scanned and whose trainable params stay
stacked from the broadcast to the server step must give its params, server
state and metrics, for every part the layout accepts, through the experiment
binary's builder.
"""

import contextlib
import io
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from experiments.configs import decoder_lora_lm
from fedjax_fm import checkpoint
from fedjax_fm import compress
from fedjax_fm import engine
from fedjax_fm import peft
from fedjax_fm import privacy as privacy_lib
from fedjax_fm import train
from fedjax_fm import stacking as layout_lib
from fedjax_fm.models import scan as scan_lib
from tests import run_testlib

RTOL, ATOL = 1e-5, 1e-6   # f32: two programs (scan vs loop), two fusions


def _tree(num_layers=3):
  rng = np.random.default_rng(0)
  layer = lambda: {'attn': {'lora_a': rng.standard_normal((4, 2)).astype(np.float32),
                            'lora_b': rng.standard_normal((2, 5)).astype(np.float32)},
                   'norm': rng.standard_normal((4,)).astype(np.float32)}
  return {'embed': rng.standard_normal((7, 4)).astype(np.float32),
          'layers': {i: layer() for i in range(num_layers)},
          # not stackable: shapes differ between its entries
          'heads': {0: np.zeros((2,), np.float32), 1: np.zeros((3,), np.float32)}}


def test_stack_unstack_round_trip_and_what_is_stacked():
  tree = _tree()
  lay = layout_lib.layer_stack(tree)
  assert lay.num_stacked == 1
  st = lay.stack(tree)
  assert set(st['layers']) == {layout_lib.STACKED}
  assert st['layers']['*']['attn']['lora_a'].shape == (3, 4, 2)
  np.testing.assert_array_equal(st['layers']['*']['norm'][1], tree['layers'][1]['norm'])
  assert set(st['heads']) == {0, 1}   # left as it was
  back = lay.unstack(st)
  assert jax.tree.structure(back) == jax.tree.structure(tree)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(tree)):
    np.testing.assert_array_equal(a, b)
  # one layer, or no integer keys: nothing to stack
  assert layout_lib.layer_stack(_tree(1)).num_stacked == 0
  assert layout_lib.layer_stack({'a': np.zeros(2), 'b': np.ones(3)}).num_stacked == 0


def test_scan_takes_the_stacks_of_views():
  """Inside `stacked_views` the scan consumes the stacked array: no re-stacking."""
  w = jnp.arange(24.0).reshape(3, 2, 4)

  class Lin(nnx.Module):
    def __init__(self, k):
      self.k = nnx.Param(k)

  def loss(stacked, views_on):
    slices = [stacked[i] for i in range(3)]
    layers = [Lin(s) for s in slices]
    views = {id(s): (stacked, i, s) for i, s in enumerate(slices)} if views_on else {}

    def body(layer, c, x, rngs):
      return jnp.tanh(c @ layer.k[...] @ layer.k[...].T)

    # nnx.split of modules built from tracers gives back the same array objects
    with layout_lib.stacked_views(views):
      out = scan_lib.scan_layers(layers, body, jnp.ones((1, 2)))
    return jnp.sum(out)

  def restacks(views_on):   # stacking the slices again, and the slices' gradients
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda s: loss(s, views_on)))(w))
    return len(re.findall(r'= (?:stack|pad|concatenate)\[', jaxpr))

  g0 = jax.grad(lambda s: loss(s, False))(w)
  g1 = jax.grad(lambda s: loss(s, True))(w)
  np.testing.assert_allclose(g1, g0, rtol=1e-6)
  assert restacks(False) > 0 and restacks(True) == 0


# ------------------------------------------------ through the experiment builder

@pytest.fixture(scope='module')
def task_data(tmp_path_factory):
  c = decoder_lora_lm.get_config('tiny')
  return train.build_task_data(c, str(tmp_path_factory.mktemp('layout_task')))


def _config(scan, **fields):
  c = decoder_lora_lm.get_config('tiny')
  c.model.num_layers = 2
  c.model.scan_layers = scan
  c.progress = False
  for key, value in fields.items():
    node = c
    *parents, last = key.split('.')
    for p in parents:
      node = node[p]
    node[last] = value
  return c


def _run(config, task_data, workdir, rounds=2):
  exp = train.build_experiment(config, str(workdir), task_data=task_data)
  state = exp.fed_round.init(exp.split.trainable, jax.random.key(config.seed),
                             **({'hparams': exp.hparams} if getattr(exp, 'hparams', None)
                                else {}))
  metrics = []
  for r in range(rounds):
    state, m = exp.fed_round.apply(state, exp.split.frozen, jax.device_put(exp.round_data(r)))
    metrics.append(jax.device_get(m))
  return exp, jax.device_get(state), metrics


def _assert_same(ref, got):
  (_, s0, m0), (e1, s1, m1) = ref, got
  params = jax.device_get(e1.fed_round.canonical_params(s1.params))
  assert jax.tree.structure(params) == jax.tree.structure(s0.params)
  for a, b in zip(jax.tree.leaves(s0.params), jax.tree.leaves(params)):
    np.testing.assert_allclose(b, a, rtol=RTOL, atol=ATOL)
  # the server optimizer's state (e.g. FedAdam's moments) holds the same numbers
  lay = e1.fed_round.layout
  opt0 = jax.tree.map(lambda x: lay.stack(x) if jax.tree.structure(x) == lay.treedef else x,
                      s0.opt_state, is_leaf=lambda x: jax.tree.structure(x) == lay.treedef)
  assert jax.tree.structure(opt0) == jax.tree.structure(s1.opt_state)
  for a, b in zip(jax.tree.leaves(opt0), jax.tree.leaves(s1.opt_state)):
    np.testing.assert_allclose(b, a, rtol=RTOL, atol=ATOL)
  for r0, r1 in zip(m0, m1):
    assert set(r0) == set(r1)
    for k in r0:
      np.testing.assert_allclose(r1[k], r0[k], rtol=1e-4, atol=1e-6, err_msg=k)


# case -> (config fields, rounds): every part the layout accepts, in few builds
CASES = {
    # the default LoRA round: fedit with its probe error, Adam clients, chunked
    'fedit_probe_chunked': ({}, 2),
    'vmap_fedadam_scale_attack': ({'fl.strategy': 'vmap', 'server_optimizer.name': 'fedadam',
                                   'server_optimizer.learning_rate': 0.01,
                                   'attack.kind': 'scale', 'attack.fraction': 0.25,
                                   'attack.scale': -2.0}, 1),
    'fednova_sgd': ({'fl.algorithm': 'fednova', 'client_optimizer.name': 'sgd',
                     'client_optimizer.learning_rate': 0.1}, 1),
    'dp_flat': ({'privacy.enabled': True, 'privacy.noise_multiplier': 0.5,
                 'privacy.clip_norm': 0.1}, 1),
    'sharded_multi_krum_sign_flip': ({'fl.strategy': 'sharded', 'fl.chunk_size': 1,
                                      'fl.clients_per_round': 8,
                                      'aggregator.name': 'multi_krum',
                                      'aggregator.num_byzantine': 1,
                                      'attack.kind': 'sign_flip', 'attack.fraction': 0.25}, 1),
}


@pytest.mark.slow   # each case builds and compiles two experiments: CI runs them
@pytest.mark.parametrize('case', list(CASES))
def test_stacked_round_equals_the_canonical_loop(case, task_data, tmp_path):
  fields, rounds = CASES[case]
  ref = _run(_config(False, **fields), task_data, tmp_path / 'loop', rounds)
  got = _run(_config(True, **fields), task_data, tmp_path / 'scan', rounds)
  assert ref[0].fed_round.layout is None
  assert got[0].fed_round.layout is not None and got[0].fed_round.layout.num_stacked == 1
  # the server state holds the layers stacked: one leaf per projection, not per layer
  assert set(got[1].params['layers']) == {layout_lib.STACKED}
  _assert_same(ref, got)


def _quiet_run(config, workdir):
  with contextlib.redirect_stdout(io.StringIO()):
    return train.run(config, workdir)


@pytest.mark.slow
def test_run_with_stacked_layers_resumes_bit_identically(tmp_path):
  """Through `train.run`: 2 rounds straight == 1 round, checkpoint, resume to 2."""
  def config(rounds):
    c = _config(True)
    c.num_rounds, c.checkpoint.every, c.tensorboard, c.eval.every = rounds, 1, False, 1
    return c

  _quiet_run(config(2), str(tmp_path / 'straight'))
  _quiet_run(config(1), str(tmp_path / 'resumed'))
  _quiet_run(config(2), str(tmp_path / 'resumed'))
  exp = train.build_experiment(config(2), str(tmp_path))
  assert exp.fed_round.layout is not None
  like = exp.fed_round.init(exp.split.trainable, jax.random.key(0))
  states = run_testlib.saved_states(tmp_path, ('straight', 'resumed'), like, step=2)
  assert checkpoint.tree_equal(states[0], states[1])
  lines = [json.loads(x) for x in open(tmp_path / 'resumed' / 'metrics.jsonl')]
  rounds = [m for m in lines if 'round' in m]
  assert [m['round'] for m in rounds] == [1, 2]
  assert [m['round'] for m in rounds if 'compile_time_s' in m] == [1, 2]
  # the evaluation (on the canonical params) ran every round and learned something
  evals = [m['eval']['loss'] for m in rounds]
  assert all(np.isfinite(evals)) and evals[-1] < evals[0]
  # a checkpoint of the other layout is refused, naming the field
  looped = config(3)
  looped.model.scan_layers = False
  with pytest.raises(ValueError, match='model.scan_layers'):
    _quiet_run(looped, str(tmp_path / 'resumed'))


@pytest.mark.parametrize('error', ['exact', 'probe'])
def test_fedit_error_of_stacked_pairs_equals_canonical(error):
  """FedIT's aggregation error sums over the layers of a stack pair by pair."""
  rng = np.random.default_rng(1)
  params = jax.tree.map(jnp.asarray, {'layers': {i: {'q': {
      'lora_a': rng.standard_normal((6, 2)).astype(np.float32),
      'lora_b': rng.standard_normal((2, 5)).astype(np.float32)}} for i in range(3)}})
  updates = jax.tree.map(
      lambda p: jnp.asarray(rng.standard_normal((4,) + p.shape).astype(np.float32)), params)
  weights = jnp.array([1.0, 2.0, 0.0, 3.0])
  agg = peft.lora_aggregation.fedit(error=error)
  lay = layout_lib.layer_stack(params)

  def run(p, u):
    acc = agg.accumulate(agg.zero(p), u, weights, p)
    return agg.finalize(acc, p)

  d0, i0 = run(params, updates)
  d1, i1 = run(lay.stack(params), jax.vmap(lay.stack)(updates))
  for a, b in zip(jax.tree.leaves(d0), jax.tree.leaves(lay.unstack(d1))):
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)
  assert set(i0) == set(i1)
  for k in i0:
    np.testing.assert_allclose(i1[k], i0[k], rtol=1e-5, err_msg=k)
  assert float(i0['lora_aggregation_error']) > 0


def test_parts_acting_per_leaf_are_rejected_or_left_canonical(task_data, tmp_path):
  c = _config(True, **{'compress.uplink': 'top_k', 'compress.fraction': 0.1})
  exp = train.build_experiment(c, str(tmp_path), task_data=task_data)
  assert exp.fed_round.layout is None   # 'auto': a per-tensor top-k keeps the canonical layout

  params = {'layers': {i: {'w': jnp.zeros((2, 2))} for i in range(2)}}
  loss = lambda t, f, b, k: jnp.zeros(b['x'].shape[:1])
  kw = dict(client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(1.0), num_clients=4)
  for bad, name in ((dict(compressor=compress.top_k(0.5)), 'compressor'),
                    (dict(privacy=privacy_lib.gaussian_dp(1.0, 1.0, per_layer=True)),
                     'per-layer clipping'),
                    (dict(aggregator=peft.lora_aggregation.product()), 'not leafwise'),
                    (dict(attack=('noise', 1.0)), "attack 'noise'")):
    with pytest.raises(ValueError, match=name):
      engine.build_round(loss, params, stack_layers=True, **kw, **bad)
  with pytest.raises(ValueError, match="stack_layers must be True, False or 'auto'"):
    engine.build_round(loss, params, stack_layers='yes', **kw)
  assert engine.build_round(loss, params, stack_layers=True, **kw).layout.num_stacked == 1
