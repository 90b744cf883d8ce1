"""Empirical privacy measurements of a trained model: membership inference and exposure.

Pure NumPy operations on per-example scores, independent of the model:

* **Membership inference** (loss-threshold attack, Yeom, Giacomelli, Fredrikson,
  Jha 2018, "Privacy Risk in Machine Learning: Analyzing the Connection to
  Overfitting", https://arxiv.org/abs/1709.01604): the attacker calls an example
  a member when its loss is below a threshold. With scores ``s = -loss`` (higher
  means "member"), `roc_auc` is the area under the attack's ROC curve (0.5: no
  better than a coin) and `best_advantage` its largest ``TPR - FPR`` (the
  membership advantage; 0: none). `holdout_advantage` picks the threshold on one
  part of the examples and measures ``TPR - FPR`` on the rest with Clopper-Pearson
  bounds, so the figure is not inflated by the choice of the threshold.
* **Exposure** (Carlini, Liu, Erlingsson, Kos, Song 2019, "The Secret Sharer",
  https://arxiv.org/abs/1802.08232): a canary's secret is ranked among all its
  ``N`` alternatives by the model's loss; ``exposure = log2 N - log2 rank`` (bits),
  ``log2 N`` when the secret has the lowest loss, about 0 when it ranks last.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from scipy import stats

__all__ = [
    'AdvantageResult',
    'best_advantage',
    'bootstrap_interval',
    'chance_exposure',
    'clopper_pearson',
    'exposure',
    'holdout_advantage',
    'loss_ranks',
    'roc_auc',
]


def _scores(x, name: str) -> np.ndarray:
  a = np.asarray(x, np.float64).ravel()
  if a.size == 0:
    raise ValueError(f'{name} is empty; it needs at least one score')
  if not np.all(np.isfinite(a)):
    raise ValueError(f'{name} has {int(np.sum(~np.isfinite(a)))} non-finite scores')
  return a


def roc_auc(member_scores, nonmember_scores) -> float:
  """Area under the ROC curve of the test "score high means member".

  Equals ``P(s_member > s_nonmember) + P(s_member == s_nonmember) / 2`` over all
  pairs (the Mann-Whitney U statistic over ``n_m * n_n``), computed from the
  mid-ranks of the pooled scores in ``O(n log n)``.

  Args:
    member_scores: 1-D scores of the members.
    nonmember_scores: 1-D scores of the non-members.

  Returns:
    The AUC in ``[0, 1]``.
  """
  m = _scores(member_scores, 'member_scores')
  n = _scores(nonmember_scores, 'nonmember_scores')
  ranks = stats.rankdata(np.concatenate([m, n]))   # mid-ranks for ties
  u = ranks[:m.size].sum() - m.size * (m.size + 1) / 2.0
  return float(u / (m.size * n.size))


def _rates(m: np.ndarray, n: np.ndarray, thresholds: np.ndarray):
  """TPR and FPR of "score >= t" for every threshold t."""
  tpr = (m.size - np.searchsorted(np.sort(m), thresholds, side='left')) / m.size
  fpr = (n.size - np.searchsorted(np.sort(n), thresholds, side='left')) / n.size
  return tpr, fpr


def best_advantage(member_scores, nonmember_scores) -> tuple[float, float]:
  """The largest ``TPR - FPR`` over thresholds of "score >= t means member".

  The threshold is chosen on the very scores it is measured on, so on finite
  samples of one distribution the result is positive (about the Kolmogorov-Smirnov
  distance of the two samples); `holdout_advantage` avoids that bias.

  Args:
    member_scores: 1-D scores of the members.
    nonmember_scores: 1-D scores of the non-members.

  Returns:
    ``(advantage, threshold)``; the advantage is in ``[0, 1]`` (the threshold
    above every score gives 0).
  """
  m = _scores(member_scores, 'member_scores')
  n = _scores(nonmember_scores, 'nonmember_scores')
  candidates = np.unique(np.concatenate([m, n, [np.inf]]))
  tpr, fpr = _rates(m, n, candidates)
  i = int(np.argmax(tpr - fpr))
  return float(tpr[i] - fpr[i]), float(candidates[i])


def clopper_pearson(successes: int, trials: int,
                    confidence: float = 0.95) -> tuple[float, float]:
  """Two-sided Clopper-Pearson (exact binomial) interval of a rate."""
  if trials < 1 or not 0 <= successes <= trials:
    raise ValueError(f'successes={successes} and trials={trials} must satisfy '
                     '0 <= successes <= trials, trials >= 1')
  if not 0.0 < confidence < 1.0:
    raise ValueError(f'confidence must be in (0, 1); got {confidence!r}')
  alpha = 1.0 - confidence
  lo = 0.0 if successes == 0 else float(stats.beta.ppf(alpha / 2, successes,
                                                         trials - successes + 1))
  hi = 1.0 if successes == trials else float(stats.beta.ppf(1 - alpha / 2, successes + 1,
                                                              trials - successes))
  return lo, hi


class AdvantageResult(NamedTuple):
  """Outcome of `holdout_advantage`.

  Attributes:
    advantage: ``TPR - FPR`` measured on the evaluation part.
    lower: lower end of its interval at ``confidence``.
    upper: upper end of its interval at ``confidence``.
    threshold: the threshold chosen on the calibration part.
    tpr: measured true-positive rate.
    fpr: measured false-positive rate.
  """
  advantage: float
  lower: float
  upper: float
  threshold: float
  tpr: float
  fpr: float


def holdout_advantage(member_scores, nonmember_scores, *, calibration_fraction: float = 0.5,
                      confidence: float = 0.95, seed: int = 0) -> AdvantageResult:
  """Membership advantage with the threshold picked on held-apart scores.

  Each score list is shuffled (``seed``); the first ``calibration_fraction`` of
  each picks the threshold maximizing ``TPR - FPR`` (`best_advantage`), and the
  rest measures it. The interval combines two-sided Clopper-Pearson intervals of
  TPR and FPR, each at ``(1 + confidence) / 2`` (a union bound), so
  ``[TPR_lo - FPR_hi, TPR_hi - FPR_lo]`` holds with probability ``confidence``.

  Args:
    member_scores: 1-D scores of the members (at least 2).
    nonmember_scores: 1-D scores of the non-members (at least 2).
    calibration_fraction: share of each list used to choose the threshold.
    confidence: joint confidence of the interval.
    seed: seed of the shuffle.

  Returns:
    An `AdvantageResult`.
  """
  if not 0.0 < calibration_fraction < 1.0:
    raise ValueError(f'calibration_fraction must be in (0, 1); got {calibration_fraction!r}')
  m = _scores(member_scores, 'member_scores')
  n = _scores(nonmember_scores, 'nonmember_scores')
  if m.size < 2 or n.size < 2:
    raise ValueError(f'holdout_advantage needs at least 2 scores per list; got '
                     f'{m.size} members and {n.size} non-members')
  rng = np.random.default_rng(seed)
  m, n = rng.permutation(m), rng.permutation(n)
  km = min(max(1, int(m.size * calibration_fraction)), m.size - 1)
  kn = min(max(1, int(n.size * calibration_fraction)), n.size - 1)
  _, t = best_advantage(m[:km], n[:kn])
  em, en = m[km:], n[kn:]
  tp, fp = int(np.sum(em >= t)), int(np.sum(en >= t))
  each = (1.0 + confidence) / 2.0
  tpr_lo, tpr_hi = clopper_pearson(tp, em.size, each)
  fpr_lo, fpr_hi = clopper_pearson(fp, en.size, each)
  tpr, fpr = tp / em.size, fp / en.size
  return AdvantageResult(tpr - fpr, tpr_lo - fpr_hi, tpr_hi - fpr_lo, t, tpr, fpr)


def bootstrap_interval(statistic, member_scores, nonmember_scores, *,
                       num_resamples: int = 1000, confidence: float = 0.95,
                       seed: int = 0) -> tuple[float, float]:
  """Percentile bootstrap interval of ``statistic(members, nonmembers)``.

  Members and non-members are resampled with replacement, each within its own list.
  """
  if num_resamples < 1:
    raise ValueError(f'num_resamples must be >= 1; got {num_resamples}')
  if not 0.0 < confidence < 1.0:
    raise ValueError(f'confidence must be in (0, 1); got {confidence!r}')
  m = _scores(member_scores, 'member_scores')
  n = _scores(nonmember_scores, 'nonmember_scores')
  rng = np.random.default_rng(seed)
  values = np.array([statistic(m[rng.integers(0, m.size, m.size)],
                               n[rng.integers(0, n.size, n.size)])
                     for _ in range(num_resamples)])
  alpha = 1.0 - confidence
  lo, hi = np.quantile(values, [alpha / 2, 1 - alpha / 2])
  return float(lo), float(hi)


def loss_ranks(losses, secret) -> np.ndarray:
  """Rank (1 = lowest loss) of each row's secret among the row's alternatives.

  Ties with other alternatives count half (mid-rank), so a model that gives every
  alternative the same loss ranks each secret in the middle.

  Args:
    losses: ``[n, N]`` loss of each of the ``N`` alternatives of ``n`` canaries.
    secret: ``[n]`` integer index of each canary's inserted secret.

  Returns:
    float64 ``[n]`` ranks in ``[1, N]``.
  """
  losses = np.asarray(losses, np.float64)
  secret = np.asarray(secret)
  if losses.ndim != 2 or secret.shape != losses.shape[:1]:
    raise ValueError(f'losses must be [n, N] and secret [n]; got {losses.shape} and '
                     f'{secret.shape}')
  if secret.size and (secret.min() < 0 or secret.max() >= losses.shape[1]):
    raise ValueError(f'secret indices must be in [0, {losses.shape[1]}); got '
                     f'[{secret.min()}, {secret.max()}]')
  own = losses[np.arange(len(secret)), secret][:, None]
  lower = np.sum(losses < own, axis=1)
  ties = np.sum(losses == own, axis=1) - 1
  return 1.0 + lower + ties / 2.0


def exposure(ranks, num_alternatives: int) -> np.ndarray:
  """``log2(num_alternatives) - log2(rank)`` of each canary (bits)."""
  ranks = np.asarray(ranks, np.float64)
  if num_alternatives < 1:
    raise ValueError(f'num_alternatives must be >= 1; got {num_alternatives}')
  if ranks.size and (ranks.min() < 1 or ranks.max() > num_alternatives):
    raise ValueError(f'ranks must be in [1, {num_alternatives}]; got '
                     f'[{ranks.min()}, {ranks.max()}]')
  return math.log2(num_alternatives) - np.log2(ranks)


def chance_exposure(num_alternatives: int) -> float:
  """Expected exposure when the rank is uniform on ``1..N`` (no memorisation).

  ``log2 N - log2(N!) / N``: about 1.09 bits for ``N = 8``, ``log2 e`` as
  ``N`` grows.
  """
  if num_alternatives < 1:
    raise ValueError(f'num_alternatives must be >= 1; got {num_alternatives}')
  n = num_alternatives
  return math.log2(n) - math.lgamma(n + 1) / math.log(2) / n
