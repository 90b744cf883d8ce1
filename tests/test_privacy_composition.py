"""DP composed with other parts: each accepted combination keeps its bound, through the real round."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.configs import mlp_synthetic
from fedjax_fm import compress
from fedjax_fm import config as config_lib
from fedjax_fm import engine
from fedjax_fm import privacy
from fedjax_fm import train
from fedjax_fm import tree_util

D_IN, D_OUT, S, B = 32, 16, 3, 8
CLIP = 0.05


def _loss(params, frozen, batch, key):
  del frozen, key
  return jnp.mean(jnp.square(batch['x'] @ params['w'] - batch['y']), axis=-1)


def _round_data(rng, clients=1):
  return {
      'batch': {'x': rng.normal(size=(clients, S, B, D_IN)).astype(np.float32) * 5,
                'y': rng.normal(size=(clients, S, B, D_OUT)).astype(np.float32) * 5},
      'example_mask': np.ones((clients, S, B), bool),
      'step_mask': np.ones((clients, S), bool),
      'weight': np.ones(clients, np.float32),
      'client_id': np.zeros(clients, np.int32),
  }


@pytest.mark.parametrize('name', ['stochastic_1bit', 'ef_top_k', 'qsgd_2bit'])
def test_compressed_updates_reach_the_mean_within_the_clip_norm(name):
  """One client per round, no noise, FedAvg at lr 1: the params move by exactly the
  client's decoded update, which must stay within the clip norm (the sensitivity the
  accountant assumes), round after round (error feedback accumulates residuals)."""
  comp = {'stochastic_1bit': compress.stochastic_uniform(bits=1, min_size=1),
          'ef_top_k': compress.error_feedback(compress.top_k(0.01, min_size=1)),
          'qsgd_2bit': compress.qsgd(bits=2, min_size=1)}[name]
  params = {'w': jnp.zeros((D_IN, D_OUT))}
  fed = engine.build_round(_loss, params, client_optimizer=optax.sgd(0.05),
                           server_optimizer=optax.sgd(1.0), num_clients=1, strategy='vmap',
                           compressor=comp, privacy=privacy.gaussian_dp(CLIP, 0.0))
  state = fed.init(params, jax.random.key(0))
  rng = np.random.default_rng(0)
  norms = []
  for _ in range(40 if name == 'ef_top_k' else 12):
    before = state.params
    state, m = fed.apply(state, {}, _round_data(rng))
    norms.append(float(tree_util.tree_norm(tree_util.tree_sub(state.params, before))))
    assert float(m['client_update_norm'][0]) > 10 * CLIP   # clipping is active
  assert max(norms) <= CLIP * (1 + 1e-5), norms
  assert min(norms) > 0.1 * CLIP


def _dp_config(**privacy_fields):
  c = mlp_synthetic.get_config('tiny')
  c.privacy.enabled = True
  c.privacy.noise_multiplier = 1.0
  for k, v in privacy_fields.items():
    c.privacy[k] = v
  return c


@pytest.mark.parametrize('mode', ['product', 'stack'])
def test_lora_modes_without_a_dp_bound_are_rejected(mode):
  from experiments.configs import peft_routes  # pylint: disable=g-import-not-at-top
  c = peft_routes.get_config(f'lora_{mode},tiny')
  c.privacy.enabled, c.privacy.noise_multiplier = True, 1.0
  with pytest.raises(config_lib.ConfigError, match=r'peft\.lora_aggregation.*fedit.*ffa'):
    config_lib.validate(c, num_devices=1)
  c.peft.lora_aggregation = 'ffa'
  config_lib.validate(c, num_devices=1)


def test_adaptive_clipping_needs_count_noise_above_half_the_budget():
  c = _dp_config(adaptive=True, clipped_count_stddev=0.4)
  with pytest.raises(config_lib.ConfigError, match='privacy.clipped_count_stddev'):
    config_lib.validate(c, num_devices=1)
  config_lib.validate(_dp_config(adaptive=True, clipped_count_stddev=0.6), num_devices=1)


@pytest.mark.slow
def test_adaptive_clip_count_is_noised_and_the_budget_split(tmp_path):
  """The clip norm after a round depends on the noise on the count (it did not when
  the count was released exactly), and the updates get z_delta > z."""
  c = _dp_config(adaptive=True, clipped_count_stddev=1.0)
  exp = train.build_experiment(c, str(tmp_path))
  data = exp.round_data(0)
  clips = set()
  for seed in range(4):
    state = exp.fed_round.init(exp.split.trainable, jax.random.key(seed))
    state, m = exp.fed_round.apply(state, exp.split.frozen, data)
    clips.add(round(float(state.clip.clip_norm), 6))
  assert len(clips) == 4, clips
  assert exp.accountant.noise_multiplier == 1.0
  sigma_b = 1.0
  z_delta = privacy.update_noise_multiplier(1.0, sigma_b)
  assert z_delta > 1.0
  np.testing.assert_allclose(1 / z_delta**2 + 1 / (2 * sigma_b)**2, 1.0, rtol=1e-9)


@pytest.mark.slow
def test_dp_runs_keep_per_client_values_out_of_the_logs(tmp_path):
  for flag in (False, True):
    c = _dp_config(log_client_metrics=flag)
    c.num_rounds, c.progress, c.tensorboard = 2, False, False
    workdir = str(tmp_path / str(flag))
    train.run(c, workdir)
    records = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
    for r in records:
      assert ('client_loss' in r) == flag and ('client_update_norm' in r) == flag
      assert 'epsilon' in r


@pytest.mark.slow
def test_secure_mean_masks_are_fresh_every_round(monkeypatch):
  """With the same updates in two rounds, the masked vectors the server sees differ
  by more than the plain updates do: masks come from the round's key and the
  clients' global ids, so masked_r1 - masked_r2 reveals nothing."""
  from fedjax_fm.privacy import secure_agg  # pylint: disable=g-import-not-at-top
  seen = []
  real_mask = secure_agg.mask

  def spy(updates_int, client_ids, seeds):
    out = real_mask(updates_int, client_ids, seeds)
    seen.append((np.asarray(updates_int[0] if isinstance(updates_int, list) else
                            jax.tree.leaves(updates_int)[0]),
                 np.asarray(jax.tree.leaves(out)[0])))
    return out

  monkeypatch.setattr(secure_agg, 'mask', spy)
  params = {'w': jnp.zeros((D_IN, D_OUT))}
  fed = engine.build_round(_loss, params, client_optimizer=optax.sgd(0.0),
                           server_optimizer=optax.sgd(1.0), num_clients=8, strategy='vmap',
                           aggregator=secure_agg.secure_mean(clip_range=1.0))
  data = _round_data(np.random.default_rng(0), clients=4)
  data['client_id'] = np.asarray([5, 2, 7, 0], np.int32)
  state = fed.init(params, jax.random.key(0))
  with jax.disable_jit():
    for _ in range(2):
      state, _ = fed.apply_fn(state, {}, data)
  (plain1, masked1), (plain2, masked2) = seen
  np.testing.assert_array_equal(plain1, plain2)   # lr 0: the same (zero) updates
  assert np.any(masked1 != masked2)               # ... under different masks
