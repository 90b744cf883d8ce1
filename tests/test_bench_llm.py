"""scripts/bench_llm.py: its round, centralised limit and torch + peft loop agree."""

from __future__ import annotations

import importlib.util
import os

import jax
import numpy as np
import pytest

from flax import nnx

from fedjax_fm import models
from fedjax_fm import peft

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      'scripts', 'bench_llm.py')
F32_TOL = 1e-4   # relative to the largest entry of each LoRA tensor's update


def _bench():
  spec = importlib.util.spec_from_file_location('bench_llm_script', SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _tiny_config(tie=True, seq=12):
  return models.DecoderConfig(vocab_size=128, dim=64, num_layers=2, num_heads=4,
                              num_kv_heads=2, mlp_dim=96, max_len=seq, tie_embeddings=tie)


@pytest.fixture(scope='module')
def bench():
  return _bench()


@pytest.fixture(scope='module')
def tiny(bench):
  """A tiny random Llama with LoRA r=4 on q/v, and a round of 3 clients x 2 steps.

  ``lora_b`` starts non-zero (as after some rounds), so that ``lora_a`` gets a
  gradient from the first step on.
  """
  problem = bench.build_problem(_tiny_config(), rank=4, alpha=8.0, seed=0)
  rng = np.random.default_rng(2)
  trainable = jax.tree_util.tree_map_with_path(
      lambda path, x: (0.1 * rng.standard_normal(x.shape).astype(np.float32)
                       if str(path[-1].key) == 'lora_b' else x),
      problem.split.trainable)
  problem = problem._replace(split=problem.split._replace(trainable=trainable))
  data = bench.make_round_data(clients=3, steps=2, batch=2, seq=12, vocab=128, seed=1)
  return problem, data


def _assert_updates_close(ours, ref, what):
  assert set(ours) == set(ref)
  for name in ref:
    scale = float(np.max(np.abs(ref[name])))
    assert scale > 0, f'{what}: {name} did not move'
    np.testing.assert_allclose(ours[name], ref[name], rtol=0, atol=F32_TOL * scale,
                               err_msg=f'{what}: {name}')


@pytest.mark.parametrize('tie', [True, False])
def test_lora_flops_match_a_count_of_the_model(bench, tie):
  """The FLOP formula against a count over the model's own kernels."""
  rank, seq, tokens = 4, 12, 5
  cfg = _tiny_config(tie, seq)

  def make():
    model = models.Decoder(cfg, rngs=nnx.Rngs(0))
    peft.apply_lora(model, rank=rank, alpha=8.0, target_modules=('q_proj', 'v_proj'),
                    rngs=nnx.Rngs(1))
    return model
  split = peft.split_model(nnx.eval_shape(make), 'lora')   # shapes only
  matmul = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(split.frozen)[0]:
    name = str(path[-1].key)
    if name == 'kernel' or (name == 'embedding' and tie):   # a tied head reuses the table
      matmul += int(np.prod(leaf.shape))
  lora = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(split.trainable))
  heads, head_dim = cfg.num_heads, cfg.dim // cfg.num_heads
  attention = 2 * cfg.num_layers * (2 * seq * heads * head_dim)   # QK^T, PV per token
  forward = tokens * (2 * matmul + 2 * lora + attention)
  backward = tokens * (2 * matmul + 4 * lora + 2 * attention)   # no frozen weight grads
  got = bench.lora_flops(cfg, rank, seq, tokens)
  assert got['frozen_matmul_params'] == matmul
  assert got['lora_params'] == lora
  assert (got['forward'], got['backward']) == (forward, backward)
  assert got['total'] == forward + backward
  with pytest.raises(ValueError, match='targets'):
    bench.lora_flops(cfg, rank, seq, targets=('query',))


@pytest.mark.slow
def test_torch_peft_loop_matches_the_round(bench, tiny):
  """HF transformers + peft, client by client, give our round's mean LoRA update."""
  pytest.importorskip('torch')
  pytest.importorskip('transformers')
  pytest.importorskip('peft')
  problem, data = tiny
  lr = 0.5
  ours = bench.peft_names(problem, bench.fed_round_update(problem, data, lr)['update'])
  peft_model = bench.torch_peft_model(problem)
  theirs = bench.torch_peft_round(peft_model, data, lr, threads=1)['update']
  _assert_updates_close(ours, theirs, 'round vs torch + peft')
  assert bench.max_relative_difference(ours, theirs) < 1e-3
  # Both factors of q and v moved (_assert_updates_close), and the check can fail.
  assert {k.split('.')[-3] for k in theirs} == {'q_proj', 'v_proj'}
  assert {k.split('.')[-2] for k in theirs} == {'lora_A', 'lora_B'}
  other = bench.torch_peft_round(peft_model, data, 1.2 * lr, threads=1)['update']
  assert bench.max_relative_difference(ours, other) > 1e-2


@pytest.mark.slow
def test_centralised_limit_is_the_round_for_one_local_step(bench, tiny):
  """With one local SGD step and equal weights, FedAvg is one SGD step on the union."""
  problem, data = tiny
  one_step = {k: (v if k == 'weight' else jax.tree.map(lambda x: x[:, :1], v))
              for k, v in data.items() if k not in ('client_id', 'client_mask')}
  one_step['weight'] = np.full_like(data['weight'], 2.0)
  one_step['client_id'] = data['client_id']
  lr = 0.5
  ours = bench.fed_round_update(problem, one_step, lr)['update']
  central = bench.central_update(problem, one_step, lr, micro_clients=1, repeats=1)
  assert central['micro_clients'] == 1
  ours_t, central_t = bench.peft_names(problem, ours), bench.peft_names(problem,
                                                                        central['update'])
  _assert_updates_close(ours_t, central_t, 'round vs centralised')
  loop = bench.jax_loop_update(problem, one_step, lr, repeats=1)
  _assert_updates_close(bench.peft_names(problem, loop['update']), central_t,
                        'jax loop vs centralised')
