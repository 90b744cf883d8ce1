"""The survey's taxonomy as a matrix: computational method x communication method.

The argument is ``COMP,COMM`` optionally followed by ``,tiny``:

  COMP (computational efficiency): full, lora, adapter, bitfit, ia3, prompt, prefix
  COMM (communication efficiency): none, topk_ef (top-k 1% + error feedback),
       q4 / q2 (stochastic 4 / 2-bit), powersgd (rank 4 + EF), prune (90% magnitude
       pruning, surviving values sent as top-k 10%)

Encoder routes fine-tune all-MiniLM-L6-v2 on stdlib docstrings (the default
task); prompt and prefix tuning train the Llama-style decoder on them (causal LM).

  python -m experiments.main --config=experiments/configs/matrix.py:lora,q4 --workdir=/tmp/matrix/lora_q4
  python -m experiments.main --config=experiments/configs/matrix.py:adapter,topk_ef,tiny --workdir=/tmp/m
  python scripts/run_matrix.py --out=/tmp/matrix        # every tiny cell, a markdown table
"""

from experiments.configs import peft_routes

COMPUTATION = ('full', 'lora', 'adapter', 'bitfit', 'ia3', 'prompt', 'prefix')
COMMUNICATION = ('none', 'topk_ef', 'q4', 'q2', 'powersgd', 'prune')


def get_config(arg: str = 'lora,none'):
  parts = (arg or 'lora,none').split(',')
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
  return c
