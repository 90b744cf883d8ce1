"""Runs a federated experiment.

  python -m experiments.main                       # the embedded default
  python -m experiments.main --config=experiments/configs/mlp_synthetic.py:tiny \
      --workdir=/tmp/fl --config.num_rounds=3
  # compiled rounds are cached under ~/.cache/fedjax_fm/xla (--compilation_cache= to turn off)
  # two hosts (run on each, process_id 0 and 1):
  python -m experiments.main --config.fl.strategy=sharded \
      --coordinator_address=host0:1234 --num_processes=2 --process_id=0
"""

import os

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from fedjax_fm import sharding
from fedjax_fm import train

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), 'configs', 'default.py')

_CONFIG = config_flags.DEFINE_config_file(
    'config', _DEFAULT_CONFIG, 'Experiment config file (path[:arg]).', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', '/tmp/fedjax_fm/default',
                               'Directory for metrics.jsonl, summary.json and checkpoints.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None,
    'Multi-host: host:port of process 0 (or env FEDJAX_FM_COORDINATOR).')
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', None, 'Multi-host: number of processes (or env FEDJAX_FM_NUM_PROCESSES).')
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, 'Multi-host: this process (or env FEDJAX_FM_PROCESS_ID).')
_COMPILATION_CACHE = flags.DEFINE_string(
    'compilation_cache', os.path.join(os.path.expanduser('~'), '.cache', 'fedjax_fm', 'xla'),
    'Directory of JAX\'s persistent compilation cache: a rerun of the same program loads '
    'its compiled rounds instead of compiling them again. Empty: no cache.')


def enable_compilation_cache(directory: str) -> None:
  """Turns on JAX's persistent compilation cache in ``directory`` (no-op when empty)."""
  if not directory:
    return
  os.makedirs(directory, exist_ok=True)
  jax.config.update('jax_compilation_cache_dir', directory)
  # Cache every program, however small or quick to compile.
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)
  enable_compilation_cache(_COMPILATION_CACHE.value)
  sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  train.run(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
