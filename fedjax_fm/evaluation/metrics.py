"""Evaluation metrics: array metrics (jittable) and text metrics (host-side).

Array metrics take per-example (or per-token) values and an optional 0/1 mask
and work on NumPy or JAX arrays, inside or outside ``jax.jit``:

* :func:`masked_mean`, :func:`mean_loss`, :func:`accuracy`;
* :func:`perplexity` (``exp`` of the weighted mean NLL) and
  :func:`perplexity_from_sums` (from per-example ``nll_sum`` / ``num_tokens``,
  as :func:`fedjax_fm.models.causal_lm_task` reports them).

Text metrics compare generated strings with references, in plain Python:

* :func:`exact_match`, with its normalisation named: ``'squad'`` (the
  default; :func:`normalize_answer`: lowercase, no punctuation, no articles
  ``a``/``an``/``the``, single spaces), ``'strip'`` (leading and trailing
  whitespace only) or ``'none'`` (the strings as they are);
* :func:`token_f1`, SQuAD-style (F1 over bags of normalised tokens);
* :func:`rouge_l`, the ROUGE-L F-measure (longest common subsequence of
  tokens), tokenised exactly as the ``rouge_score`` package does;
* :func:`char_error_rate` and :func:`token_error_rate` (CER, TER): the
  Levenshtein distance (:func:`edit_distance`) over characters, resp.
  whitespace-separated tokens, divided by the reference length; over a corpus
  the total edits divided by the total reference length;
* :func:`generative_metrics`: means over examples of exact match, token F1 and
  ROUGE-L (each the max over an example's references) and the corpus CER and
  TER (each example scored against its closest reference).
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
    'EM_NORMALIZATIONS',
    'GENERATIVE_SCORES',
    'RougeScore',
    'accuracy',
    'aggregate_generative',
    'char_error_rate',
    'edit_distance',
    'error_counts',
    'exact_match',
    'generative_metrics',
    'generative_scores',
    'lcs_length',
    'masked_mean',
    'mean_loss',
    'normalize_answer',
    'normalize_text',
    'perplexity',
    'perplexity_from_sums',
    'rouge_l',
    'rouge_l_score',
    'rouge_tokenize',
    'token_error_rate',
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


# How exact match compares two strings (``config.eval.em_normalize``).
EM_NORMALIZATIONS = ('squad', 'strip', 'none')


def normalize_text(text: str, normalize: str) -> str:
  """``text`` under one of :data:`EM_NORMALIZATIONS`.

  Args:
    text: a string.
    normalize: ``'squad'`` (:func:`normalize_answer`), ``'strip'`` (leading
      and trailing whitespace removed, nothing else) or ``'none'``.

  Returns:
    The normalised string.

  Raises:
    ValueError: on another ``normalize`` or a non-str ``text``.
  """
  _check_str(text, 'text')
  if normalize == 'squad':
    return normalize_answer(text)
  if normalize == 'strip':
    return text.strip()
  if normalize == 'none':
    return text
  raise ValueError(
      f'`normalize` must be one of {EM_NORMALIZATIONS}, got {normalize!r}.')


def exact_match(prediction: str, reference: str, normalize: str = 'squad') -> float:
  """1.0 if the prediction equals the reference after normalisation, else 0.0.

  Args:
    prediction: predicted text.
    reference: reference text.
    normalize: how both are normalised first (:func:`normalize_text`):
      ``'squad'`` (default: lowercase, no punctuation, no articles ``a``,
      ``an``, ``the``, single spaces), ``'strip'`` or ``'none'``.

  Returns:
    1.0 or 0.0.

  Raises:
    ValueError: on non-str inputs or an unknown ``normalize``.
  """
  _check_str(prediction, 'prediction')
  _check_str(reference, 'reference')
  return float(normalize_text(prediction, normalize) ==
               normalize_text(reference, normalize))


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


# --------------------------------------------------------- error rates

ERROR_UNITS = ('char', 'token')


def _symbols(seq: Sequence[Any]) -> np.ndarray:
  """``seq`` as int64 ids, equal ids for equal items (any hashable items)."""
  if isinstance(seq, str):
    return np.frombuffer(seq.encode('utf-32-le'), np.uint32).astype(np.int64)
  ids: dict[Any, int] = {}
  return np.asarray([ids.setdefault(x, len(ids)) for x in seq], np.int64)


def edit_distance(a: Sequence[Any], b: Sequence[Any]) -> int:
  """Levenshtein distance: the fewest insertions, deletions and substitutions.

  Each edit costs 1. Dynamic programming one row at a time over the shorter
  sequence, each row vectorised in NumPy: with ``t[j]`` the row before
  insertions (deletion or substitution), ``row[j] = min_{k<=j} t[k] + j - k``,
  a running minimum of ``t[k] - k``. ``O(len(a) * len(b))`` work, memory
  ``O(max(len(a), len(b)))``.

  Args:
    a: a string or a sequence of hashable items (e.g. tokens).
    b: another.

  Returns:
    The edit distance, an int.
  """
  if isinstance(a, str) != isinstance(b, str):
    a, b = list(a), list(b)
  if isinstance(a, str):
    x, y = _symbols(a), _symbols(b)
  else:
    both = _symbols(list(a) + list(b))
    x, y = both[:len(a)], both[len(a):]
  if x.size < y.size:
    x, y = y, x   # rows over the shorter one, vectorised along the longer
  if y.size == 0:
    return int(x.size)
  cols = np.arange(x.size + 1, dtype=np.int64)
  row = cols.copy()
  for i, sym in enumerate(y, start=1):
    t = np.empty_like(row)
    t[0] = i
    # deletion (row[j] + 1) or substitution/match (row[j-1] + cost)
    t[1:] = np.minimum(row[1:] + 1, row[:-1] + (x != sym))
    row = np.minimum.accumulate(t - cols) + cols   # insertions
  return int(row[-1])


def _units(text: str, unit: str) -> Sequence[Any]:
  if unit == 'char':
    return text
  if unit == 'token':
    return text.split()
  raise ValueError(f'`unit` must be one of {ERROR_UNITS}, got {unit!r}.')


def error_counts(prediction: str, reference: str, unit: str = 'char') -> tuple[int, int]:
  """``(edits, reference length)`` of a prediction, in characters or tokens.

  Args:
    prediction: predicted text.
    reference: reference text.
    unit: ``'char'`` (every character, spaces included) or ``'token'``
      (whitespace-separated tokens, ``str.split()``).

  Returns:
    The Levenshtein distance and the reference's length in that unit.
  """
  _check_str(prediction, 'prediction')
  _check_str(reference, 'reference')
  pred, ref = _units(prediction, unit), _units(reference, unit)
  return edit_distance(pred, ref), len(ref)


def _error_rate(prediction: Any, reference: Any, unit: str) -> float:
  if isinstance(prediction, str) and isinstance(reference, str):
    edits, length = error_counts(prediction, reference, unit)
    return edits / max(length, 1)
  if isinstance(prediction, str) or isinstance(reference, str):
    raise ValueError('`prediction` and `reference` must both be str or both be lists of '
                     'str.')
  if len(prediction) != len(reference):
    raise ValueError(
        f'Got {len(prediction)} predictions but {len(reference)} references.')
  edits = length = 0
  for p, r in zip(prediction, reference):
    e, n = error_counts(p, r, unit)
    edits += e
    length += n
  return edits / max(length, 1)


def char_error_rate(prediction: str | Sequence[str],
                    reference: str | Sequence[str]) -> float:
  """Character error rate (CER): character edits per reference character.

  Args:
    prediction: a predicted string, or a list of them (a corpus).
    reference: the reference string, or the list of references.

  Returns:
    For two strings ``edit_distance(prediction, reference) /
    max(len(reference), 1)``; for two lists the corpus rate, total edits /
    max(total reference characters, 1). Can exceed 1 (insertions).

  Raises:
    ValueError: on mixed or mismatched inputs, or non-str items.
  """
  return _error_rate(prediction, reference, 'char')


def token_error_rate(prediction: str | Sequence[str],
                     reference: str | Sequence[str]) -> float:
  """Token error rate (TER, word error rate over whitespace tokens).

  As :func:`char_error_rate`, over the whitespace-separated tokens of the
  texts (``str.split()``; no other normalisation).

  Args:
    prediction: a predicted string, or a list of them.
    reference: the reference string, or the list of references.

  Returns:
    Token edits per reference token (corpus-level for lists).
  """
  return _error_rate(prediction, reference, 'token')


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


GENERATIVE_SCORES = ('exact_match', 'token_f1', 'rouge_l', 'char_edits', 'char_length',
                     'token_edits', 'token_length')


def generative_scores(
    predictions: Sequence[str],
    references: Sequence[str] | Sequence[Sequence[str]],
    *,
    use_stemmer: bool = False,
    em_normalize: str = 'squad',
) -> dict[str, np.ndarray]:
  """Per-example scores of generated texts, to aggregate over any subset.

  Exact match, token F1 and ROUGE-L are each the max over an example's
  references; the edit counts and lengths of CER and TER are those of the
  reference of the lowest rate (``edits / max(length, 1)``, the first on
  ties).

  Args:
    predictions: ``N >= 1`` generated strings.
    references: ``N`` reference strings, or ``N`` non-empty lists of
      reference strings.
    use_stemmer: Porter-stem the ROUGE-L tokens.
    em_normalize: the normalisation of exact match (:data:`EM_NORMALIZATIONS`).

  Returns:
    ``{name: [N]}`` for every name of :data:`GENERATIVE_SCORES` (float64
    scores, int64 counts); :func:`aggregate_generative` turns them into
    metrics.

  Raises:
    ValueError: on empty input, mismatched lengths, non-str items or an
      unknown ``em_normalize``.
  """
  if em_normalize not in EM_NORMALIZATIONS:
    raise ValueError(f'`em_normalize` must be one of {EM_NORMALIZATIONS}, got '
                     f'{em_normalize!r}.')
  if isinstance(predictions, str) or not isinstance(predictions, Sequence):
    raise ValueError('`predictions` must be a list of str.')
  if not predictions:
    raise ValueError('`predictions` must hold at least one string.')
  for i, p in enumerate(predictions):
    if not isinstance(p, str):
      raise ValueError(f'`predictions[{i}]` must be a str, got {p!r}.')
  refs = _reference_lists(references, len(predictions))
  out: dict[str, list] = {name: [] for name in GENERATIVE_SCORES}
  for pred, rs in zip(predictions, refs):
    out['exact_match'].append(max(exact_match(pred, r, em_normalize) for r in rs))
    out['token_f1'].append(max(token_f1(pred, r) for r in rs))
    out['rouge_l'].append(max(rouge_l(pred, r, use_stemmer) for r in rs))
    for unit in ERROR_UNITS:
      counts = [error_counts(pred, r, unit) for r in rs]
      edits, length = min(counts, key=lambda c: c[0] / max(c[1], 1))
      out[f'{unit}_edits'].append(edits)
      out[f'{unit}_length'].append(length)
  return {name: np.asarray(v, np.int64 if name.endswith(('_edits', '_length'))
                           else np.float64) for name, v in out.items()}


def aggregate_generative(scores: dict[str, Any], select: Any = None) -> dict[str, float]:
  """Metrics of (a subset of) :func:`generative_scores`.

  Args:
    scores: ``{name: [N]}`` from :func:`generative_scores`.
    select: optional bool mask or index array of the examples to count
      (default all).

  Returns:
    ``{'exact_match', 'token_f1', 'rouge_l'}`` (means over the examples),
    ``{'cer', 'ter'}`` (total edits / max(total reference length, 1)) and
    ``'num_examples'``; the means are NaN when no example is selected.
  """
  arrays = {k: np.asarray(v) for k, v in scores.items()}
  if select is not None:
    arrays = {k: v[select] for k, v in arrays.items()}
  n = len(arrays['exact_match'])
  out = {k: float(np.mean(arrays[k])) if n else float('nan')
         for k in ('exact_match', 'token_f1', 'rouge_l')}
  for unit, name in (('char', 'cer'), ('token', 'ter')):
    edits, length = int(arrays[f'{unit}_edits'].sum()), int(arrays[f'{unit}_length'].sum())
    out[name] = edits / max(length, 1) if n else float('nan')
  out['num_examples'] = n
  return out


def generative_metrics(
    predictions: Sequence[str],
    references: Sequence[str] | Sequence[Sequence[str]],
    *,
    use_stemmer: bool = False,
    em_normalize: str = 'squad',
) -> dict[str, float]:
  """Exact match, token F1, ROUGE-L, CER and TER of generated texts.

  Exact match, token F1 and ROUGE-L are means over examples of each example's
  max over its references. CER and TER are corpus rates (total edits / total
  reference length), each example counted against its reference of the
  lowest rate (the first on ties).

  Args:
    predictions: ``N >= 1`` generated strings.
    references: ``N`` reference strings, or ``N`` non-empty lists of
      reference strings.
    use_stemmer: Porter-stem the ROUGE-L tokens.
    em_normalize: the normalisation of exact match (:data:`EM_NORMALIZATIONS`;
      ``'squad'`` by default).

  Returns:
    ``{'exact_match', 'token_f1', 'rouge_l'}`` (means in ``[0, 1]``),
    ``{'cer', 'ter'}`` (``>= 0``) and ``'num_examples'``.

  Raises:
    ValueError: on empty input, mismatched lengths, non-str items or an
      unknown ``em_normalize``.
  """
  return aggregate_generative(generative_scores(
      predictions, references, use_stemmer=use_stemmer, em_normalize=em_normalize))
