"""fedjax_fm: federated learning of foundation models, one compiled round.

::

  import fedjax_fm as fm

  fed = fm.build_round(loss_fn, params, client_optimizer=optax.sgd(0.1),
                       server_optimizer=optax.sgd(1.0), num_clients=100,
                       compressor=fm.compress.top_k(0.01),
                       aggregator=fm.aggregate.median())
  state = fed.init(params, jax.random.key(0))
  state, metrics = fed.apply(state, frozen, round_data)

Subpackages: `engine` (the round), `aggregate`, `compress`, `privacy`, `prune`,
`data`, `models`, `peft`, `hf` (Hugging Face import and export), `evaluation`,
`stacking` (params with their layers stacked, ``build_round(stack_layers=...)``)
and `train` (experiments from configs: ``fm.train.run(config, workdir)``).
"""

import importlib
from importlib import metadata as _metadata

from fedjax_fm import aggregate
from fedjax_fm import compress
from fedjax_fm import data
from fedjax_fm import engine
from fedjax_fm import privacy
from fedjax_fm import prune
from fedjax_fm import stacking
from fedjax_fm import tree_util
from fedjax_fm.aggregate import Aggregator
from fedjax_fm.compress import Compressor
from fedjax_fm.data import FederatedDataset
from fedjax_fm.engine import FederatedRound
from fedjax_fm.engine import ServerState
from fedjax_fm.engine import build_round
from fedjax_fm.engine import build_sweep
from fedjax_fm.engine import client_optimizer
from fedjax_fm.engine import sample_clients
from fedjax_fm.engine import server_optimizer

try:
  __version__ = _metadata.version('fedjax_fm')
except _metadata.PackageNotFoundError:   # a source tree that is not installed
  __version__ = '0.0.0+unknown'

# Heavier subpackages (Flax models, Hugging Face interop, the experiment runner)
# load on first use: `fm.models`, `fm.peft`, `fm.hf`, `fm.evaluation`, `fm.train`.
_LAZY = ('models', 'peft', 'hf', 'evaluation', 'train', 'config', 'checkpoint', 'sharding')


def __getattr__(name):
  if name in _LAZY:
    return importlib.import_module(f'fedjax_fm.{name}')
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


__all__ = [
    'Aggregator',
    'Compressor',
    'FederatedDataset',
    'FederatedRound',
    'ServerState',
    '__version__',
    'aggregate',
    'build_round',
    'build_sweep',
    'client_optimizer',
    'compress',
    'data',
    'engine',
    'privacy',
    'prune',
    'sample_clients',
    'server_optimizer',
    'stacking',
    'tree_util',
    *_LAZY,
]
