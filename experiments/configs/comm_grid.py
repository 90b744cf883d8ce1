"""Communication grid on the default task: one compressor per run, same everything else.

The default experiment (federated LoRA on all-MiniLM-L6-v2, stdlib docstrings,
100 non-IID clients) with its uplink compressed. The argument names the grid
point, optionally followed by ``,tiny``:

  none         uncompressed FedAvg (f32 LoRA deltas)
  topk1_ef     top-k 1% of each tensor, error feedback
  topk2_q4_ef  top-k 2%, values quantized to 4 bits, error feedback
  q4           stochastic 4-bit quantization (blocks of 256)
  q2           stochastic 2-bit quantization (blocks of 256)
  q1           stochastic 1-bit quantization (blocks of 256)
  powersgd4    PowerSGD rank 4, error feedback
  prune90      magnitude pruning of the trainable params to 90% (polynomial schedule
               over the first half), the surviving values sent as top-k 10%
  ffa          FFA-LoRA uncompressed (A frozen at its shared init: only B is sent)
  ffa_q1       FFA-LoRA (only B is sent) with stochastic 1-bit quantization (blocks of 256)
  ffa_sign_ef  FFA-LoRA with sign compression (1 bit + a scale) and error feedback
  ffa_lr2      FFA-LoRA uncompressed, client learning rate doubled (only B learns, so
               each step moves the adapter half as far as LoRA's two factors)
  ffa_lr2_q1   ffa_lr2 with stochastic 1-bit quantization (blocks of 1024)

  python -m experiments.main --config=experiments/configs/comm_grid.py:topk1_ef --workdir=/tmp/comm/topk1_ef
  python -m experiments.main --config=experiments/configs/comm_grid.py:q4,tiny --workdir=/tmp/comm_tiny
  python scripts/plot_comm.py --runs /tmp/comm --out comm.png   # after running the grid
"""

from experiments.configs import default

POINTS = ('none', 'topk1_ef', 'topk2_q4_ef', 'q4', 'q2', 'q1', 'powersgd4', 'prune90', 'ffa',
          'ffa_q1', 'ffa_sign_ef', 'ffa_lr2', 'ffa_lr2_q1')


def get_config(arg: str = 'none'):
  point, _, variant = (arg or 'none').partition(',')
  if point not in POINTS:
    raise ValueError(f'config argument {arg!r} is unknown; allowed: {POINTS} '
                     'optionally followed by ",tiny"')
  if variant not in ('', 'tiny'):
    raise ValueError(f'config argument {arg!r} is unknown; the variant must be "tiny"')
  c = default.get_config(variant)
  c.eval.every = 5 if not variant else c.eval.every
  x = c.compress
  if point == 'topk1_ef':
    x.uplink, x.fraction, x.error_feedback = 'top_k', 0.01, True
  elif point == 'topk2_q4_ef':
    x.uplink, x.fraction, x.error_feedback = 'top_k', 0.02, True
    x.then, x.then_bits = 'stochastic_uniform', 4
  elif point in ('q4', 'q2', 'q1'):
    x.uplink, x.bits, x.block_size = 'stochastic_uniform', int(point[1]), 256
  elif point == 'powersgd4':
    x.uplink, x.rank, x.error_feedback = 'powersgd', 4, True
  elif point == 'ffa':
    c.peft.lora_aggregation = 'ffa'
  elif point == 'ffa_q1':
    c.peft.lora_aggregation = 'ffa'
    x.uplink, x.bits, x.block_size = 'stochastic_uniform', 1, 256
  elif point in ('ffa_lr2', 'ffa_lr2_q1'):
    c.peft.lora_aggregation = 'ffa'
    c.client_optimizer.learning_rate *= 2
    if point == 'ffa_lr2_q1':
      x.uplink, x.bits, x.block_size = 'stochastic_uniform', 1, 1024
  elif point == 'ffa_sign_ef':
    c.peft.lora_aggregation = 'ffa'
    x.uplink, x.error_feedback = 'sign', True
  elif point == 'prune90':
    c.prune.enabled, c.prune.final_sparsity = True, 0.9
    c.prune.every, c.prune.min_size = 2, 256
    x.uplink, x.fraction = 'top_k', 0.1
  return c
