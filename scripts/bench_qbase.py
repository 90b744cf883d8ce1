"""A quantized frozen base (QLoRA-style): bytes, round memory and logit error.

A Llama-style decoder of SmolLM2-135M's shape (30 layers, width 576, 9/3
heads, SwiGLU 1536, vocabulary 49152, tied embeddings; random weights) gets
four frozen bases, all computing in ``--compute`` (float32 by default: CPUs
have no native bfloat16 matmul, so bf16 compute there only adds f32 copies):

* ``f32``: every weight float32;
* ``bf16``: every weight bfloat16;
* ``int8`` / ``nf4``: the projections inside the layers quantized
  (`fedjax_fm.peft.qbase.quantize_base`, blocks of 64 along the input axis)
  from the float32 kernels, the other weights (embeddings, norms) bfloat16.

LoRA (float32 factors on ``q_proj``/``v_proj``) trains on top of each. Reported:

* ``{base}_frozen_mib``: the bytes of the frozen base at the full shape
  (abstract evaluation, nothing computed), plus ``nf4_dq`` (NF4 with
  double-quantized scales);
* ``{base}_round_{temp,argument,peak}_mib``: the memory of one compiled LoRA
  round (a few clients, short sequences, ``chunked``) from XLA's memory
  analysis of the compiled program, as `fedjax_fm.engine.memory.round_memory`
  reads it: ``temp`` are the buffers the round allocates, ``argument`` its
  inputs (the frozen base, the server state, the round's token ids), ``peak =
  argument + output + temp - aliased``. Compiling the 30-layer round takes
  minutes on two cores, so by default it is compiled at 2 and 4 layers and
  extrapolated linearly to ``--layers`` (every layer adds the same buffers;
  the measured points are reported too). ``--mem_layers 30`` measures it
  directly.
* ``{fmt}_logit_*``: the max / mean absolute logit error of the quantized
  model against the float32 model whose kernels are the dequantized ones (the
  implementation error) and against the original float32 model (the
  quantization error), on a ``--logit_layers`` model (random N(0, 0.02)
  weights).

  python scripts/bench_qbase.py
  python scripts/bench_qbase.py --mem_layers 30 --logit_layers 30   # no extrapolation

The last line printed is ``{"bench": "qbase", ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from fedjax_fm import engine  # noqa: E402
from fedjax_fm import models  # noqa: E402
from fedjax_fm import peft  # noqa: E402
from fedjax_fm.engine import memory  # noqa: E402
from fedjax_fm.peft import qbase  # noqa: E402

MIB = 2**20
BASES = ('f32', 'bf16', 'int8', 'nf4')


def _parse():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--layers', type=int, default=30)
  p.add_argument('--dim', type=int, default=576)
  p.add_argument('--heads', type=int, default=9)
  p.add_argument('--kv_heads', type=int, default=3)
  p.add_argument('--mlp', type=int, default=1536)
  p.add_argument('--vocab', type=int, default=49152)
  p.add_argument('--block', type=int, default=64)
  p.add_argument('--rank', type=int, default=8)
  p.add_argument('--compute', choices=('f32', 'bf16'), default='f32')
  p.add_argument('--clients', type=int, default=4)
  p.add_argument('--chunk', type=int, default=2)
  p.add_argument('--steps', type=int, default=2)
  p.add_argument('--batch', type=int, default=2)
  p.add_argument('--seq', type=int, default=64)
  p.add_argument('--mem_layers', type=int, nargs='+', default=[2, 4],
                 help='layer counts whose round is compiled (two or more: '
                 'extrapolated to --layers)')
  p.add_argument('--logit_layers', type=int, default=4)
  p.add_argument('--bases', nargs='+', default=list(BASES), choices=BASES)
  return p.parse_args()


def _config(args, layers, dtype=jnp.float32, param_dtype=jnp.float32):
  return models.DecoderConfig(
      vocab_size=args.vocab, dim=args.dim, num_layers=layers,
      num_heads=args.heads, num_kv_heads=args.kv_heads, mlp_dim=args.mlp,
      max_len=args.seq, tie_embeddings=True, rope_theta=100000.0,
      dtype=dtype, param_dtype=param_dtype)


def _lora_model(args, layers, base, state=None):
  """The LoRA decoder with the frozen base ``base``.

  ``state``: float32 weights (pure dict); ``None`` builds an initialised one
  (abstract under ``nnx.eval_shape``).
  """
  compute = jnp.bfloat16 if args.compute == 'bf16' else jnp.float32
  stored = jnp.float32 if base == 'f32' else jnp.bfloat16
  quantized = base not in ('f32', 'bf16')
  cfg = _config(args, layers, compute, stored)
  if state is None:
    state = nnx.to_pure_dict(nnx.state(models.Decoder(
        _config(args, layers), rngs=nnx.Rngs(0))))
  graphdef, _ = nnx.split(nnx.eval_shape(
      lambda: models.Decoder(cfg, rngs=nnx.Rngs(0))))

  def cast(path, x):
    keys = tuple(getattr(k, 'key', k) for k in path)
    keep = quantized and keys[0] == 'layers' and keys[-1] == 'kernel'
    return x if keep else x.astype(stored)   # quantized from the f32 kernels

  model = nnx.merge(graphdef, jax.tree_util.tree_map_with_path(cast, state))
  peft.apply_lora(model, rank=args.rank, alpha=2.0 * args.rank,
                  target_modules=('q_proj', 'v_proj'), rngs=nnx.Rngs(1))
  lora = nnx.state(model, nnx.LoRAParam)
  nnx.update(model, jax.tree.map(lambda x: x.astype(jnp.float32), lora))
  if quantized:
    kwargs = {'double_quant': True} if base == 'nf4_dq' else {}
    qbase.quantize_base(model, base.split('_')[0], args.block, **kwargs)
  return model


def _frozen_bytes(args, base) -> int:
  """Frozen-base bytes of the full-shape model, without computing anything."""
  model = nnx.eval_shape(lambda: _lora_model(args, args.layers, base))
  return qbase._tree_bytes(peft.split_model(model, 'lora').frozen)  # pylint: disable=protected-access


def _round_memory(args, layers, base) -> dict[str, int]:
  model = nnx.eval_shape(lambda: _lora_model(args, layers, base))
  split = peft.split_model(model, 'lora')
  loss_fn = models.make_loss_fn(split.graphdef, models.causal_lm_task())
  fed = engine.build_round(loss_fn, split.trainable,
                           client_optimizer=optax.sgd(0.01),
                           server_optimizer=optax.sgd(1.0),
                           num_clients=args.clients, strategy='chunked',
                           chunk_size=args.chunk)
  c, s, b, length = args.clients, args.steps, args.batch, args.seq
  shape = jax.ShapeDtypeStruct
  data = {
      'batch': {'input_ids': shape((c, s, b, length), jnp.int32),
                'attention_mask': shape((c, s, b, length), jnp.int32)},
      'example_mask': shape((c, s, b), jnp.bool_),
      'step_mask': shape((c, s), jnp.bool_),
      'weight': shape((c,), jnp.float32),
      'client_id': shape((c,), jnp.int32),
      'client_mask': shape((c,), jnp.bool_),
  }
  state = jax.eval_shape(fed.init, split.trainable, jax.random.key(0))
  # What memory.round_memory reads, plus the aliased bytes for the peak.
  ma = fed.apply.lower(state, memory.shapes_of(split.frozen),
                       data).compile().memory_analysis()
  return {'temp': ma.temp_size_in_bytes,
          'argument': ma.argument_size_in_bytes,
          'peak': (ma.argument_size_in_bytes + ma.output_size_in_bytes
                   + ma.temp_size_in_bytes - ma.alias_size_in_bytes)}


def _extrapolate(points: dict[int, dict[str, int]], layers: int):
  """Least-squares line through ``{layers: value}`` per key, at ``layers``."""
  xs = np.asarray(sorted(points), np.float64)
  out = {}
  for key in points[int(xs[0])]:
    ys = np.asarray([points[int(x)][key] for x in xs], np.float64)
    slope, intercept = np.polyfit(xs, ys, 1)
    out[key] = slope * layers + intercept
  return out


def _forward(model, ids):
  return model(ids)


def _logit_errors(args, fmt, ids) -> dict[str, float]:
  """Quantized (f32 compute) vs its dequantized f32 reference and vs f32."""
  forward = nnx.jit(_forward)
  model = models.Decoder(_config(args, args.logit_layers), rngs=nnx.Rngs(0))
  want = np.asarray(forward(model, ids))
  state = nnx.to_pure_dict(nnx.state(model))
  graphdef, _ = nnx.split(model)
  qbase.quantize_base(model, fmt, args.block)
  ref = nnx.merge(graphdef, state)
  for path, mod in nnx.iter_modules(model):
    if isinstance(mod, qbase.QuantizedLinear):
      target = ref
      for key in path:
        target = target[key] if isinstance(key, int) else getattr(target, key)
      target.kernel.set_value(mod.dequantized_kernel())
  got = np.asarray(forward(model, ids))
  impl = np.abs(got - np.asarray(forward(ref, ids)))
  quant = np.abs(got - want)
  return {'max_vs_dequant_ref': float(impl.max()),
          'mean_vs_dequant_ref': float(impl.mean()),
          'max_vs_f32': float(quant.max()), 'mean_vs_f32': float(quant.mean()),
          'mean_abs_logit': float(np.abs(want).mean())}


def main():
  args = _parse()
  t0 = time.time()
  cfg = _config(args, args.layers)
  params = sum(x.size for x in jax.tree_util.tree_leaves(nnx.state(
      nnx.eval_shape(lambda: models.Decoder(cfg, rngs=nnx.Rngs(0))))))
  mem_layers = sorted(set(args.mem_layers))
  result = {
      'bench': 'qbase',
      'model': (f'decoder L={args.layers} d={args.dim} heads={args.heads}/'
                f'{args.kv_heads} mlp={args.mlp} vocab={args.vocab} tied '
                '(SmolLM2-135M shape)'),
      'params': int(params), 'block_size': args.block, 'compute': args.compute,
      'lora': f'rank {args.rank} q_proj,v_proj f32',
      'round': (f'chunked clients={args.clients} chunk={args.chunk} '
                f'steps={args.steps} batch={args.batch} seq={args.seq}'),
      'round_memory_layers': (mem_layers if mem_layers == [args.layers] else
                              f'compiled at {mem_layers}, extrapolated to '
                              f'{args.layers}'),
  }
  for base in list(args.bases) + ['nf4_dq']:
    result[f'{base}_frozen_mib'] = round(_frozen_bytes(args, base) / MIB, 2)
  for base in args.bases:
    points = {n: _round_memory(args, n, base) for n in mem_layers}
    mem = points[args.layers] if args.layers in points else _extrapolate(
        points, args.layers)
    for k, v in mem.items():
      result[f'{base}_round_{k}_mib'] = round(v / MIB, 1)
    print(json.dumps({
        'base': base, 'frozen_mib': result[f'{base}_frozen_mib'],
        **{f'L{n}_{k}_mib': round(v / MIB, 1) for n, p in points.items()
           for k, v in p.items()},
        **{f'L{args.layers}_{k}_mib': round(v / MIB, 1) for k, v in mem.items()},
        'elapsed_s': round(time.time() - t0, 1)}), flush=True)
  ids = jnp.asarray(np.random.default_rng(0).integers(
      0, args.vocab, (2, min(args.seq, 32))))
  for fmt in ('int8', 'nf4'):
    if fmt in args.bases:
      err = _logit_errors(args, fmt, ids)
      print(json.dumps({'logits': fmt, 'layers': args.logit_layers, **err}),
            flush=True)
      for k, v in err.items():
        result[f'{fmt}_logit_{k}'] = float(f'{v:.3g}')
  result['logit_layers'] = args.logit_layers
  result['elapsed_s'] = round(time.time() - t0, 1)
  print(json.dumps(result))


if __name__ == '__main__':
  main()
