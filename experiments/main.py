"""Runs a federated experiment.

  python -m experiments.main                       # the embedded default
  python -m experiments.main --config=experiments/configs/mlp_synthetic.py:tiny \
      --workdir=/tmp/fl --config.num_rounds=3
"""

import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from fedjax_fm import train

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), 'configs', 'default.py')

_CONFIG = config_flags.DEFINE_config_file(
    'config', _DEFAULT_CONFIG, 'Experiment config file (path[:arg]).', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', '/tmp/fedjax_fm/default',
                               'Directory for metrics.jsonl and summary.json.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)
  train.run(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
