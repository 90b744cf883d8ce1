"""Evaluation metrics: array metrics (jittable) and text metrics (host-side).

Array metrics take per-example (or per-token) values and an optional 0/1 mask
and work on NumPy or JAX arrays, inside or outside ``jax.jit``:

* :func:`masked_mean`, :func:`mean_loss`, :func:`accuracy`;
* :func:`perplexity` (``exp`` of the weighted mean NLL) and
  :func:`perplexity_from_sums` (from per-example ``nll_sum`` / ``num_tokens``,
  as :func:`fedjax_fm.models.causal_lm_task` reports them).

Text metrics compare generated strings with references, in plain Python:

* :func:`exact_match` and :func:`token_f1`, SQuAD-style (answers normalised by
  :func:`normalize_answer`: lowercase, no punctuation, no articles, single
  spaces; F1 over bags of tokens);
* :func:`rouge_l`, the ROUGE-L F-measure (longest common subsequence of
  tokens), tokenised exactly as the ``rouge_score`` package does;
* :func:`generative_metrics`: means over examples of the above, each the max
  over an example's references.
"""

from __future__ import annotations

import collections
import functools
import re
import string
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

__all__ = [
    'RougeScore',
    'accuracy',
    'exact_match',
    'generative_metrics',
    'lcs_length',
    'masked_mean',
    'mean_loss',
    'normalize_answer',
    'perplexity',
    'perplexity_from_sums',
    'rouge_l',
    'rouge_l_score',
    'rouge_tokenize',
    'token_f1',
]

# ---------------------------------------------------------------- arrays


def _as_float(x: Any) -> jnp.ndarray:
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(jnp.float32)
  return x


def masked_mean(values: Any, mask: Any = None) -> jnp.ndarray:
  """Mean of ``values`` over the entries where ``mask`` is non-zero.

  Args:
    values: array of any shape.
    mask: optional array of the same shape (or broadcastable to it) of 0/1
      flags or non-negative weights; ``None`` weighs every entry 1.

  Returns:
    A scalar: ``sum(values * mask) / max(sum(mask), 1)`` with the mask, else
    the plain mean (0 for an empty array). Masked-out entries never
    contribute, even when they are NaN or infinite.

  Raises:
    ValueError: if ``mask`` does not broadcast to the shape of ``values``.
  """
  values = _as_float(values)
  if mask is None:
    mask = jnp.ones(values.shape, values.dtype)
  mask = _as_float(mask)
  try:
    mask = jnp.broadcast_to(mask, values.shape).astype(values.dtype)
  except ValueError as e:
    raise ValueError(
        f'`mask` of shape {mask.shape} does not broadcast to the values shape '
        f'{values.shape}.') from e
  total = jnp.sum(jnp.where(mask != 0, values * mask, 0))
  return total / jnp.maximum(jnp.sum(mask), 1)


def mean_loss(losses: Any, mask: Any = None) -> jnp.ndarray:
  """Mean per-example loss over the real examples (see :func:`masked_mean`)."""
  return masked_mean(losses, mask)


def accuracy(predictions: Any, labels: Any, mask: Any = None) -> jnp.ndarray:
  """Fraction of correct predictions over the real examples.

  Args:
    predictions: either logits ``[..., K]`` (one more axis than ``labels``;
      the prediction is their argmax) or predicted labels shaped as
      ``labels``.
    labels: integer labels ``[...]``.
    mask: optional 0/1 mask shaped as ``labels``.

  Returns:
    A scalar in ``[0, 1]``.

  Raises:
    ValueError: if the shapes of ``predictions`` and ``labels`` do not match.
  """
  predictions = jnp.asarray(predictions)
  labels = jnp.asarray(labels)
  if predictions.ndim == labels.ndim + 1:
    if predictions.shape[:-1] != labels.shape:
      raise ValueError(
          f'Logits of shape {predictions.shape} do not match labels of shape '
          f'{labels.shape}.')
    predictions = jnp.argmax(predictions, axis=-1)
  elif predictions.shape != labels.shape:
    raise ValueError(
        f'`predictions` must be logits [..., K] or labels shaped as `labels`; '
        f'got {predictions.shape} and labels {labels.shape}.')
  correct = (predictions == labels).astype(jnp.float32)
  return masked_mean(correct, mask)


def perplexity(nll: Any, weights: Any = None) -> jnp.ndarray:
  """``exp`` of the weighted mean negative log-likelihood.

  With per-token NLLs ``[B, T]`` and the token mask as ``weights`` this is the
  token-weighted perplexity; with per-example mean NLLs ``[B]`` and the
  per-example token counts as ``weights`` it is the same number.

  Args:
    nll: negative log-likelihoods (natural log).
    weights: optional non-negative weights broadcastable to ``nll``.

  Returns:
    A scalar ``exp(sum(w * nll) / max(sum(w), 1))`` (1 when no weight).
  """
  return jnp.exp(masked_mean(nll, weights))


def perplexity_from_sums(nll_sum: Any, num_tokens: Any) -> jnp.ndarray:
  """Token-weighted perplexity from per-example NLL sums and token counts.

  Args:
    nll_sum: per-example (or per-client) sums of token NLLs.
    num_tokens: matching token counts.

  Returns:
    ``exp(sum(nll_sum) / max(sum(num_tokens), 1))``.

  Raises:
    ValueError: if the shapes differ.
  """
  nll_sum = _as_float(nll_sum)
  num_tokens = _as_float(num_tokens)
  if nll_sum.shape != num_tokens.shape:
    raise ValueError(
        f'`nll_sum` {nll_sum.shape} and `num_tokens` {num_tokens.shape} must '
        'have the same shape.')
  return jnp.exp(jnp.sum(nll_sum) / jnp.maximum(jnp.sum(num_tokens), 1))


# ------------------------------------------------------------- SQuAD-style

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES_RE = re.compile(r'\b(a|an|the)\b', re.UNICODE)


def normalize_answer(text: str) -> str:
  """SQuAD answer normalisation.

  Lowercases, removes ASCII punctuation, removes the articles ``a``, ``an``,
  ``the`` and collapses whitespace, in that order (as the official SQuAD
  evaluation script).

  Args:
    text: a string.

  Returns:
    The normalised string.
  """
  _check_str(text, 'text')
  text = text.lower()
  text = ''.join(ch for ch in text if ch not in _PUNCTUATION)
  text = _ARTICLES_RE.sub(' ', text)
  return ' '.join(text.split())


def _check_str(value: Any, name: str) -> None:
  if not isinstance(value, str):
    raise ValueError(f'`{name}` must be a str, got {type(value).__name__}.')


def exact_match(prediction: str, reference: str) -> float:
  """1.0 if the normalised prediction equals the normalised reference."""
  _check_str(prediction, 'prediction')
  _check_str(reference, 'reference')
  return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
  """SQuAD bag-of-tokens F1 between normalised strings.

  Tokens are the whitespace-separated words of :func:`normalize_answer`;
  shared tokens count with multiplicity (``min`` of the two counts). When
  either side has no token the score is 1.0 if both are empty, else 0.0
  (SQuAD v2 convention).

  Args:
    prediction: predicted text.
    reference: reference text.

  Returns:
    F1 in ``[0, 1]``.
  """
  _check_str(prediction, 'prediction')
  _check_str(reference, 'reference')
  pred = normalize_answer(prediction).split()
  ref = normalize_answer(reference).split()
  if not pred or not ref:
    return float(pred == ref)
  common = collections.Counter(pred) & collections.Counter(ref)
  num_same = sum(common.values())
  if num_same == 0:
    return 0.0
  precision = num_same / len(pred)
  recall = num_same / len(ref)
  return 2 * precision * recall / (precision + recall)


# ----------------------------------------------------------------- ROUGE-L

_NON_ALNUM_RE = re.compile(r'[^a-z0-9]+')
_VALID_TOKEN_RE = re.compile(r'^[a-z0-9]+$')


class RougeScore(NamedTuple):
  """Precision, recall and F-measure of a ROUGE comparison."""

  precision: float
  recall: float
  fmeasure: float


@functools.lru_cache(maxsize=1)
def _porter_stemmer():
  try:
    from rouge_score import tokenizers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ValueError(
        '`use_stemmer=True` needs the `rouge_score` package (pip install '
        'rouge-score) for its Porter stemmer.') from e
  # The same stemmer object (and settings) rouge_score's tokenizer uses.
  return tokenizers.DefaultTokenizer(use_stemmer=True)._stemmer  # pylint: disable=protected-access


def rouge_tokenize(text: str, use_stemmer: bool = False) -> list[str]:
  """Tokenises like ``rouge_score``'s default tokenizer.

  Lowercases, replaces every run of characters outside ``[a-z0-9]`` by a
  space, splits on whitespace and, with ``use_stemmer``, Porter-stems the
  tokens longer than 3 characters.

  Args:
    text: a string.
    use_stemmer: whether to stem (requires the ``rouge_score`` package).

  Returns:
    The list of tokens.
  """
  _check_str(text, 'text')
  tokens = _NON_ALNUM_RE.sub(' ', text.lower()).split()
  if use_stemmer:
    stemmer = _porter_stemmer()
    tokens = [stemmer.stem(t) if len(t) > 3 else t for t in tokens]
  return [t for t in tokens if _VALID_TOKEN_RE.match(t)]


def lcs_length(a: Sequence[Any], b: Sequence[Any]) -> int:
  """Length of the longest common subsequence of two sequences.

  Dynamic programming with one row, ``O(len(a) * len(b))`` time and
  ``O(min(len(a), len(b)))`` memory.

  Args:
    a: a sequence of hashable items.
    b: another sequence.

  Returns:
    The LCS length.
  """
  if len(b) > len(a):
    a, b = b, a
  prev = [0] * (len(b) + 1)
  for x in a:
    cur = [0]
    for j, y in enumerate(b):
      cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
    prev = cur
  return prev[-1]


def rouge_l_score(prediction: str, reference: str,
                  use_stemmer: bool = False) -> RougeScore:
  """ROUGE-L precision, recall and F-measure of a prediction.

  Args:
    prediction: generated text.
    reference: reference text.
    use_stemmer: Porter-stem tokens (see :func:`rouge_tokenize`).

  Returns:
    A :class:`RougeScore`; all zero when either side has no token. Matches
    ``rouge_score.rouge_scorer.RougeScorer(['rougeL']).score(reference,
    prediction)['rougeL']``.
  """
  _check_str(prediction, 'prediction')
  _check_str(reference, 'reference')
  pred = rouge_tokenize(prediction, use_stemmer)
  ref = rouge_tokenize(reference, use_stemmer)
  if not pred or not ref:
    return RougeScore(0.0, 0.0, 0.0)
  lcs = lcs_length(ref, pred)
  precision = lcs / len(pred)
  recall = lcs / len(ref)
  if precision + recall > 0:
    fmeasure = 2 * precision * recall / (precision + recall)
  else:
    fmeasure = 0.0
  return RougeScore(precision, recall, fmeasure)


def rouge_l(prediction: str, reference: str, use_stemmer: bool = False) -> float:
  """ROUGE-L F-measure (see :func:`rouge_l_score`)."""
  return rouge_l_score(prediction, reference, use_stemmer).fmeasure


# -------------------------------------------------------------- generation


def _reference_lists(references: Sequence[Any], n: int) -> list[list[str]]:
  if isinstance(references, str) or not isinstance(references, Sequence):
    raise ValueError('`references` must be a list of str or a list of lists '
                     'of str.')
  if len(references) != n:
    raise ValueError(
        f'Got {n} predictions but {len(references)} references; each '
        'prediction needs its reference(s).')
  out = []
  for i, ref in enumerate(references):
    refs = [ref] if isinstance(ref, str) else ref
    if isinstance(refs, str) or not isinstance(refs, Sequence) or not refs:
      raise ValueError(
          f'`references[{i}]` must be a str or a non-empty list of str, got '
          f'{ref!r}.')
    for r in refs:
      if not isinstance(r, str):
        raise ValueError(
            f'`references[{i}]` holds a non-str item {r!r}.')
    out.append(list(refs))
  return out


def generative_metrics(
    predictions: Sequence[str],
    references: Sequence[str] | Sequence[Sequence[str]],
    *,
    use_stemmer: bool = False,
) -> dict[str, float]:
  """Mean exact match, token F1 and ROUGE-L of generated texts.

  Each example scores the max over its references, separately per metric.

  Args:
    predictions: ``N >= 1`` generated strings.
    references: ``N`` reference strings, or ``N`` non-empty lists of
      reference strings.
    use_stemmer: Porter-stem the ROUGE-L tokens.

  Returns:
    ``{'exact_match', 'token_f1', 'rouge_l'}`` (means in ``[0, 1]``) and
    ``'num_examples'``.

  Raises:
    ValueError: on empty input, mismatched lengths or non-str items.
  """
  if isinstance(predictions, str) or not isinstance(predictions, Sequence):
    raise ValueError('`predictions` must be a list of str.')
  if not predictions:
    raise ValueError('`predictions` must hold at least one string.')
  for i, p in enumerate(predictions):
    if not isinstance(p, str):
      raise ValueError(f'`predictions[{i}]` must be a str, got {p!r}.')
  refs = _reference_lists(references, len(predictions))
  em, f1, rl = [], [], []
  for pred, rs in zip(predictions, refs):
    em.append(max(exact_match(pred, r) for r in rs))
    f1.append(max(token_f1(pred, r) for r in rs))
    rl.append(max(rouge_l(pred, r, use_stemmer) for r in rs))
  return {
      'exact_match': float(np.mean(em)),
      'token_f1': float(np.mean(f1)),
      'rouge_l': float(np.mean(rl)),
      'num_examples': len(predictions),
  }
