"""FedAvg of an MLP on TFDS MNIST, pathological non-IID (2 digits per client).

Needs the MNIST TFDS data prepared in TFDS's data dir (``tfds build mnist`` once,
online); tests run it on ``tfds.testing.mock_data``.

  python -m experiments.main --config=experiments/configs/tfds_mnist.py --workdir=/tmp/fl_mnist
  python -m experiments.main --config=experiments/configs/tfds_mnist.py:tiny --workdir=/tmp/fl_mnist_tiny
"""

from fedjax_fm import config as config_lib


def get_config(arg: str = ''):
  c = config_lib.base_config()
  c.num_rounds = 100
  c.model.kind = 'mlp'
  c.model.hidden = (200, 200)
  c.peft.method = 'full'
  c.data.source = 'tfds'
  c.data.name = 'mnist'
  c.data.split = 'train'
  c.data.num_clients = 100
  c.data.partition = 'shards'
  c.data.labels_per_client = 2
  c.fl.clients_per_round = 10
  c.fl.local_steps = 10
  c.fl.batch_size = 32
  c.fl.chunk_size = 10
  c.client_optimizer.name = 'sgd'
  c.client_optimizer.learning_rate = 0.05
  if arg == 'tiny':
    c.num_rounds = 2
    c.model.hidden = (32,)
    c.data.num_clients = 10
    c.data.max_examples = 200
    c.fl.clients_per_round = 4
    c.fl.local_steps = 2
    c.fl.chunk_size = 2
    c.eval.every = 2
  elif arg:
    raise ValueError(f'config argument {arg!r} is unknown; allowed: "" or "tiny"')
  return c
