"""Tokenizers producing fixed-length padded numpy batches.

All tokenizers follow the small :class:`Tokenizer` protocol:
``encode(texts, max_len)`` returns ``{'input_ids', 'attention_mask'}`` int32
arrays of shape ``[N, max_len]`` (right-padded with ``pad_id``, truncated to
``max_len``), ``decode(ids)`` returns a string, and ``vocab_size`` /
``pad_id`` describe the vocabulary.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

PathLike = str | os.PathLike[str]


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
    """
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top

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
