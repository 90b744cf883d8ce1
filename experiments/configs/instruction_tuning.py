"""Federated instruction tuning: LoRA on the Llama-style decoder, Dolly-schema data.

Clients are the instruction categories (natural non-IID split; `data.partition=
"dirichlet"` mixes them); the loss covers the response tokens only; after
training, greedy responses to held-out instructions are scored with ROUGE-L,
exact match and token F1. The default data is the small synthetic sample the
package ships (`fedjax_fm/data/samples/dolly_sample.jsonl`); point
`--config.data.path` at an Alpaca or Dolly JSONL file for real data.

  python -m experiments.main --config=experiments/configs/instruction_tuning.py --workdir=/tmp/fl_inst
  python -m experiments.main --config=experiments/configs/instruction_tuning.py:tiny --workdir=/tmp/fl_inst_tiny
"""

from experiments.configs import decoder_lora_lm


def get_config(arg: str = ''):
  if arg not in ('', 'tiny'):
    raise ValueError(f'config argument {arg!r} is unknown; allowed: "" or "tiny"')
  c = decoder_lora_lm.get_config(arg)
  c.data.source = 'instructions'
  c.data.task = 'causal_lm'
  c.data.tokenizer = 'sentencepiece'
  c.data.vocab_size = 400
  c.data.max_len = 80
  c.data.instruction_template = 'short'
  c.data.partition = 'natural'
  c.data.client_key = 'category'
  c.data.eval_fraction = 0.2
  c.data.generate_max_tokens = 16
  c.fl.clients_per_round = 5
  c.fl.chunk_size = 5
  c.fl.local_steps = 4
  c.fl.batch_size = 4
  c.fl.max_epochs = 4
  c.num_rounds = 60
  c.client_optimizer.learning_rate = 1e-2
  c.eval.every = 20
  if arg == 'tiny':
    c.num_rounds = 2
    c.data.max_len = 64
    c.data.generate_max_tokens = 8
    c.data.generate_examples = 4
    c.fl.clients_per_round = 5
    c.fl.chunk_size = 5
    c.eval.every = 2
  return c
