"""FedKSeed: zeroth-order federated fine-tuning with K shared seeds, on the default task.

Qin et al. 2024 (https://arxiv.org/abs/2312.06353): each local step draws one of K
candidate seeds, estimates the directional derivative along its perturbation by two
forward passes and sends the pair (seed, scalar); the server rebuilds the update from
the seeds. all-MiniLM-L6-v2 on the stdlib docstrings (the default task), LoRA factors
or the full model trained. The argument is ``lora`` or ``full``, optionally followed by
``,tiny``; FedKSeed-Pro (non-uniform seed sampling) with
``--config.fl.algorithm=fedkseed_pro``.

  python -m experiments.main --config=experiments/configs/fedkseed.py:lora --workdir=/tmp/fedkseed_lora
  python -m experiments.main --config=experiments/configs/fedkseed.py:full --workdir=/tmp/fedkseed_full
  python -m experiments.main --config=experiments/configs/fedkseed.py:lora,tiny --workdir=/tmp/fedkseed_tiny
  python scripts/results_fedkseed.py            # against first-order LoRA: docs/results/fedkseed.md
"""

from experiments.configs import default

ROUTES = ('lora', 'full')


def get_config(arg: str = 'lora'):
  route, _, variant = (arg or 'lora').partition(',')
  if route not in ROUTES or variant not in ('', 'tiny'):
    raise ValueError(f'config argument {arg!r} is unknown; allowed: {ROUTES} optionally '
                     'followed by ",tiny"')
  c = default.get_config(variant)
  c.fl.algorithm = 'fedkseed'
  c.zo.num_seeds = 4096
  c.zo.eps = 1e-3
  c.zo.payload = 'pairs'
  c.client_optimizer.name = 'sgd'
  c.client_optimizer.weight_decay = 0.0
  c.fl.local_steps = 16 if not variant else 2
  if route == 'full':
    c.peft.method = 'full'
    c.client_optimizer.learning_rate = 2e-5
  else:
    c.peft.method, c.peft.lora_aggregation = 'lora', 'fedit'
    c.client_optimizer.learning_rate = 1e-2
  return c
