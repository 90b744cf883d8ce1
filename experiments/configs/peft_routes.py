"""One config per PEFT route of the survey, on the real all-MiniLM-L6-v2 or the decoder.

The argument names the route, optionally followed by ``,tiny``:

  full          full fine-tuning (MiniLM, stdlib docstrings)
  lora_fedit    LoRA, A and B averaged separately (FedIT)
  lora_ffa      FFA-LoRA: A frozen at its shared init, B averaged (exact)
  lora_product  LoRA, mean of the products re-factorised by SVD
  lora_stack    FLoRA-style stacking: exact mean product merged into the base
  slora         SLoRA: sparse fine-tuning, then LoRA from the SVD of its update
  adapter       Houlsby bottleneck adapters after attention and MLP
  bitfit        biases only (+ the head)
  ia3           IA3 rescaling of keys, values and the FFN activation
  prompt        prompt tuning of the Llama-style decoder (causal LM on docstrings)
  prefix        prefix tuning of the decoder

  python -m experiments.main --config=experiments/configs/peft_routes.py:lora_ffa --workdir=/tmp/routes/lora_ffa
  python -m experiments.main --config=experiments/configs/peft_routes.py:adapter,tiny --workdir=/tmp/routes_tiny
"""

from experiments.configs import decoder_lora_lm
from experiments.configs import default

ROUTES = ('full', 'lora_fedit', 'lora_ffa', 'lora_product', 'lora_stack', 'slora', 'adapter',
          'bitfit', 'ia3', 'prompt', 'prefix')


def get_config(arg: str = 'lora_fedit'):
  route, _, variant = (arg or 'lora_fedit').partition(',')
  if route not in ROUTES:
    raise ValueError(f'config argument {arg!r} is unknown; allowed: {ROUTES} '
                     'optionally followed by ",tiny"')
  if variant not in ('', 'tiny'):
    raise ValueError(f'config argument {arg!r} is unknown; the variant must be "tiny"')
  if route in ('prompt', 'prefix'):
    c = decoder_lora_lm.get_config(variant)
    c.peft.method, c.peft.num_virtual_tokens = route, 8
    c.peft.extra_trainable = ()
    c.client_optimizer.learning_rate = 1e-2
    return c
  c = default.get_config(variant)
  p = c.peft
  if route == 'full':
    p.method = 'full'
    c.client_optimizer.learning_rate = 5e-5
  elif route.startswith('lora_'):
    p.method, p.lora_aggregation = 'lora', route[len('lora_'):]
  elif route == 'slora':
    p.method, p.slora_density = 'slora', 0.05
    p.target_modules = ('query', 'value')
    p.slora_stage1_rounds = max(1, c.num_rounds // 5)
    c.client_optimizer.learning_rate = 1e-4
  else:
    p.method = route
    if route == 'bitfit':
      c.client_optimizer.learning_rate = 5e-3
    elif route == 'ia3':
      c.client_optimizer.learning_rate = 1e-2
  return c
