"""Federated data: datasets, partitioning, sources and tokenizers."""

from fedjax_fm.data import partition
from fedjax_fm.data.federated import FederatedDataset
from fedjax_fm.data.federated import prefetch
from fedjax_fm.data.federated import shuffle_keys
from fedjax_fm.data.sources import load_csv
from fedjax_fm.data.sources import load_jsonl
from fedjax_fm.data.sources import load_text
from fedjax_fm.data.sources import load_tfds
from fedjax_fm.data.stdlib_docs import DEFAULT_PACKAGES
from fedjax_fm.data.stdlib_docs import build_stdlib_docstrings
from fedjax_fm.data.stdlib_docs import load_stdlib_docstrings
from fedjax_fm.data.tokenizers import HFTokenizer
from fedjax_fm.data.tokenizers import SentencePieceTokenizer
from fedjax_fm.data.tokenizers import Tokenizer
from fedjax_fm.data.tokenizers import pad_sequences
