"""Tokenizers producing fixed-length padded numpy batches.

All tokenizers follow the small :class:`Tokenizer` protocol:
``encode(texts, max_len)`` returns ``{'input_ids', 'attention_mask'}`` int32
arrays of shape ``[N, max_len]`` (right-padded with ``pad_id``, truncated to
``max_len``), ``decode(ids)`` returns a string, and ``vocab_size`` /
``pad_id`` describe the vocabulary.

:class:`SentencePieceTokenizer` and :class:`CharTokenizer` (one token per
character) are trained on texts; :func:`sentencepiece_min_vocab` says, before
training, the smallest vocabulary SentencePiece accepts for them.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import pathlib
from collections.abc import Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

PathLike = str | os.PathLike[str]

# SentencePiece's trainer: sentences longer than this many bytes are skipped
# (its default ``max_sentence_length``), and the special pieces of
# `SentencePieceTokenizer.train` (pad, unk, bos, eos).
_SPM_MAX_SENTENCE_BYTES = 4192
_SPM_SPECIAL_PIECES = 4
_SPM_BYTE_PIECES = 256
# Trainer options that change the count of `sentencepiece_min_vocab` (it then
# leaves the check to the trainer).
_SPM_COUNT_UNKNOWN = (
    'user_defined_symbols', 'control_symbols', 'normalization_rule_name',
    'normalization_rule_tsv', 'add_dummy_prefix', 'remove_extra_whitespaces',
    'max_sentence_length', 'input_sentence_size', 'use_all_vocab',
    'required_chars', 'byte_fallback_only')
# The character_coverage SentencePiece's trainer accepts.
SPM_COVERAGE_RANGE = (0.98, 1.0)


@runtime_checkable
class Tokenizer(Protocol):
  """Protocol of text tokenizers used by fedjax_fm."""

  @property
  def vocab_size(self) -> int:
    """Number of token ids."""

  @property
  def pad_id(self) -> int:
    """Id used to pad sequences."""

  def encode(self, texts: Sequence[str], max_len: int) -> dict[str, np.ndarray]:
    """Encodes texts to ``input_ids`` / ``attention_mask`` int32 [N, L]."""

  def decode(self, ids: Sequence[int]) -> str:
    """Decodes one sequence of ids (padding ignored) to text."""


def _check_texts(texts: Any) -> list[str]:
  if isinstance(texts, (str, bytes)):
    raise ValueError(
        '`texts` must be a sequence of str, got a single string; wrap it in a '
        'list.')
  texts = list(texts)
  bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
  if bad:
    raise ValueError(f'`texts` must hold str only, got {sorted(set(bad))}.')
  return texts


def _check_max_len(max_len: Any) -> int:
  if isinstance(max_len, bool) or not isinstance(
      max_len, (int, np.integer)) or max_len < 1:
    raise ValueError(f'`max_len` must be an int >= 1, got {max_len!r}.')
  return int(max_len)


def pad_sequences(
    sequences: Sequence[Sequence[int]], max_len: int, pad_id: int
) -> dict[str, np.ndarray]:
  """Right-pads/truncates id sequences into fixed-length int32 arrays.

  Args:
    sequences: Token id sequences.
    max_len: Output length ``L >= 1``; longer sequences are truncated.
    pad_id: Id written to padding positions.

  Returns:
    ``{'input_ids': int32 [N, L], 'attention_mask': int32 [N, L]}``.
  """
  max_len = _check_max_len(max_len)
  lengths = np.asarray([min(len(s), max_len) for s in sequences],
                       dtype=np.int64)
  flat = [t for s, n in zip(sequences, lengths) for t in s[:n]]
  mask = np.arange(max_len)[None, :] < lengths[:, None]
  ids = np.full((len(sequences), max_len), pad_id, dtype=np.int32)
  ids[mask] = np.asarray(flat, dtype=np.int32)
  return {'input_ids': ids, 'attention_mask': mask.astype(np.int32)}


def _ids_list(ids: Any, pad_id: int) -> list[int]:
  arr = np.asarray(ids).reshape(-1).astype(np.int64)
  return arr[arr != pad_id].tolist()


class SentencePieceTokenizer:
  """SentencePiece tokenizer with optional BOS/EOS tokens.

  When ``add_bos`` / ``add_eos`` are set, truncation removes content tokens
  so that the BOS and EOS tokens are always kept.
  """

  def __init__(self, processor: Any, *, add_bos: bool = False,
               add_eos: bool = False, pad_id: int | None = None):
    """Wraps a loaded ``sentencepiece.SentencePieceProcessor``.

    Args:
      processor: The loaded processor.
      add_bos: Prepend the BOS id to every sequence.
      add_eos: Append the EOS id to every sequence.
      pad_id: Padding id; defaults to the model's pad id, or 0 if the model
        has none.
    """
    self._sp = processor
    if add_bos and processor.bos_id() < 0:
      raise ValueError('`add_bos=True` but the model has no BOS token.')
    if add_eos and processor.eos_id() < 0:
      raise ValueError('`add_eos=True` but the model has no EOS token.')
    self.add_bos = bool(add_bos)
    self.add_eos = bool(add_eos)
    if pad_id is None:
      pad_id = processor.pad_id() if processor.pad_id() >= 0 else 0
    self._pad_id = int(pad_id)

  @classmethod
  def load(cls, model_file: PathLike, *, add_bos: bool = False,
           add_eos: bool = False,
           pad_id: int | None = None) -> SentencePieceTokenizer:
    """Loads a ``.model`` file.

    Args:
      model_file: Path of the SentencePiece model.
      add_bos: Prepend BOS.
      add_eos: Append EOS.
      pad_id: Padding id override.

    Returns:
      The tokenizer.
    """
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top

    model_file = pathlib.Path(model_file)
    if not model_file.is_file():
      raise FileNotFoundError(
          f'No SentencePiece model file: {str(model_file)!r}.')
    processor = spm.SentencePieceProcessor(model_file=str(model_file))
    return cls(processor, add_bos=add_bos, add_eos=add_eos, pad_id=pad_id)

  @classmethod
  def train(
      cls,
      texts: Iterable[str],
      vocab_size: int,
      model_path_prefix: PathLike,
      *,
      model_type: str = 'unigram',
      character_coverage: float = 1.0,
      add_bos: bool = False,
      add_eos: bool = False,
      **trainer_kwargs: Any,
  ) -> SentencePieceTokenizer:
    """Trains a model from in-memory texts and loads it.

    Special ids: pad 0, unk 1, bos 2, eos 3. Writes
    ``<model_path_prefix>.model`` and ``<model_path_prefix>.vocab``.

    Args:
      texts: Training sentences.
      vocab_size: Target vocabulary size (treated as an upper bound when the
        corpus is too small, via ``hard_vocab_limit=False``).
      model_path_prefix: Output path prefix.
      model_type: ``'unigram'`` or ``'bpe'``.
      character_coverage: Fraction of characters covered by the model.
      add_bos: Prepend BOS when encoding.
      add_eos: Append EOS when encoding.
      **trainer_kwargs: Extra ``SentencePieceTrainer.train`` options.

    Returns:
      The trained tokenizer.

    Raises:
      ValueError: On bad arguments, or (before training) when ``vocab_size``
        is below what the texts require (:func:`sentencepiece_min_vocab`).
    """
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top

    lo, hi = SPM_COVERAGE_RANGE
    if isinstance(character_coverage, bool) or not isinstance(
        character_coverage, (int, float)) or not lo <= character_coverage <= hi:
      raise ValueError(
          f'`character_coverage` must be in [{lo}, {hi}] (SentencePiece\'s '
          f'range), got {character_coverage!r}.')
    if model_type not in ('unigram', 'bpe'):
      raise ValueError(
          f"`model_type` must be 'unigram' or 'bpe', got {model_type!r}.")
    if isinstance(vocab_size, bool) or not isinstance(
        vocab_size, (int, np.integer)) or vocab_size < 5:
      raise ValueError(f'`vocab_size` must be an int >= 5, got {vocab_size!r}.')
    texts = [t for t in _check_texts(texts) if t.strip()]
    if not texts:
      raise ValueError('`texts` holds no non-empty text to train on.')
    prefix = pathlib.Path(model_path_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    options = dict(
        model_prefix=str(prefix),
        vocab_size=int(vocab_size),
        model_type=model_type,
        character_coverage=character_coverage,
        pad_id=0, unk_id=1, bos_id=2, eos_id=3,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    options.update(trainer_kwargs)
    if not any(k in options for k in _SPM_COUNT_UNKNOWN):
      need = sentencepiece_min_vocab(
          texts, character_coverage=character_coverage,
          byte_fallback=bool(options.get('byte_fallback', False)),
          special_pieces=sum(options[k] >= 0 for k in
                             ('pad_id', 'unk_id', 'bos_id', 'eos_id')))
      if vocab_size < need.min_vocab_size:
        raise ValueError(
            f'`vocab_size`={vocab_size} is smaller than the '
            f'{need.min_vocab_size} pieces SentencePiece requires: '
            f'{need.describe()}. Raise `vocab_size`, lower '
            '`character_coverage` or use a character-level tokenizer.')
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), **options)
    return cls.load(f'{prefix}.model', add_bos=add_bos, add_eos=add_eos)

  @property
  def vocab_size(self) -> int:
    return int(self._sp.get_piece_size())

  @property
  def pad_id(self) -> int:
    return self._pad_id

  @property
  def processor(self) -> Any:
    """The underlying ``SentencePieceProcessor``."""
    return self._sp

  def encode(self, texts: Sequence[str], max_len: int) -> dict[str, np.ndarray]:
    """Encodes texts into padded int32 arrays.

    Args:
      texts: Sequence of strings.
      max_len: Output length ``>= 1`` (and larger than the number of
        BOS/EOS tokens requested).

    Returns:
      ``{'input_ids': int32 [N, max_len], 'attention_mask': int32 [N,
      max_len]}``.
    """
    texts = _check_texts(texts)
    max_len = _check_max_len(max_len)
    num_special = int(self.add_bos) + int(self.add_eos)
    if max_len <= num_special:
      raise ValueError(
          f'`max_len` must exceed the {num_special} BOS/EOS token(s), got '
          f'{max_len}.')
    pieces = self._sp.encode(texts, out_type=int) if texts else []
    bos = [self._sp.bos_id()] if self.add_bos else []
    eos = [self._sp.eos_id()] if self.add_eos else []
    content = max_len - num_special
    seqs = [bos + p[:content] + eos for p in pieces]
    return pad_sequences(seqs, max_len, self._pad_id)

  def decode(self, ids: Sequence[int]) -> str:
    """Decodes one id sequence, ignoring padding and control tokens."""
    return self._sp.decode(_ids_list(ids, self._pad_id))


class HFTokenizer:
  """Wrapper around a Hugging Face ``tokenizers.Tokenizer``.

  Special tokens added by the tokenizer's post-processor (e.g. BERT's
  ``[CLS]`` ... ``[SEP]``) are kept; truncation is done by the tokenizer so
  that they survive it.
  """

  def __init__(self, tokenizer: Any, *, pad_id: int | None = None):
    """Wraps a ``tokenizers.Tokenizer``.

    Args:
      tokenizer: The tokenizer. Its own padding is disabled; this wrapper
        pads to ``max_len``.
      pad_id: Padding id; defaults to the tokenizer's padding config, then
        the id of ``[PAD]`` / ``<pad>``, then 0.
    """
    if pad_id is None:
      padding = tokenizer.padding
      if padding is not None:
        pad_id = padding['pad_id']
      else:
        for token in ('[PAD]', '<pad>', '<|pad|>'):
          pad_id = tokenizer.token_to_id(token)
          if pad_id is not None:
            break
      pad_id = 0 if pad_id is None else pad_id
    self._pad_id = int(pad_id)
    tokenizer.no_padding()
    self._tok = tokenizer

  @classmethod
  def from_file(cls, tokenizer_json_path: PathLike, *,
                pad_id: int | None = None) -> HFTokenizer:
    """Loads a ``tokenizer.json`` file.

    Args:
      tokenizer_json_path: Path of the tokenizer JSON.
      pad_id: Padding id override.

    Returns:
      The tokenizer.
    """
    import tokenizers  # pylint: disable=g-import-not-at-top

    path = pathlib.Path(tokenizer_json_path)
    if not path.is_file():
      raise FileNotFoundError(f'No tokenizer file: {str(path)!r}.')
    return cls(tokenizers.Tokenizer.from_file(str(path)), pad_id=pad_id)

  @classmethod
  def from_pretrained_dir(cls, directory: PathLike, *,
                          pad_id: int | None = None) -> HFTokenizer:
    """Loads ``<directory>/tokenizer.json`` (e.g. a downloaded model dir).

    Args:
      directory: Model directory.
      pad_id: Padding id override.

    Returns:
      The tokenizer.
    """
    path = pathlib.Path(directory) / 'tokenizer.json'
    if not path.is_file():
      raise FileNotFoundError(
          f'No tokenizer.json in directory {str(directory)!r}.')
    return cls.from_file(path, pad_id=pad_id)

  @property
  def vocab_size(self) -> int:
    return int(self._tok.get_vocab_size(with_added_tokens=True))

  @property
  def pad_id(self) -> int:
    return self._pad_id

  @property
  def tokenizer(self) -> Any:
    """The underlying ``tokenizers.Tokenizer``."""
    return self._tok

  def encode(self, texts: Sequence[str], max_len: int) -> dict[str, np.ndarray]:
    """Encodes texts into padded int32 arrays.

    Args:
      texts: Sequence of strings.
      max_len: Output length ``>= 1``.

    Returns:
      ``{'input_ids': int32 [N, max_len], 'attention_mask': int32 [N,
      max_len]}``.
    """
    texts = _check_texts(texts)
    max_len = _check_max_len(max_len)
    self._tok.enable_truncation(max_length=max_len)
    encodings = self._tok.encode_batch(texts) if texts else []
    return pad_sequences([e.ids for e in encodings], max_len, self._pad_id)

  def decode(self, ids: Sequence[int]) -> str:
    """Decodes one id sequence, skipping padding and special tokens."""
    return self._tok.decode(_ids_list(ids, self._pad_id),
                            skip_special_tokens=True)


# ------------------------------------------------------------ vocabulary needs


@dataclasses.dataclass(frozen=True)
class VocabNeed:
  """The smallest vocabulary a SentencePiece model of some texts can have.

  Attributes:
    min_vocab_size: special pieces + required characters (+ 256 byte pieces
      with byte fallback); a smaller ``vocab_size`` fails to train.
    special_pieces: the special pieces (pad, unk, bos, eos).
    distinct_chars: distinct characters of the normalised texts (spaces
      count as one, ``'\u2581'``).
    required_chars: those that ``character_coverage`` keeps (the most
      frequent ones, until the covered fraction reaches it).
    character_coverage: the coverage used.
    byte_fallback: whether the 256 byte pieces are added.
  """
  min_vocab_size: int
  special_pieces: int
  distinct_chars: int
  required_chars: int
  character_coverage: float
  byte_fallback: bool

  def describe(self) -> str:
    """The count in words, e.g. for an error message."""
    parts = [f'{self.special_pieces} special pieces', f'{self.required_chars} '
             f'of the {self.distinct_chars} distinct characters (character_coverage='
             f'{self.character_coverage})']
    if self.byte_fallback:
      parts.append(f'{_SPM_BYTE_PIECES} byte pieces (byte_fallback)')
    return ' + '.join(parts)


def _spm_normalizer(rule_name: str):
  try:
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    return spm.SentencePieceNormalizer(rule_name=rule_name).normalize
  except (ImportError, AttributeError):  # sentencepiece < 0.2: an approximation
    import unicodedata  # pylint: disable=g-import-not-at-top

    def normalize(text: str) -> str:
      words = unicodedata.normalize('NFKC', text).split()
      return ''.join('\u2581' + w for w in words)
    return normalize


def sentencepiece_min_vocab(
    texts: Iterable[str],
    *,
    character_coverage: float = 1.0,
    byte_fallback: bool = False,
    special_pieces: int = _SPM_SPECIAL_PIECES,
) -> VocabNeed:
  """Counts the pieces SentencePiece's trainer requires before its merges.

  Follows the trainer's rule: each text is normalised (NFKC, whitespace runs
  become one ``'\u2581'``, with one in front), texts longer than 4192 bytes
  are skipped, and the characters are taken most frequent first until their
  share of all characters reaches ``character_coverage`` (all of them at
  1.0). The vocabulary must hold those characters, the special pieces (4 in
  :meth:`SentencePieceTokenizer.train`) and, with ``byte_fallback``, 256 byte
  pieces. This is the trainer's rule with its default normalisation
  (``nmt_nfkc``) and no user-defined or control symbols.

  Args:
    texts: the training texts.
    character_coverage: as in :meth:`SentencePieceTokenizer.train`.
    byte_fallback: whether byte pieces are added.
    special_pieces: pad, unk, bos and eos pieces the model has.

  Returns:
    A :class:`VocabNeed`.
  """
  normalize = _spm_normalizer('nmt_nfkc')
  counts: collections.Counter[str] = collections.Counter()
  for text in _check_texts(texts):
    if len(text.encode('utf-8')) <= _SPM_MAX_SENTENCE_BYTES:
      counts.update(normalize(text))
  total = sum(counts.values())
  covered, required = 0, 0
  for _, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
    if character_coverage < 1.0 and covered >= character_coverage * total:
      break
    covered += count
    required += 1
  return VocabNeed(
      min_vocab_size=special_pieces + required
      + (_SPM_BYTE_PIECES if byte_fallback else 0),
      special_pieces=int(special_pieces), distinct_chars=len(counts),
      required_chars=required,
      character_coverage=float(character_coverage),
      byte_fallback=bool(byte_fallback))


# -------------------------------------------------------------- characters


class CharTokenizer:
  """One token per character, the vocabulary read from training texts.

  Ids: pad 0, unk 1, bos 2, eos 3 (as in :meth:`SentencePieceTokenizer.train`),
  then the training texts' distinct characters in sorted order. A character
  outside the vocabulary encodes to unk (and decodes to ``'\ufffd'``). When
  ``add_bos`` / ``add_eos`` are set, truncation removes content tokens so that
  the BOS and EOS tokens are always kept.
  """

  SPECIALS = ('<pad>', '<unk>', '<s>', '</s>')

  def __init__(self, chars: Iterable[str], *, add_bos: bool = False,
               add_eos: bool = False):
    """Builds the tokenizer from its characters.

    Args:
      chars: the distinct single characters of the vocabulary.
      add_bos: Prepend the BOS id to every sequence.
      add_eos: Append the EOS id to every sequence.
    """
    chars = list(chars)
    bad = [c for c in chars if not isinstance(c, str) or len(c) != 1]
    if bad:
      raise ValueError(f'`chars` must be single characters, got {bad[:5]!r}.')
    if len(set(chars)) != len(chars):
      raise ValueError('`chars` holds duplicates.')
    self._chars = tuple(chars)
    offset = len(self.SPECIALS)
    self._ids = {c: i + offset for i, c in enumerate(self._chars)}
    self.add_bos = bool(add_bos)
    self.add_eos = bool(add_eos)

  @classmethod
  def train(cls, texts: Iterable[str], *, add_bos: bool = False,
            add_eos: bool = False, path: PathLike | None = None
            ) -> CharTokenizer:
    """The tokenizer of the distinct characters of ``texts``.

    Args:
      texts: Training texts.
      add_bos: Prepend BOS when encoding.
      add_eos: Append EOS when encoding.
      path: If given, also save the vocabulary there (:meth:`save`).

    Returns:
      The tokenizer.
    """
    chars = set()
    for text in _check_texts(texts):
      chars.update(text)
    if not chars:
      raise ValueError('`texts` holds no character to train on.')
    tok = cls(sorted(chars), add_bos=add_bos, add_eos=add_eos)
    if path is not None:
      tok.save(path)
    return tok

  def save(self, path: PathLike) -> None:
    """Writes the vocabulary as JSON (``{'kind': 'char', 'chars': [...]}``)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({'kind': 'char', 'chars': list(self._chars)},
                               ensure_ascii=False), encoding='utf-8')

  @classmethod
  def load(cls, path: PathLike, *, add_bos: bool = False,
           add_eos: bool = False) -> CharTokenizer:
    """Reads a vocabulary written by :meth:`save`.

    Args:
      path: The JSON file.
      add_bos: Prepend BOS.
      add_eos: Append EOS.

    Returns:
      The tokenizer.
    """
    path = pathlib.Path(path)
    if not path.is_file():
      raise FileNotFoundError(f'No character vocabulary file: {str(path)!r}.')
    try:
      spec = json.loads(path.read_text(encoding='utf-8'))
    except json.JSONDecodeError as e:
      raise ValueError(f'{str(path)!r}: malformed JSON ({e.msg}).') from e
    if not isinstance(spec, dict) or spec.get('kind') != 'char' or (
        not isinstance(spec.get('chars'), list)):
      raise ValueError(
          f"{str(path)!r} is not a character vocabulary ({{'kind': 'char', "
          "'chars': [...]}).")
    return cls(spec['chars'], add_bos=add_bos, add_eos=add_eos)

  @property
  def chars(self) -> tuple[str, ...]:
    """The characters of the vocabulary, in id order."""
    return self._chars

  @property
  def vocab_size(self) -> int:
    return len(self.SPECIALS) + len(self._chars)

  @property
  def pad_id(self) -> int:
    return 0

  @property
  def unk_id(self) -> int:
    return 1

  @property
  def bos_id(self) -> int:
    return 2

  @property
  def eos_id(self) -> int:
    return 3

  def encode_ids(self, texts: Sequence[str]) -> list[list[int]]:
    """Ids of each text, without BOS/EOS and without padding."""
    unk = self.unk_id
    return [[self._ids.get(c, unk) for c in t] for t in _check_texts(texts)]

  def encode(self, texts: Sequence[str], max_len: int) -> dict[str, np.ndarray]:
    """Encodes texts into padded int32 arrays.

    Args:
      texts: Sequence of strings.
      max_len: Output length ``>= 1`` (and larger than the number of
        BOS/EOS tokens requested).

    Returns:
      ``{'input_ids': int32 [N, max_len], 'attention_mask': int32 [N,
      max_len]}``.
    """
    ids = self.encode_ids(texts)
    max_len = _check_max_len(max_len)
    num_special = int(self.add_bos) + int(self.add_eos)
    if max_len <= num_special:
      raise ValueError(
          f'`max_len` must exceed the {num_special} BOS/EOS token(s), got '
          f'{max_len}.')
    bos = [self.bos_id] if self.add_bos else []
    eos = [self.eos_id] if self.add_eos else []
    content = max_len - num_special
    return pad_sequences([bos + s[:content] + eos for s in ids], max_len,
                         self.pad_id)

  def decode(self, ids: Sequence[int]) -> str:
    """Decodes one id sequence, skipping pad, BOS and EOS; unk is U+FFFD."""
    offset = len(self.SPECIALS)
    out = []
    for i in np.asarray(ids).reshape(-1).astype(np.int64).tolist():
      if i >= offset and i - offset < len(self._chars):
        out.append(self._chars[i - offset])
      elif i == self.unk_id:
        out.append('\ufffd')
      elif i not in (self.pad_id, self.bos_id, self.eos_id):
        raise ValueError(f'id {i} is outside the vocabulary of {self.vocab_size}.')
    return ''.join(out)
