"""FedAvg of a small MLP on a synthetic Gaussian mixture, quantity-skewed clients.

  python -m experiments.main --config=experiments/configs/mlp_synthetic.py --workdir=/tmp/fl_mlp
  python -m experiments.main --config=experiments/configs/mlp_synthetic.py:tiny --workdir=/tmp/fl_mlp_tiny
"""

from fedjax_fm import config as config_lib


def get_config(arg: str = ''):
  c = config_lib.base_config()
  c.num_rounds = 50
  c.model.kind = 'mlp'
  c.model.hidden = (64, 64)
  c.peft.method = 'full'
  c.data.source = 'synthetic'
  c.data.num_examples = 8000
  c.data.num_features = 16
  c.data.num_classes = 4
  c.data.num_clients = 200
  c.data.partition = 'dirichlet'
  c.data.alpha = 0.3
  c.fl.clients_per_round = 32
  c.fl.local_steps = 5
  c.fl.batch_size = 16
  c.fl.chunk_size = 8
  c.client_optimizer.name = 'sgd'
  c.client_optimizer.learning_rate = 0.05
  # optax's Adam on the server (bias-corrected); 'fedadam' is Reddi et al.'s Algorithm 2.
  # The results this config's docs report were measured with this one.
  c.server_optimizer.name = 'fedadam_optax'
  c.server_optimizer.learning_rate = 0.01
  c.eval.every = 10
  if arg == 'tiny':
    c.num_rounds = 3
    c.data.num_examples = 600
    c.data.num_clients = 20
    c.fl.clients_per_round = 8
    c.fl.chunk_size = 4
    c.eval.every = 3
  elif arg:
    raise ValueError(f'config argument {arg!r} is unknown; allowed: "" or "tiny"')
  return c
