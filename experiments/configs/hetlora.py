"""Heterogeneous LoRA ranks on the default task (MiniLM + LoRA, stdlib docstrings).

Clients draw their initial rank from three tiers, 2 / 4 / 8 (40% / 30% / 30% of
the clients, by the seed; fixed for the run except in the hetlora mode, where
clients self-prune it); peft.rank = 8 is the maximum. MODE:

  zeropad   zero-padded factors, data-weighted mean (peft.lora_aggregation=fedit)
  hetlora   HetLoRA (the paper's algorithm): zero padding, sparsity-weighted mean, the
            rank self-pruning penalty and rule (peft.hetlora_prune: a client's rank shrinks
            to floor(0.9 r) when its penalised tail shrank in local training, and stays
            pruned; the ranks live in the per-client store)
  stack     exact mean of the clients' products merged into the base (FLoRA-style)
  product   exact mean product, SVD; each tier gets its rank's truncation
  homo_max  homogeneous baseline: every client at rank 8
  homo_min  homogeneous baseline: every client at rank 2

  python -m experiments.main --config=experiments/configs/hetlora.py:hetlora --workdir=/tmp/hetlora
  python -m experiments.main --config=experiments/configs/hetlora.py:stack,tiny --workdir=/tmp/h
  python -m experiments.main --config=experiments/configs/hetlora.py:tiny --workdir=/tmp/h  # hetlora
  python scripts/results_hetlora.py        # every mode, docs/results/hetlora.md
"""

from experiments.configs import default

MODES = ('zeropad', 'hetlora', 'stack', 'product', 'homo_max', 'homo_min')
RANKS = (2, 4, 8)
FRACTIONS = (0.4, 0.3, 0.3)


def get_config(arg: str = 'hetlora'):
  parts = (arg or 'hetlora').split(',')
  if parts == ['tiny']:   # the default mode's tiny variant
    parts = ['hetlora', 'tiny']
  if len(parts) not in (1, 2) or parts[0] not in MODES or (
      len(parts) == 2 and parts[1] != 'tiny'):
    raise ValueError(f'config argument {arg!r} is unknown; expected MODE[,tiny] with MODE '
                     f'in {MODES}')
  mode = parts[0]
  c = default.get_config(parts[1] if len(parts) == 2 else '')
  p = c.peft
  p.rank = max(RANKS)
  if mode == 'homo_min':
    p.rank = min(RANKS)
    p.alpha = 2.0 * p.rank       # the same alpha / rank scaling as the other modes
  if mode in ('homo_max', 'homo_min'):
    p.lora_aggregation = 'fedit'
    return c
  p.rank_distribution = 'tiers'
  p.ranks = RANKS
  p.rank_fractions = FRACTIONS
  p.lora_aggregation = {'zeropad': 'fedit', 'hetlora': 'hetlora', 'stack': 'stack',
                        'product': 'product'}[mode]
  if mode == 'hetlora':
    p.hetlora_gamma = 0.9
    p.hetlora_lambda = 1e-3
    p.hetlora_prune = True
  return c
