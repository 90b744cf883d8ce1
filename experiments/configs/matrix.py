"""The survey's taxonomy as a matrix: computational method x communication method.

The argument is ``COMP,COMM`` optionally followed by ``,tiny``:

  COMP (computational efficiency): full, lora, adapter, bitfit, ia3, prompt, prefix
  COMM (communication efficiency): none, topk_ef (top-k 1% + error feedback),
       q4 / q2 (stochastic 4 / 2-bit), powersgd (rank 4 + EF), prune (90% magnitude
       pruning, surviving values sent as top-k 10%), fedkseed (zeroth-order FedKSeed:
       an int16 seed and a float32 scalar per local step, K=4096 seeds, local SGD)

and, after COMM, any of the system options ``het`` (heterogeneous clients: uniform
step budgets, 10% dropout), ``fednova`` or ``scaffold`` (with COMM=none), e.g.
``lora,none,scaffold,het,tiny``.

Encoder routes fine-tune all-MiniLM-L6-v2 on stdlib docstrings (the default
task); prompt and prefix tuning train the Llama-style decoder on them (causal LM).

  python -m experiments.main --config=experiments/configs/matrix.py:lora,q4 --workdir=/tmp/matrix/lora_q4
  python -m experiments.main --config=experiments/configs/matrix.py:adapter,topk_ef,tiny --workdir=/tmp/m
  python scripts/run_matrix.py --out=/tmp/matrix        # every tiny cell, a markdown table
"""

from experiments.configs import peft_routes

COMPUTATION = ('full', 'lora', 'adapter', 'bitfit', 'ia3', 'prompt', 'prefix')
COMMUNICATION = ('none', 'topk_ef', 'q4', 'q2', 'powersgd', 'prune', 'fedkseed')
# Options after COMM (before `tiny`): het (uniform step budgets and 10% dropout),
# fednova / scaffold (fl.algorithm, with local SGD and the server's fedavg; only with
# COMM=none, which config.validate enforces).
SYSTEM = ('het', 'fednova', 'scaffold') + ('hetlora',)
# hetlora: heterogeneous LoRA ranks (tiers 2 / 4 / 8, HetLoRA aggregation; COMP=lora and
# COMM=none only, which config.validate enforces), e.g. ``lora,none,hetlora,tiny``.


def get_config(arg: str = 'lora,none'):
  parts = (arg or 'lora,none').split(',')
  system = [x for x in parts[2:] if x in SYSTEM]   # system options, see SYSTEM
  parts = parts[:2] + [x for x in parts[2:] if x not in SYSTEM]
  if len(parts) not in (2, 3) or parts[0] not in COMPUTATION or parts[1] not in COMMUNICATION \
      or (len(parts) == 3 and parts[2] != 'tiny'):
    raise ValueError(f'config argument {arg!r} is unknown; expected COMP,COMM[,tiny] with '
                     f'COMP in {COMPUTATION} and COMM in {COMMUNICATION}')
  comp, comm = parts[0], parts[1]
  variant = parts[2] if len(parts) == 3 else ''
  route = 'lora_fedit' if comp == 'lora' else comp
  c = peft_routes.get_config(route + (',' + variant if variant else ''))
  x = c.compress
  if comp in ('prompt', 'prefix'):
    # Every trainable tensor of these routes is small (virtual tokens x width): let
    # the operators take them instead of sending them raw.
    x.min_size = 16
  if comm == 'topk_ef':
    x.uplink, x.fraction, x.error_feedback = 'top_k', 0.01, True
  elif comm in ('q4', 'q2'):
    x.uplink, x.bits, x.block_size = 'stochastic_uniform', int(comm[1]), 256
  elif comm == 'powersgd':
    x.uplink, x.rank, x.error_feedback = 'powersgd', 4, True
  elif comm == 'prune':
    c.prune.enabled, c.prune.final_sparsity, c.prune.every = True, 0.9, 1
    c.prune.min_size = 64
    x.uplink, x.fraction = 'top_k', 0.1
  elif comm == 'fedkseed':   # zeroth-order: (seed, scalar) pairs replace the update
    _apply_fedkseed(c, comp, system)
  _apply_system(c, system)
  if 'hetlora' in system:
    _apply_hetlora(c, comp)
  return c


def _apply_hetlora(c, comp):
  """Heterogeneous LoRA ranks (experiments/configs/hetlora.py's tiers, HetLoRA mode)."""
  from experiments.configs import hetlora  # pylint: disable=g-import-not-at-top
  if comp != 'lora':
    raise ValueError(f'hetlora masks LoRA ranks: it is an option of COMP=lora, not {comp!r}')
  p = c.peft
  p.rank = max(hetlora.RANKS)
  p.rank_distribution, p.ranks, p.rank_fractions = 'tiers', hetlora.RANKS, hetlora.FRACTIONS
  p.lora_aggregation = 'hetlora'
  p.hetlora_gamma, p.hetlora_lambda, p.hetlora_prune = 0.9, 1e-3, True


def _apply_system(c, system):
  """The SYSTEM options: heterogeneous clients and the FedNova / SCAFFOLD algorithms."""
  if 'fednova' in system and 'scaffold' in system:
    raise ValueError('fednova and scaffold are two algorithms: name one')
  if 'het' in system:
    c.fl.step_budget, c.fl.step_budget_min, c.fl.dropout = 'uniform', 1, 0.1
  for algo in ('fednova', 'scaffold'):
    if algo in system:
      c.fl.algorithm = algo
      c.client_optimizer.name, c.client_optimizer.learning_rate = 'sgd', 0.05
      c.client_optimizer.weight_decay = 0.0
      c.server_optimizer.name, c.server_optimizer.learning_rate = 'fedavg', 1.0


def _apply_fedkseed(c, comp, system):
  """COMM=fedkseed: fl.algorithm="fedkseed" (experiments/configs/fedkseed.py's settings)."""
  if 'fednova' in system or 'scaffold' in system:
    raise ValueError('fedkseed is itself the algorithm (fl.algorithm): not with fednova or '
                     'scaffold')
  c.fl.algorithm = 'fedkseed'
  c.zo.num_seeds, c.zo.eps, c.zo.payload = 4096, 1e-3, 'pairs'
  co = c.client_optimizer
  co.name, co.weight_decay = 'sgd', 0.0
  co.learning_rate = 2e-5 if comp == 'full' else 1e-2
