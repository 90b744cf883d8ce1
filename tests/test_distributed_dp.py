"""The distributed Skellam mechanism: rotation, rounding, noise, modular sum, the round."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_fm import engine
from fedjax_fm import privacy
from fedjax_fm import tree_util
from fedjax_fm.engine import uplink as uplink_lib
from fedjax_fm.privacy import accounting
from fedjax_fm.privacy import distributed
from fedjax_fm.privacy import secure_agg


def _sylvester(n):
  """The Sylvester Hadamard matrix of order n, by its recursive construction."""
  h = np.ones((1, 1))
  while h.shape[0] < n:
    h = np.block([[h, h], [h, -h]])
  return h


# ------------------------------------------------------------------ rotation

@pytest.mark.parametrize('n', [1, 2, 8, 64])
def test_fwht_is_the_sylvester_transform(n):
  x = np.random.default_rng(n).normal(size=(3, n)).astype(np.float32)
  got = np.asarray(jax.jit(distributed.fwht)(x))
  np.testing.assert_allclose(got, x @ _sylvester(n) / math.sqrt(n), atol=1e-5)


def test_rotation_is_orthogonal_and_its_inverse_exact():
  n = 64
  key = jax.random.key(3)
  signs = np.asarray(distributed.rotation_signs(key, n))
  assert set(np.unique(signs)) == {-1.0, 1.0}
  # The matrix of x -> rotate(x): its columns are the rotated basis vectors.
  rot = np.asarray(jax.jit(lambda e: distributed.rotate(e, key))(jnp.eye(n))).T
  np.testing.assert_allclose(rot, _sylvester(n) @ np.diag(signs) / math.sqrt(n), atol=1e-6)
  np.testing.assert_allclose(rot.T @ rot, np.eye(n), atol=1e-5)
  x = np.random.default_rng(0).normal(size=(5, n)).astype(np.float32)
  back = jax.jit(lambda v: distributed.unrotate(distributed.rotate(v, key), key))(x)
  np.testing.assert_allclose(back, x, atol=2e-6)
  assert distributed.padded_dim(1) == 1 and distributed.padded_dim(65) == 128
  with pytest.raises(ValueError, match='power of two'):
    distributed.fwht(jnp.ones(6))


# ------------------------------------------------------------------ rounding

def test_squared_norm_is_exact():
  v = np.random.default_rng(0).integers(-2**22 - 1, 2**22 + 2, size=(4, 512)).astype(np.int32)
  hi, lo = jax.jit(distributed.squared_norm)(v)
  got = np.asarray(hi).astype(np.int64) * 2**32 + np.asarray(lo).astype(np.int64)
  np.testing.assert_array_equal(got, (v.astype(np.int64) ** 2).sum(-1))


def _round_many(x, bound, num, max_tries=50):
  keys = jax.random.split(jax.random.key(11), num)
  fn = jax.jit(jax.vmap(lambda k: distributed.conditional_round(k, x, bound, max_tries)))
  r, tries, ok = fn(keys)
  return np.asarray(r).astype(np.int64), np.asarray(tries), np.asarray(ok)


def test_conditional_rounding_keeps_the_norm_bound():
  """Fractional parts 1/2 (the largest rounding variance) with a bound that rejects
  often: every accepted vector is within it (exact integer norms), the others fall
  back to zero."""
  d = 64
  x = jnp.full((d,), 3.5, jnp.float32) * jnp.where(jnp.arange(d) % 2 == 0, 1.0, -1.0)
  c = float(jnp.linalg.norm(x))
  bound = distributed.rounded_norm_bound(c, d, beta=0.95)
  r, tries, ok = _round_many(x, bound, 2000, max_tries=3)
  sq = (r ** 2).sum(-1)
  assert np.all(sq[ok] <= math.floor(bound ** 2))
  assert 0.2 < ok.mean() < 1.0          # the bound binds, yet most succeed within 3 tries
  assert (tries > 1).mean() > 0.1       # ... after re-drawing often
  assert np.all(tries[~ok] == 3) and np.all(r[~ok] == 0)
  base = np.floor(np.asarray(x))
  assert np.all((r[ok] == base) | (r[ok] == base + 1))
  # An impossible bound: every client falls back to the zero vector.
  r, tries, ok = _round_many(x, 0.5 * c, 16, max_tries=2)
  assert not ok.any() and np.all(r == 0)


@pytest.mark.parametrize('beta', [0.0, distributed.DEFAULT_BETA])
def test_conditional_rounding_is_unbiased(beta):
  """E[round(x)] = x: per coordinate the mean of N draws is within 5 standard errors
  sqrt(p (1 - p) / N) (p the fractional part). With the default beta the bound's
  slack, c + d/12 on average, is ~5 standard deviations of ||round(x)||^2 here (the
  cross term 2 <x, e> has sd ~0.8 c), so conditioning adds no visible bias."""
  d, num = 1024, 4000
  rng = np.random.default_rng(1)
  x = (rng.normal(size=d) * 1.5).astype(np.float32)
  c = float(np.linalg.norm(x))
  bound = distributed.rounded_norm_bound(c * (1 + 1e-5), d, beta)
  r, tries, ok = _round_many(jnp.asarray(x), bound, num)
  assert ok.all()
  frac = x - np.floor(x)
  se = np.sqrt(np.maximum(frac * (1 - frac), 1e-6) / num)
  z = (r.mean(0) - x) / se
  assert np.max(np.abs(z)) < 5, np.max(np.abs(z))
  assert tries.mean() < 1.2


# --------------------------------------------------------------------- noise

def test_skellam_noise_mean_and_variance():
  num, mu = 200_000, 5000.0
  s = np.asarray(jax.jit(lambda k: distributed.skellam_noise(k, (num,), mu))(
      jax.random.key(0))).astype(np.float64)
  assert np.all(s == np.round(s))
  assert abs(s.mean()) < 5 * math.sqrt(mu / num)
  # Var of the sample variance: mu^2 (2 / (num - 1) + kurtosis / num), kurtosis 1 / mu.
  assert abs(s.var() / mu - 1) < 5 * math.sqrt(2 / num + 1 / (mu * num))
  assert np.all(np.asarray(distributed.skellam_noise(jax.random.key(1), (8,), 0.0)) == 0)


@pytest.mark.slow
@pytest.mark.parametrize('lam', [3.0, 40.0, 2e5, 4e6])
def test_poisson_sampler_matches_scipy(lam):
  """Chi-square goodness of fit against scipy's Poisson CDF, 60 bins over +-4.5 sd
  (jax.random.poisson fails this at lam = 2e5 and 4e6: float32 log-probabilities)."""
  stats = pytest.importorskip('scipy.stats')
  num = 400_000
  s = np.asarray(jax.jit(lambda k: distributed.poisson(k, lam, (num,)))(
      jax.random.key(2))).astype(np.int64)
  sd = math.sqrt(lam)
  edges = np.unique(np.linspace(max(lam - 4.5 * sd, 0), lam + 4.5 * sd + 1, 61)
                    .astype(np.int64))
  counts, _ = np.histogram(s, bins=edges - 0.5)   # bin i: edges[i] <= k < edges[i+1]
  expected = num * (stats.poisson.cdf(edges[1:] - 1, lam)
                    - stats.poisson.cdf(edges[:-1] - 1, lam))
  keep = expected > 5
  chi2 = np.sum((counts[keep] - expected[keep]) ** 2 / expected[keep])
  assert chi2 < stats.chi2.ppf(0.999, keep.sum() - 1), chi2


# ------------------------------------------------------------ modular domain

@pytest.mark.parametrize('bits', [8, 20])
def test_wrap_masks_unwrap_give_the_exact_integer_sum(bits):
  rng = np.random.default_rng(bits)
  num, d = 5, 33
  limit = 2 ** (bits - 1) // num            # the sum of num values cannot overflow
  ints = rng.integers(-limit, limit, size=(num, d)).astype(np.int32)
  dropped = np.array([False, True, False, False, False])
  ids = jnp.array([7, 3, 11, 0, 5])

  @jax.jit
  def roundtrip(ints, key):
    words = distributed.wrap(ints, bits)
    seeds = secure_agg.pairwise_seeds(key, ids)
    masked = secure_agg.mask(words, ids, seeds, modulus_bits=bits)
    total = secure_agg.unmask_sum(masked, jnp.asarray(dropped), ids, seeds,
                                  modulus_bits=bits)
    return words, masked, distributed.unwrap(total, bits)

  words, masked, total = roundtrip(jnp.asarray(ints), jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(total),
                                ints[~dropped].astype(np.int64).sum(0))
  assert np.all(np.asarray(words) < 2 ** bits) and np.all(np.asarray(masked) < 2 ** bits)
  np.testing.assert_array_equal(distributed.unwrap(words, bits), ints)
  assert np.mean(np.asarray(masked) != np.asarray(words)) > 0.9
  # Past the range the sum wraps: it is still exact modulo 2^bits.
  big = jnp.full((2, 4), 2 ** (bits - 1) - 1, jnp.int32)
  wrapped = distributed.unwrap(jnp.sum(distributed.wrap(big, bits), 0, dtype=jnp.uint32),
                               bits)
  np.testing.assert_array_equal((np.asarray(wrapped) - 2 * (2 ** (bits - 1) - 1))
                                % 2 ** bits, 0)


# ------------------------------------------------------- client side, sensitivity

D_IN, D_OUT = 24, 10


def _tree(v):
  return {'w': v[:D_IN * D_OUT].reshape(D_IN, D_OUT), 'b': v[D_IN * D_OUT:]}


def test_replacing_one_client_moves_the_sum_by_at_most_the_sensitivity():
  """The pre-noise integer sum of 6 clients, with client 2's update replaced: the
  difference is within the (Delta_1, Delta_2) the accountant uses, and the L2 bound
  is nearly attained by an update and its opposite (2 gamma C)."""
  d = D_IN * D_OUT + D_OUT
  clip = 0.3
  p = distributed.skellam_params(d, clip, 1.0, expected_clients=6, bits=12)
  l1_sens, l2_sens = accounting.skellam_sensitivities(p)
  rng = np.random.default_rng(0)
  updates = rng.normal(size=(6, d)).astype(np.float32)   # norms >> clip: all clipped
  shared = jax.random.key(1)
  keys = jax.random.split(jax.random.key(2), 6)
  quantize = jax.jit(jax.vmap(lambda k, v: distributed.quantize(p, k, shared, _tree(v))))
  worst = 0.0
  for trial in range(3):
    other = updates.copy()
    other[2] = -updates[2] if trial == 0 else rng.normal(size=d) * 10 ** trial
    a, info_a = quantize(keys, updates)
    b, info_b = quantize(keys, other)
    assert bool(jnp.all(info_a['rounding_ok'])) and bool(jnp.all(info_b['rounding_ok']))
    diff = np.asarray(a).astype(np.int64).sum(0) - np.asarray(b).astype(np.int64).sum(0)
    l2 = float(np.linalg.norm(diff))
    assert l2 <= l2_sens and np.abs(diff).sum() <= l1_sens
    worst = max(worst, l2)
  assert worst > 0.99 * 2 * p.scale * clip
  # A client whose update is not finite sends zeros (and, with noise, its noise share).
  bad = updates.copy()
  bad[4, 0] = np.nan
  q, info = quantize(keys, bad)
  assert not bool(info['finite'][4]) and bool(jnp.all(q[4] == 0))


def test_payload_bytes_and_round_arguments():
  params = {'w': jnp.zeros((D_IN, D_OUT)), 'b': jnp.zeros(D_OUT)}
  d_pad = distributed.padded_dim(D_IN * D_OUT + D_OUT)
  loss = lambda p, f, b, k: jnp.zeros(b['x'].shape[0])
  for bits in (12, 20):
    dp = privacy.skellam_dp(params, 1.0, 1.0, expected_clients=4, bits=bits)
    fed = engine.build_round(loss, params, client_optimizer=optax.sgd(0.1),
                             server_optimizer=optax.sgd(1.0), num_clients=8, privacy=dp)
    assert fed.uplink_bytes_per_client == d_pad * bits // 8 == dp.distributed.payload_nbytes
  kw = dict(client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(1.0), num_clients=8,
            privacy=dp)
  from fedjax_fm import compress  # pylint: disable=g-import-not-at-top
  from fedjax_fm import aggregate  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match='compressor must be None'):
    engine.build_round(loss, params, compressor=compress.top_k(0.1), **kw)
  with pytest.raises(ValueError, match='aggregator must be None'):
    engine.build_round(loss, params, aggregator=aggregate.weighted_mean(), **kw)
  with pytest.raises(ValueError, match='adaptive_clip'):
    engine.build_round(loss, params, adaptive_clip=privacy.quantile_adaptive_clip(0.5), **kw)
  with pytest.raises(ValueError, match='only the last uplink step may encode'):
    uplink_lib.chain(uplink_lib.distributed_encode(dp.distributed), uplink_lib.guard_nonfinite())
  with pytest.raises(ValueError, match='bits=8 is too small'):
    distributed.skellam_params(100, 1.0, 1.0, expected_clients=5000, bits=8)


# ----------------------------------------------------------------- the round

S, B, C = 2, 4, 8
N = 6         # expected (= live) clients per round


def _loss(params, frozen, batch, key):
  del frozen, key
  return jnp.mean(jnp.square(batch['x'] @ params['w'] + params['b'] - batch['y']), -1)


def _params():
  return {'w': jnp.zeros((D_IN, D_OUT)), 'b': jnp.zeros(D_OUT)}


def _round_data(seed):
  rng = np.random.default_rng(seed)
  return {'batch': {'x': rng.normal(size=(C, S, B, D_IN)).astype(np.float32),
                    'y': rng.normal(size=(C, S, B, D_OUT)).astype(np.float32)},
          'example_mask': np.ones((C, S, B), bool), 'step_mask': np.ones((C, S), bool),
          'weight': np.ones(C, np.float32), 'client_id': np.arange(C, dtype=np.int32) * 3,
          'client_mask': np.arange(C) < N}   # two padding clients


def _build(dp, strategy='chunked'):
  return engine.build_round(_loss, _params(), client_optimizer=optax.sgd(0.1),
                            server_optimizer=optax.sgd(1.0), num_clients=30,
                            strategy=strategy, chunk_size=1 if strategy == 'sharded' else 2,
                            privacy=dp)


def _delta(fed, data, seed=0):
  state, metrics = fed.apply(fed.init(_params(), jax.random.key(seed)), {}, data)
  return state.params, metrics


CLIP = 0.05


@pytest.mark.slow
def test_round_without_noise_is_the_clipped_mean_within_the_rounding_error():
  """Quantisation error bound: each client's rounding error e_i has |e_ij| < 1 in the
  rotated integer domain, so ||sum_i e_i|| < N sqrt(d_pad); rotating back is an
  isometry, so the DP mean (divided by gamma and by N) is within sqrt(d_pad) / gamma of
  the clipped mean in L2. Statistically ||sum_i e_i||^2 <= N d_pad / 4 in expectation,
  which the test also checks at 3x. The strategies agree bit for bit (the integer sum is
  exact)."""
  data = _round_data(0)
  ref, _ = _delta(_build(privacy.gaussian_dp(CLIP, 0.0)), data)
  dp = privacy.skellam_dp(_params(), CLIP, 0.0, expected_clients=N, bits=16)
  p = dp.distributed.params
  got, m = _delta(_build(dp), data)
  err = float(tree_util.tree_norm(tree_util.tree_sub(got, ref)))
  assert float(m['dp_rounding_fallbacks']) == 0 and float(m['secure_sum_overflow']) == 0
  assert float(m['unclipped_fraction']) == 0           # clipping is active
  assert err <= math.sqrt(p.padded_dim) / p.scale + 1e-6
  assert err <= 3 * math.sqrt(N * p.padded_dim / 4) / (p.scale * N) + 1e-6
  assert float(tree_util.tree_norm(ref)) > 100 * err
  for strategy in ('vmap', 'sharded'):
    other, _ = _delta(_build(dp, strategy), data)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(other)):
      np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_round_noise_has_the_predicted_variance():
  """With noise multiplier z the DP mean minus the clipped mean has per-coordinate
  variance (z C / N)^2 (the Skellam noise, mu / (gamma N)^2) plus at most
  1 / (4 N gamma^2) (rounding); over 3 rounds x 250 coordinates the sample variance is
  within 5 standard errors sqrt(2 / 750) of that."""
  z = 2.0
  dp = privacy.skellam_dp(_params(), CLIP, z, expected_clients=N, bits=16)
  p = dp.distributed.params
  fed, ref_fed = _build(dp), _build(privacy.gaussian_dp(CLIP, 0.0))
  diffs = []
  for r in range(3):
    data = _round_data(r)
    got, m = _delta(fed, data, seed=r)
    ref, _ = _delta(ref_fed, data, seed=r)
    assert float(m['dp_rounding_fallbacks']) == 0
    diffs.append(np.concatenate([np.ravel(x) for x in
                                 jax.tree.leaves(tree_util.tree_sub(got, ref))]))
  diffs = np.concatenate(diffs)
  noise_var = p.variance / (p.scale * N) ** 2
  np.testing.assert_allclose(noise_var, (z * CLIP / N) ** 2, rtol=1e-6)
  upper = noise_var + 1 / (4 * N * p.scale ** 2)
  tol = 5 * math.sqrt(2 / diffs.size)
  assert noise_var * (1 - tol) < diffs.var() < upper * (1 + tol), (diffs.var(), noise_var)
  assert abs(diffs.mean()) < 5 * math.sqrt(upper / diffs.size)


@pytest.mark.slow
def test_experiment_wires_the_mechanism_and_its_accountant(tmp_path):
  from experiments.configs import mlp_synthetic  # pylint: disable=g-import-not-at-top
  from fedjax_fm import train  # pylint: disable=g-import-not-at-top
  c = mlp_synthetic.get_config('tiny')
  c.privacy.enabled, c.privacy.mechanism, c.privacy.bits = True, 'skellam', 14
  c.privacy.target_epsilon = 20.0
  exp = train.build_experiment(c, str(tmp_path))
  acct = exp.accountant
  assert isinstance(acct, privacy.SkellamAccountant)
  params = acct.params
  q = c.fl.clients_per_round / exp.data.train.num_clients
  final = accounting.skellam_epsilon(params, q, c.num_rounds, c.privacy.delta)
  assert final <= 20.0 and final == pytest.approx(20.0, rel=0.05)
  assert exp.fed_round.uplink_bytes_per_client == params.padded_dim * 14 // 8
  state = exp.fed_round.init(exp.split.trainable, jax.random.key(0))
  state, m = exp.fed_round.apply(state, exp.split.frozen, exp.round_data(0))
  assert float(m['uplink_bytes']) == c.fl.clients_per_round * params.padded_dim * 14 / 8
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
  assert acct.step() == pytest.approx(accounting.skellam_epsilon(params, q, 1,
                                                                 c.privacy.delta))
