"""Tests for fedjax_fm.evaluation.metrics."""

import math

import jax
import numpy as np
import pytest

from fedjax_fm.evaluation import metrics

rouge_scorer = pytest.importorskip('rouge_score.rouge_scorer')

# ------------------------------------------------------------------ arrays


def test_masked_mean_and_mean_loss():
  v = np.array([1.0, 2.0, 3.0, np.nan])
  m = np.array([1, 1, 1, 0])
  assert float(metrics.masked_mean(v, m)) == pytest.approx(2.0)
  assert float(metrics.mean_loss(v[:3])) == pytest.approx(2.0)
  assert float(metrics.masked_mean(v, np.zeros(4))) == 0.0
  with pytest.raises(ValueError, match='broadcast'):
    metrics.masked_mean(np.ones(3), np.ones(4))


def test_accuracy_from_logits_and_labels():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 4)).astype(np.float32)
  labels = rng.integers(0, 4, size=6)
  mask = np.array([1, 1, 0, 1, 1, 0])
  pred = logits.argmax(-1)
  expected = np.sum((pred == labels) * mask) / mask.sum()
  assert float(metrics.accuracy(logits, labels, mask)) == pytest.approx(expected)
  assert float(metrics.accuracy(pred, labels)) == pytest.approx(
      np.mean(pred == labels))
  jitted = jax.jit(metrics.accuracy)(logits, labels, mask)
  assert float(jitted) == pytest.approx(expected)
  with pytest.raises(ValueError):
    metrics.accuracy(np.zeros((5, 4)), labels)


def test_perplexity_matches_numpy():
  rng = np.random.default_rng(1)
  nll = rng.uniform(0, 4, size=(3, 7))
  mask = (rng.uniform(size=(3, 7)) > 0.3).astype(np.float32)
  expected = np.exp(np.sum(nll * mask) / np.sum(mask))
  assert float(metrics.perplexity(nll, mask)) == pytest.approx(expected, rel=1e-5)
  # Per-example mean NLL weighted by token counts gives the same number.
  nll_sum, tokens = (nll * mask).sum(-1), mask.sum(-1)
  per_example = nll_sum / tokens
  assert float(metrics.perplexity(per_example, tokens)) == pytest.approx(
      expected, rel=1e-5)
  assert float(metrics.perplexity_from_sums(nll_sum, tokens)) == pytest.approx(
      expected, rel=1e-5)
  assert float(jax.jit(metrics.perplexity)(nll, mask)) == pytest.approx(
      expected, rel=1e-5)
  with pytest.raises(ValueError, match='same shape'):
    metrics.perplexity_from_sums(nll_sum, tokens[:2])


# ----------------------------------------------------------------- SQuAD


@pytest.mark.parametrize('text, expected', [
    ('The Cat!', 'cat'),
    ('  A  quick,   brown fox. ', 'quick brown fox'),
    ('theatre an anthem', 'theatre anthem'),
    ("Don't", 'dont'),
    ('', ''),
])
def test_normalize_answer(text, expected):
  assert metrics.normalize_answer(text) == expected


@pytest.mark.parametrize('pred, ref, expected', [
    ('The Cat!', 'cat', 1.0),
    ('a cat', 'the cat', 1.0),
    ('cats', 'cat', 0.0),
    ('', '', 1.0),
    ('Paris, France', 'paris france', 1.0),
])
def test_exact_match(pred, ref, expected):
  assert metrics.exact_match(pred, ref) == expected


@pytest.mark.parametrize('pred, ref, expected', [
    # [cat, sat, on, mat] vs [cat, on, mat]: p = 3/4, r = 1.
    ('the cat sat on the mat', 'a cat on a mat', 6 / 7),
    # Multiplicity: common = min(2,1) + min(1,2) = 2; p = r = 2/3.
    ('x x y', 'x y y', 2 / 3),
    ('alpha beta', 'gamma', 0.0),
    ('', '', 1.0),
    ('the', 'cat', 0.0),       # prediction normalises to nothing
    ('cat', '', 0.0),
    # [new, york, city] vs [york]: p = 1/3, r = 1 -> f = 0.5.
    ('New York City', 'york', 0.5),
])
def test_token_f1(pred, ref, expected):
  assert metrics.token_f1(pred, ref) == pytest.approx(expected, abs=1e-12)


def test_text_metrics_reject_non_str():
  with pytest.raises(ValueError, match='str'):
    metrics.exact_match(1, 'a')
  with pytest.raises(ValueError, match='str'):
    metrics.token_f1('a', None)


# ----------------------------------------------------------------- ROUGE-L

_HANDWRITTEN = [
    ('the cat sat on the mat', 'the cat was on the mat'),
    ('The Cat sat.', 'the cat'),
    ('', 'anything'),
    ('anything', ''),
    ('', ''),
    ('!!! ???', 'a b c'),
    ('police killed the gunman', 'the gunman killed police'),
    ('café déjà vu 42', 'cafe deja vu 42'),
    ('e-mail state-of-the-art 3.14', 'email state of the art 3 14'),
    ('running runners ran quickly', 'the runner runs quick'),
    ('ÀÉÎõü ß Straße', 'strasse'),
    ('tabs\tand\nnewlines  here', 'tabs and newlines'),
]

_WORDS = ['the', 'cat', 'Cat', 'dog', 'sat', 'on', 'mat', 'running', 'runs',
          'a', 'é', 'x1', '42', 'state-of-art', "don't", 'U.S.', 'généralement',
          'running.', '', 'Über', 'naïve', 'is', 'was', 'quickly']
_SEPS = [' ', '  ', ', ', '. ', '\t', '\n', '-', ' (', ') ', '; ']


def _random_text(rng, max_words=12):
  n = int(rng.integers(0, max_words + 1))
  parts = []
  for _ in range(n):
    parts.append(_WORDS[int(rng.integers(len(_WORDS)))])
    parts.append(_SEPS[int(rng.integers(len(_SEPS)))])
  return ''.join(parts)


def _random_pairs(seed, n):
  rng = np.random.default_rng(seed)
  return [(_random_text(rng), _random_text(rng)) for _ in range(n)]


@pytest.mark.parametrize('use_stemmer', [False, True])
def test_rouge_l_matches_rouge_score(use_stemmer):
  scorer = rouge_scorer.RougeScorer(['rougeL'], use_stemmer=use_stemmer)
  pairs = _HANDWRITTEN + _random_pairs(int(use_stemmer), 300)
  for pred, ref in pairs:
    expected = scorer.score(ref, pred)['rougeL']
    got = metrics.rouge_l_score(pred, ref, use_stemmer=use_stemmer)
    assert got.fmeasure == pytest.approx(expected.fmeasure, abs=1e-9), (pred, ref)
    assert got.precision == pytest.approx(expected.precision, abs=1e-9)
    assert got.recall == pytest.approx(expected.recall, abs=1e-9)
    assert metrics.rouge_l(pred, ref, use_stemmer) == got.fmeasure


def test_rouge_tokenize_matches_rouge_score():
  from rouge_score import tokenize  # pylint: disable=g-import-not-at-top
  for text, _ in _HANDWRITTEN + _random_pairs(7, 50):
    assert metrics.rouge_tokenize(text) == tokenize.tokenize(text, None)


def test_rouge_l_closed_form():
  # LCS of [police killed the gunman] and [the gunman killed police] is 2.
  s = metrics.rouge_l_score('police killed the gunman', 'the gunman killed police')
  assert s.fmeasure == pytest.approx(0.5)
  assert metrics.lcs_length('abcbdab', 'bdcaba') == 4
  assert metrics.lcs_length([], [1, 2]) == 0


# -------------------------------------------------------------- generation


def test_generative_metrics_max_over_references():
  preds = ['The cat sat.', 'blue sky', 'nothing']
  refs = [['a dog', 'the cat sat'], 'the blue sky today', ['x', 'y']]
  got = metrics.generative_metrics(preds, refs)
  scorer = rouge_scorer.RougeScorer(['rougeL'])
  exp_rouge = np.mean([
      max(scorer.score(r, p)['rougeL'].fmeasure for r in rs)
      for p, rs in zip(preds, [refs[0], [refs[1]], refs[2]])])
  assert got['exact_match'] == pytest.approx(1 / 3)
  # blue sky vs [blue, sky, today]: p = 1, r = 2/3 -> 0.8.
  assert got['token_f1'] == pytest.approx((1.0 + 0.8 + 0.0) / 3)
  assert got['rouge_l'] == pytest.approx(exp_rouge, abs=1e-9)
  assert got['num_examples'] == 3
  single = metrics.generative_metrics(['a b'], ['a b'])
  assert single['exact_match'] == single['token_f1'] == single['rouge_l'] == 1.0


@pytest.mark.parametrize('preds, refs', [
    (['a'], ['a', 'b']),
    ([], []),
    (['a'], [[]]),
    (['a'], [[1]]),
    ('a', ['a']),
    (['a'], 'a'),
])
def test_generative_metrics_errors(preds, refs):
  with pytest.raises(ValueError):
    metrics.generative_metrics(preds, refs)


def test_perplexity_handles_no_tokens():
  assert math.isclose(float(metrics.perplexity_from_sums(np.zeros(2),
                                                         np.zeros(2))), 1.0)
