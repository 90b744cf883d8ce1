"""FedAvg, FedProx, FedNova and SCAFFOLD under system heterogeneity.

The argument is ``ALGO`` optionally followed by ``,tiny`` (``tiny`` alone: FedAvg);
ALGO in ``fedavg``, ``fedprox`` (FedAvg with ``fl.prox_mu``), ``fednova``,
``scaffold``. The task is the small MLP of ``mlp_synthetic`` on a harder
synthetic Gaussian mixture (10 classes in 8 dimensions) with Dirichlet(0.1)
non-IID clients, local SGD, the server's ``fedavg`` (x += Delta), and system
heterogeneity: each client completes a uniform number of its 10 local steps in
[1, 10] per round (passes over its data as needed, at most 10), and 10% of the
sampled clients drop out mid-round (their update never arrives).

  python -m experiments.main --config=experiments/configs/heterogeneity.py:fednova --workdir=/tmp/het_fednova
  python -m experiments.main --config=experiments/configs/heterogeneity.py:scaffold,tiny --workdir=/tmp/het_tiny
  python scripts/results_heterogeneity.py     # all four, docs/results/heterogeneity.md
"""

from experiments.configs import mlp_synthetic

ALGORITHMS = ('fedavg', 'fedprox', 'fednova', 'scaffold')


def get_config(arg: str = 'fedavg'):
  if arg == 'tiny':   # the plain variant: FedAvg
    arg = 'fedavg,tiny'
  parts = (arg or 'fedavg').split(',')
  if len(parts) not in (1, 2) or parts[0] not in ALGORITHMS or (
      len(parts) == 2 and parts[1] != 'tiny'):
    raise ValueError(f'config argument {arg!r} is unknown; expected ALGO[,tiny] with ALGO in '
                     f'{ALGORITHMS}')
  algo, tiny = parts[0], len(parts) == 2
  c = mlp_synthetic.get_config('tiny' if tiny else '')
  c.num_rounds = 3 if tiny else 30
  c.eval.every = c.num_rounds if tiny else 10
  # A harder mixture than mlp_synthetic's (10 overlapping classes in 8 dimensions) and
  # stronger label skew, so that client drift shows.
  c.data.num_features = 8
  c.data.num_classes = 10
  c.data.alpha = 0.1
  c.fl.local_steps = 4 if tiny else 10
  c.fl.max_epochs = 10   # small clients may loop over their data to fill their budget
  c.client_optimizer.name = 'sgd'
  c.client_optimizer.learning_rate = 0.05
  c.server_optimizer.name = 'fedavg'
  c.server_optimizer.learning_rate = 1.0
  c.fl.step_budget = 'uniform'
  c.fl.step_budget_min = 1
  c.fl.dropout = 0.1
  c.fl.algorithm = 'fedavg' if algo == 'fedprox' else algo
  if algo == 'fedprox':
    c.fl.prox_mu = 0.1
  return c
