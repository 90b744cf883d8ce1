"""Empirical privacy auditing with canaries (a lower bound on epsilon).

A DP guarantee ``(eps, delta)`` bounds every membership test: for any test that
tells "canary client present" from "absent" with false-positive rate ``FPR`` and
false-negative rate ``FNR``,

  ``FPR + e^eps FNR >= 1 - delta``  and  ``FNR + e^eps FPR >= 1 - delta``,

so ``eps >= max(log((1 - delta - FNR) / FPR), log((1 - delta - FPR) / FNR))``.
The audit runs the mechanism many times with and without a canary client whose
update is a fixed direction of norm ``C`` (the worst case for clipping), scores
each output by its projection on the canary direction, picks a threshold, and
plugs Clopper-Pearson *upper* confidence bounds of FPR and FNR into the formula:
the result is an epsilon lower bound that holds with the chosen confidence. It is
a sanity check for an implementation (a lower bound above the accountant's
epsilon reveals a bug), not a proof of privacy.

The threshold is chosen on a calibration split of the trials and the rates are
measured on the rest, so the confidence statement is not invalidated by the
choice.

`audit_round` runs the test through a real federated round
(`fedjax_fm.engine.FederatedRound`): two neighbouring worlds differ in one
client's data (the canary's in one, the client's own in the other), every trial
runs the rounds with fresh randomness (trials vmapped over the state's key), and
the score is the projection of the released params' change on the canary's
noise-free direction. When the canary takes part in every round, the guarantee
it is measured against is the accountant's without subsampling.

References:
  * Jagielski, Ullman, Oprea 2020, "Auditing Differentially Private Machine
    Learning: How Private is Private SGD?", https://arxiv.org/abs/2006.07709
  * Nasr, Song, Thakurta, Papernot, Carlini 2021, "Adversary Instantiation:
    Lower Bounds for Differentially Private Machine Learning",
    https://arxiv.org/abs/2101.04535
  * Clopper, Pearson 1934, "The use of confidence or fiducial limits
    illustrated in the case of the binomial", https://doi.org/10.2307/2331986
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from fedjax_fm.privacy import dp_fedavg


class AuditResult(NamedTuple):
  """Outcome of `empirical_epsilon`.

  Attributes:
    epsilon_lower_bound: Empirical epsilon lower bound (>= 0) at ``confidence``.
    threshold: Score threshold (``score > threshold`` means "canary present").
    fpr: Measured false-positive rate on the evaluation split.
    fnr: Measured false-negative rate on the evaluation split.
    fpr_upper: Clopper-Pearson upper bound of the FPR.
    fnr_upper: Clopper-Pearson upper bound of the FNR.
  """
  epsilon_lower_bound: float
  threshold: float
  fpr: float
  fnr: float
  fpr_upper: float
  fnr_upper: float


def canary_update(key, params_like, norm: float):
  """A canary update: a uniformly random direction of L2 norm ``norm``.

  Args:
    key: PRNG key.
    params_like: Pytree of arrays (or ShapeDtypeStructs) giving the shapes.
    norm: L2 norm of the canary over the whole pytree (the clip bound ``C``).

  Returns:
    A float32 pytree with the structure of ``params_like``.
  """
  leaves, treedef = jax.tree.flatten(params_like)
  keys = jax.random.split(key, max(len(leaves), 1))
  g = [jax.random.normal(k, jnp.shape(x), jnp.float32)
       for k, x in zip(keys, leaves)]
  total = jnp.sqrt(sum(jnp.sum(x * x) for x in g))
  return jax.tree.unflatten(treedef, [x * (norm / total) for x in g])


def canary_score(output, canary) -> jax.Array:
  """Test statistic: projection of the output on the canary's direction."""
  dot = sum(jnp.vdot(o.astype(jnp.float32), c.astype(jnp.float32))
            for o, c in zip(jax.tree.leaves(output), jax.tree.leaves(canary)))
  norm = jnp.sqrt(sum(jnp.vdot(c.astype(jnp.float32), c.astype(jnp.float32))
                      for c in jax.tree.leaves(canary)))
  return dot / norm


def clopper_pearson_upper(errors: int, trials: int,
                          confidence: float = 0.95) -> float:
  """One-sided Clopper-Pearson upper confidence bound of a binomial rate."""
  if errors >= trials:
    return 1.0
  return float(stats.beta.ppf(confidence, errors + 1, trials - errors))


def _epsilon_from_rates(fpr, fnr, delta):
  best = 0.0
  for a, b in ((fpr, fnr), (fnr, fpr)):
    num = 1.0 - delta - b
    if num > 0 and a > 0:
      best = max(best, math.log(num / a))
  return best


def _bounds_vectorized(out, inn, thresholds, delta, each):
  """Epsilon bounds for many thresholds at once (same formula as ``bound``)."""
  fp = out.size - np.searchsorted(np.sort(out), thresholds, side='right')
  fn = np.searchsorted(np.sort(inn), thresholds, side='right')
  fpr_u = np.where(fp >= out.size, 1.0,
                   stats.beta.ppf(each, fp + 1, np.maximum(out.size - fp, 1)))
  fnr_u = np.where(fn >= inn.size, 1.0,
                   stats.beta.ppf(each, fn + 1, np.maximum(inn.size - fn, 1)))
  with np.errstate(divide='ignore', invalid='ignore'):
    a = np.where((1 - delta - fnr_u > 0) & (fpr_u > 0),
                 np.log(np.maximum(1 - delta - fnr_u, 1e-300) / fpr_u), 0.0)
    b = np.where((1 - delta - fpr_u > 0) & (fnr_u > 0),
                 np.log(np.maximum(1 - delta - fpr_u, 1e-300) / fnr_u), 0.0)
  return np.maximum(np.maximum(a, b), 0.0)


def empirical_epsilon(scores_out, scores_in, delta: float, *,
                      confidence: float = 0.95,
                      threshold: Optional[float] = None,
                      calibration_fraction: float = 0.5) -> AuditResult:
  """Epsilon lower bound from scores without (``out``) and with (``in``) the canary.

  With ``threshold=None`` the first ``calibration_fraction`` of each score list
  is used to pick the threshold maximizing the bound, and the rates are
  measured on the remaining trials; with a given threshold all trials are used.
  FPR and FNR are replaced by their one-sided Clopper-Pearson upper bounds at
  ``confidence`` (each at ``(1 + confidence) / 2``, a union bound, so both hold
  jointly with probability ``confidence``).

  Args:
    scores_out: 1-D scores of runs without the canary.
    scores_in: 1-D scores of runs with the canary.
    delta: The mechanism's delta (in [0, 1)).
    confidence: Joint confidence level in (0, 1).
    threshold: Fixed threshold, or None to calibrate it.
    calibration_fraction: Fraction of the trials used to pick the threshold.

  Returns:
    An `AuditResult`.

  Raises:
    ValueError: naming the offending argument.
  """
  if not 0.0 <= delta < 1.0:
    raise ValueError(f'delta must be in [0, 1); got {delta!r}.')
  if not 0.0 < confidence < 1.0:
    raise ValueError(f'confidence must be in (0, 1); got {confidence!r}.')
  if not 0.0 < calibration_fraction < 1.0:
    raise ValueError(
        f'calibration_fraction must be in (0, 1); got {calibration_fraction!r}.')
  s_out = np.asarray(scores_out, np.float64).ravel()
  s_in = np.asarray(scores_in, np.float64).ravel()
  if s_out.size < 2 or s_in.size < 2:
    raise ValueError('scores_out and scores_in need at least 2 trials each.')
  each = (1.0 + confidence) / 2.0

  def bound(out, inn, t):
    fp = int(np.sum(out > t))
    fn = int(np.sum(inn <= t))
    fpr_u = clopper_pearson_upper(fp, out.size, each)
    fnr_u = clopper_pearson_upper(fn, inn.size, each)
    return (_epsilon_from_rates(fpr_u, fnr_u, delta), fp / out.size,
            fn / inn.size, fpr_u, fnr_u)

  if threshold is None:
    n_out = max(1, min(s_out.size - 1, int(s_out.size * calibration_fraction)))
    n_in = max(1, min(s_in.size - 1, int(s_in.size * calibration_fraction)))
    cal_out, s_out = s_out[:n_out], s_out[n_out:]
    cal_in, s_in = s_in[:n_in], s_in[n_in:]
    candidates = np.unique(np.concatenate([cal_out, cal_in]))
    if candidates.size > 4000:
      candidates = np.quantile(candidates, np.linspace(0, 1, 4000))
    threshold = float(candidates[np.argmax(
        _bounds_vectorized(cal_out, cal_in, candidates, delta, each))])
  eps, fpr, fnr, fpr_u, fnr_u = bound(s_out, s_in, float(threshold))
  return AuditResult(eps, float(threshold), fpr, fnr, fpr_u, fnr_u)


def gaussian_mechanism_scores(key, num_trials: int, *, clip_norm: float,
                              noise_multiplier: float, num_clients: int,
                              dim: int, other_norm: float = 1.0
                              ) -> tuple[np.ndarray, np.ndarray]:
  """Scores of one DP-FedAvg round (`gaussian_dp`) without and with a canary.

  Each trial draws ``num_clients`` other clients' updates (random directions of
  norm ``other_norm``), clips them, optionally adds the canary client (fixed
  direction of norm ``clip_norm``; under add/remove adjacency the run without
  it simply lacks it), takes the fixed-denominator mean over
  ``num_clients + 1`` expected clients, adds the mechanism's noise and scores the
  result with `canary_score`. Trials are vmapped.

  Args:
    key: PRNG key.
    num_trials: Trials per world (with and without the canary).
    clip_norm: Clip bound ``C``.
    noise_multiplier: ``z``.
    num_clients: Other clients per round.
    dim: Update dimension.
    other_norm: Norm of the other clients' updates before clipping.

  Returns:
    ``(scores_out, scores_in)``, NumPy arrays of shape ``[num_trials]``.
  """
  dp = dp_fedavg.gaussian_dp(clip_norm, noise_multiplier)
  canary_key, key = jax.random.split(key)
  canary = canary_update(canary_key, jnp.zeros((dim,)), clip_norm)
  expected = num_clients + 1

  def trial(k, with_canary):
    k_upd, k_noise = jax.random.split(k)
    others = jax.random.normal(k_upd, (num_clients, dim))
    others = others * other_norm / jnp.linalg.norm(others, axis=1,
                                                   keepdims=True)
    clipped, _ = jax.vmap(dp.clip)(others)
    total = jnp.sum(clipped, axis=0)
    canary_clipped, _ = dp.clip(canary)
    total = total + jnp.where(with_canary, 1.0, 0.0) * canary_clipped
    noisy = dp.noise(k_noise, total / expected, expected)
    return canary_score(noisy, canary)

  run = jax.jit(jax.vmap(trial, in_axes=(0, None)))
  k_out, k_in = jax.random.split(key)
  scores_out = run(jax.random.split(k_out, num_trials), False)
  scores_in = run(jax.random.split(k_in, num_trials), True)
  return np.asarray(scores_out), np.asarray(scores_in)


def audit_mechanism(key, mechanism: Callable, canary, num_trials: int,
                    delta: float, **kwargs) -> AuditResult:
  """Audits an arbitrary mechanism ``mechanism(key, with_canary: bool) -> output``.

  Runs ``num_trials`` vmapped trials in each world, scores the outputs with
  `canary_score` against ``canary`` and calls `empirical_epsilon`.

  Args:
    key: PRNG key.
    mechanism: Pure function ``(key, with_canary) -> pytree``; ``with_canary`` is
      a traced bool.
    canary: The canary pytree (direction of the test statistic).
    num_trials: Trials per world.
    delta: The mechanism's delta.
    **kwargs: Forwarded to `empirical_epsilon`.

  Returns:
    An `AuditResult`.
  """
  run = jax.jit(jax.vmap(
      lambda k, w: canary_score(mechanism(k, w), canary), in_axes=(0, None)))
  k_out, k_in = jax.random.split(key)
  s_out = np.asarray(run(jax.random.split(k_out, num_trials), False))
  s_in = np.asarray(run(jax.random.split(k_in, num_trials), True))
  return empirical_epsilon(s_out, s_in, delta, **kwargs)


# ------------------------------------------------------- through a federated round

def released_vector(state) -> jax.Array:
  """Everything a round's server state releases that carries the clients' updates.

  The trainable params and the merged base update (``ServerState.base_delta``,
  LoRA ``stack``), flattened into one float32 vector.
  """
  leaves = jax.tree.leaves((state.params, state.base_delta))
  return jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in leaves])


def trial_runner(fed_round):
  """``run(keys [B], state, frozen, rounds_data) -> [B, P]``: vmapped trials of a round.

  Each trial starts from ``state`` with its key replaced (the key drives all the
  round's randomness: local training, stochastic compression, the DP noise),
  applies ``fed_round.apply_fn`` to each round's data in turn and returns its
  released vector's change (`released_vector`). Jitted: one compile per batch
  size and number of rounds.
  """

  def trial(key, state, frozen, rounds_data):
    s = state._replace(key=key)
    for data in rounds_data:
      s, _ = fed_round.apply_fn(s, frozen, data)
    return released_vector(s) - released_vector(state)

  return jax.jit(jax.vmap(trial, in_axes=(0, None, None, None)))


def round_trials(fed_round, state, frozen, rounds_data, keys, *,
                 batch_size: int = 1024, runner=None,
                 direction: Optional[np.ndarray] = None) -> np.ndarray:
  """Runs ``len(rounds_data)`` rounds from ``state`` once per key, vectorised.

  Args:
    fed_round: a `fedjax_fm.engine.FederatedRound` (its un-jitted ``apply_fn``).
    state: the server state the trials start from.
    frozen: the frozen params.
    rounds_data: one round's data per round (equal shapes).
    keys: PRNG keys ``[T]``, one per trial.
    batch_size: trials per vmapped call (the last batch is padded).
    runner: a `trial_runner` of ``fed_round`` to reuse (its compiled program).
    direction: if given (``[P]``), each trial is reduced to its projection on
      this direction's unit vector (`canary_score`), batch by batch.

  Returns:
    float64 ``[T, P]``: each trial's released vector after the last round minus
    the one before the first; ``[T]`` projections with ``direction``.
  """
  run = runner or trial_runner(fed_round)
  rounds_data = tuple(jax.tree.map(jnp.asarray, d) for d in rounds_data)
  unit = None
  if direction is not None:
    unit = np.asarray(direction, np.float64) / np.linalg.norm(direction)
  out = []
  for i in range(0, keys.shape[0], batch_size):
    chunk = keys[i:i + batch_size]
    real = chunk.shape[0]
    if real < batch_size:
      chunk = jnp.concatenate([chunk, jnp.repeat(chunk[:1], batch_size - real, axis=0)])
    changes = np.asarray(run(chunk, state, frozen, rounds_data), np.float64)[:real]
    out.append(changes if unit is None else changes @ unit)
  return np.concatenate(out)


class RoundAudit(NamedTuple):
  """Outcome of `audit_round`.

  Attributes:
    result: the `AuditResult` of the canary scores.
    direction: the score's direction: the pre-noise difference of the released
      vector between the worlds with and without the canary (same seed in both,
      so the noise cancels), computed from a key no trial uses.
    scores_out: scores of the trials without the canary.
    scores_in: scores of the trials with the canary.
  """
  result: AuditResult
  direction: np.ndarray
  scores_out: np.ndarray
  scores_in: np.ndarray


def audit_round(key, fed_round, state, frozen, rounds_out, rounds_in,
                num_trials: int, delta: float, *, batch_size: int = 1024,
                **kwargs) -> RoundAudit:
  """Canary audit of a federated round (replace-one: one client's data differs).

  ``rounds_out`` and ``rounds_in`` are the rounds' data of two neighbouring
  worlds: the same clients, except that one client holds the canary's data in
  ``rounds_in``. Each trial runs the rounds (`round_trials`) and is scored by the
  projection of the released change on the canary's direction (the noise-free
  difference between the worlds, measured once with a key outside the trials);
  `empirical_epsilon` turns the scores into an epsilon lower bound.

  Args:
    key: PRNG key of the audit.
    fed_round: the `FederatedRound` under audit.
    state: its initial server state.
    frozen: the frozen params.
    rounds_out: per-round data without the canary.
    rounds_in: per-round data with the canary.
    num_trials: trials per world.
    delta: the delta of the claimed guarantee.
    batch_size: trials per vmapped call.
    **kwargs: forwarded to `empirical_epsilon`.

  Returns:
    A `RoundAudit`.

  Raises:
    ValueError: if the two worlds release the same values (no canary signal).
  """
  if len(rounds_out) != len(rounds_in) or not rounds_in:
    raise ValueError('rounds_out and rounds_in need the same, positive, number of rounds; '
                     f'got {len(rounds_out)} and {len(rounds_in)}.')
  k_dir, k_out, k_in = jax.random.split(key, 3)
  kw = dict(batch_size=batch_size, runner=trial_runner(fed_round))
  same = k_dir[None]   # one key for both worlds: the noise cancels in the difference
  direction = (round_trials(fed_round, state, frozen, rounds_in, same, **kw)[0]
               - round_trials(fed_round, state, frozen, rounds_out, same, **kw)[0])
  if not np.linalg.norm(direction) > 0:
    raise ValueError('the canary does not change what the round releases.')
  s_out = round_trials(fed_round, state, frozen, rounds_out,
                       jax.random.split(k_out, num_trials), direction=direction, **kw)
  s_in = round_trials(fed_round, state, frozen, rounds_in,
                      jax.random.split(k_in, num_trials), direction=direction, **kw)
  return RoundAudit(empirical_epsilon(s_out, s_in, delta, **kwargs), direction, s_out, s_in)
