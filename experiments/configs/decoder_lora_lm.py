"""Federated LoRA of a Llama-style decoder on stdlib docstrings (causal LM).

Each client is one standard-library module (natural partition); the tokenizer
is a SentencePiece model trained on the training texts into the workdir.

  python -m experiments.main --config=experiments/configs/decoder_lora_lm.py --workdir=/tmp/fl_lm
  python -m experiments.main --config=experiments/configs/decoder_lora_lm.py:tiny --workdir=/tmp/fl_lm_tiny
"""

from fedjax_fm import config as config_lib


def get_config(arg: str = ''):
  c = config_lib.base_config()
  c.num_rounds = 40
  c.model.kind = 'decoder'
  c.model.hidden_size = 128
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.model.mlp_dim = 256
  c.peft.method = 'lora'
  c.peft.rank = 8
  c.peft.target_modules = ('q_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj')
  c.peft.extra_trainable = ()
  c.data.source = 'stdlib_docs'
  c.data.task = 'causal_lm'
  c.data.tokenizer = 'sentencepiece'
  c.data.vocab_size = 1000
  c.data.max_len = 64
  c.data.partition = 'natural'
  c.data.client_key = 'module'
  c.data.eval_fraction = 0.1
  c.fl.clients_per_round = 16
  c.fl.local_steps = 4
  c.fl.batch_size = 8
  c.fl.chunk_size = 8
  c.client_optimizer.name = 'adam'
  c.client_optimizer.learning_rate = 3e-3
  c.eval.every = 10
  if arg == 'tiny':
    c.num_rounds = 2
    c.model.hidden_size = 32
    c.model.mlp_dim = 64
    c.data.vocab_size = 300
    c.data.max_len = 16
    c.fl.clients_per_round = 4
    c.fl.local_steps = 2
    c.fl.batch_size = 4
    c.fl.chunk_size = 2
    c.eval.max_examples = 64
    c.eval.every = 2
  elif arg:
    raise ValueError(f'config argument {arg!r} is unknown; allowed: "" or "tiny"')
  return c
