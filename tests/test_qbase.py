"""The quantized frozen base against NumPy references and GGML's own dequantization."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from fedjax_fm import engine
from fedjax_fm import peft
from fedjax_fm.models import tasks
from fedjax_fm.models.decoder import Decoder, DecoderConfig
from fedjax_fm.peft import qbase
from fedjax_fm.peft.lora import LoRALinear

DEC = DecoderConfig(vocab_size=64, dim=32, num_layers=2, num_heads=4,
                    num_kv_heads=2, mlp_dim=64, max_len=16)


_forward = nnx.jit(lambda model, ids: model(ids))


def _weights(shape, seed=0):
  rng = np.random.default_rng(seed)
  w = rng.normal(size=shape).astype(np.float32)
  # Blocks of very different magnitudes, and an all-zero stretch.
  w *= np.exp(rng.normal(size=shape)).astype(np.float32)
  w.reshape(-1)[:70] = 0.0
  return w


def _np_blocks(w, axis, block):
  """Reference blocking: the block axis last, zero-padded, cut in blocks."""
  moved = np.moveaxis(w.astype(np.float32), axis, -1)
  n = moved.shape[-1]
  nb = -(-n // block)
  moved = np.concatenate(
      [moved, np.zeros(moved.shape[:-1] + (nb * block - n,), np.float32)], -1)
  return moved.reshape(moved.shape[:-1] + (nb, block)), n


def _np_unblock(blocks, n, axis):
  flat = blocks.reshape(blocks.shape[:-2] + (-1,))[..., :n]
  return np.moveaxis(flat, -1, axis)


def _np_unpack(packed):
  """GGML nibble order: low nibbles are the first half of a block."""
  return np.concatenate([packed & 0x0F, packed >> 4], axis=-1)


# ---------------------------------------------------------------- int8 / NF4


@pytest.mark.parametrize('shape,axis,block,scale_dtype', [
    ((128, 24), 0, 64, np.float32),
    ((100, 24), 0, 64, np.float32),       # padded last block
    ((3, 40, 8), 1, 16, np.float16),
    ((24, 96), -1, 32, np.float16),
])
def test_int8_matches_numpy_and_error_bound(shape, axis, block, scale_dtype):
  w = _weights(shape)
  q = qbase.quantize_int8(jnp.asarray(w), block, axis=axis,
                          scale_dtype=scale_dtype)
  blocks, n = _np_blocks(w, axis % w.ndim, block)
  absmax = np.abs(blocks).max(-1)
  scales = (absmax * np.float32(1 / 127)).astype(scale_dtype)
  s = scales.astype(np.float32)[..., None]
  codes = np.clip(np.round(blocks / np.where(s == 0, 1, s)), -127, 127)
  np.testing.assert_array_equal(np.asarray(q.scales), scales)
  np.testing.assert_array_equal(np.asarray(q.codes), codes.astype(np.int8))
  want = _np_unblock(codes.astype(np.float32) * s, n, axis % w.ndim)
  got = np.asarray(qbase.dequantize(q))
  assert got.shape == w.shape and got.dtype == np.float32
  np.testing.assert_array_equal(got, want)
  bound = _np_unblock(np.broadcast_to(s / 2, blocks.shape), n, axis % w.ndim)
  assert np.all(np.abs(w - got) <= bound * (1 + 1e-6) + 1e-30)
  assert np.abs(w - got).max() > 0
  jitted = jax.jit(qbase.dequantize)(
      jax.jit(lambda x: qbase.quantize_int8(x, block, axis=axis,
                                            scale_dtype=scale_dtype))(w))
  np.testing.assert_array_equal(np.asarray(jitted), want)


def test_nf4_levels_are_the_normal_quantiles():
  stats = pytest.importorskip('scipy.stats')
  offset = 0.9677083
  pos = stats.norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
  neg = -stats.norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
  levels = np.sort(np.concatenate([pos, [0.0], neg])) / pos.max()
  np.testing.assert_allclose(qbase.NF4_LEVELS, levels, rtol=0, atol=1e-6)
  assert qbase.NF4_LEVELS[7] == 0.0 and qbase.NF4_LEVELS.dtype == np.float32


def _np_nf4(blocks, s):
  """Nearest NF4 level of ``blocks / s``: codes, and their distance gaps."""
  normalized = blocks / np.where(s == 0, 1, s)
  dist = np.abs(normalized[..., None] - qbase.NF4_LEVELS.astype(np.float64))
  codes = np.argmin(dist, -1)
  part = np.sort(dist, -1)
  return codes, part[..., 1] - part[..., 0]


@pytest.mark.parametrize('shape,axis,block', [
    ((128, 24), 0, 64), ((100, 24), 0, 64), ((6, 48), 1, 16)])
def test_nf4_nearest_level_times_absmax(shape, axis, block):
  w = _weights(shape, seed=1)
  q = qbase.quantize_nf4(jnp.asarray(w), block, axis=axis)
  blocks, n = _np_blocks(w, axis, block)
  absmax = np.abs(blocks).max(-1)
  np.testing.assert_array_equal(np.asarray(q.scales), absmax)
  codes, gap = _np_nf4(blocks, absmax[..., None])
  got_codes = _np_unpack(np.asarray(q.codes))
  assert q.codes.dtype == jnp.uint8
  assert q.codes.shape == blocks.shape[:-1] + (block // 2,)   # 2 codes a byte
  clear = gap > 1e-6   # away from a midpoint between two levels
  assert clear.mean() > 0.99
  np.testing.assert_array_equal(got_codes[clear], codes[clear])
  # Every element (ties included) is at the nearest level's distance.
  levels = qbase.NF4_LEVELS[got_codes]
  normalized = blocks / np.where(absmax == 0, 1, absmax)[..., None]
  best = np.abs(normalized[..., None] - qbase.NF4_LEVELS).min(-1)
  np.testing.assert_allclose(np.abs(normalized - levels), best, atol=1e-6)
  want = _np_unblock(levels * absmax[..., None], n, axis)
  got = np.asarray(qbase.dequantize(q))
  np.testing.assert_array_equal(got, want)
  # Nearest level: error at most half the widest gap between levels.
  widest = np.diff(qbase.NF4_LEVELS).max() / 2
  err = np.abs(w - got) / _np_unblock(
      np.broadcast_to(absmax[..., None], blocks.shape), n, axis).clip(1e-30)
  assert err.max() <= widest + 1e-6


def test_nf4_double_quant():
  w = _weights((256, 48), seed=2)
  single = qbase.quantize_nf4(jnp.asarray(w), 64)
  q = qbase.quantize_nf4(jnp.asarray(w), 64, double_quant=True,
                         double_quant_block_size=32)
  inner = q.scales
  assert isinstance(inner, qbase.QuantizedTensor) and inner.fmt == 'int8'
  absmax = np.asarray(single.scales).reshape(-1)
  # Reference of the inner quantization: int8 of (scale - group mean).
  groups = np.pad(absmax, (0, -len(absmax) % 32)).reshape(-1, 32)
  valid = np.arange(groups.size).reshape(groups.shape) < len(absmax)
  means = (groups * valid).sum(-1) / valid.sum(-1)
  step = np.abs(np.where(valid, groups - means[:, None], 0)).max(-1) / 127
  np.testing.assert_allclose(np.asarray(inner.mins), means, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(inner.scales), step, rtol=1e-5)
  step = np.asarray(inner.scales)
  s_dq = np.asarray(qbase.dequantize(inner))
  assert np.all(np.abs(s_dq - absmax) <=
                np.repeat(step, 32)[:len(absmax)] / 2 * (1 + 1e-5))
  # Codes are the nearest levels against the dequantized scales.
  blocks, n = _np_blocks(w, 0, 64)
  s = s_dq.reshape(blocks.shape[:-1])[..., None]
  codes, gap = _np_nf4(blocks, s)
  got_codes = _np_unpack(np.asarray(q.codes))
  clear = gap > 1e-6
  np.testing.assert_array_equal(got_codes[clear], codes[clear])
  want = _np_unblock(qbase.NF4_LEVELS[got_codes] * s, n, 0)
  np.testing.assert_array_equal(np.asarray(qbase.dequantize(q)), want)
  assert q.nbytes < single.nbytes
  np.testing.assert_allclose(np.asarray(qbase.dequantize(q)),
                             np.asarray(qbase.dequantize(single)),
                             atol=0.05 * np.abs(w).max())


def test_bad_arguments_are_named():
  w = jnp.ones((8, 4))
  with pytest.raises(ValueError, match='block_size'):
    qbase.quantize_nf4(w, 7)
  with pytest.raises(ValueError, match='block_size'):
    qbase.quantize_int8(w, 0)
  with pytest.raises(ValueError, match='axis'):
    qbase.quantize_int8(w, 4, axis=2)
  with pytest.raises(ValueError, match='fmt'):
    qbase.quantize(w, 'int4')
  with pytest.raises(ValueError, match='ggml_type'):
    qbase.from_gguf_blocks(np.zeros(34, np.uint8), 'Q5_K', (1, 32))
  with pytest.raises(ValueError, match='bytes'):
    qbase.from_gguf_blocks(np.zeros(33, np.uint8), 'Q8_0', (1, 32))
  with pytest.raises(ValueError, match='multiple of 32'):
    qbase.from_gguf_blocks(np.zeros(34, np.uint8), 'Q8_0', (2, 16))


# ---------------------------------------------------------------- GGUF blocks


@pytest.mark.parametrize('name', ['Q8_0', 'Q4_0', 'Q4_1'])
def test_gguf_blocks_bit_exact(name):
  gguf = pytest.importorskip('gguf')
  qtype = gguf.GGMLQuantizationType[name]
  w = _weights((24, 96), seed=3)
  raw = gguf.quants.quantize(w, qtype)
  want = gguf.quants.dequantize(raw, qtype)
  assert want.dtype == np.float32
  for ggml_type in (name, qtype, int(qtype)):
    q = qbase.from_gguf_blocks(raw, ggml_type, w.shape)
    np.testing.assert_array_equal(np.asarray(qbase.dequantize(q)), want)
  q = qbase.from_gguf_blocks(raw.reshape(-1), name, w.shape)
  assert q.fmt == name.lower() and q.block_size == 32 and q.axis == 1
  assert q.nbytes == raw.nbytes   # split, nothing dequantized or widened
  np.testing.assert_array_equal(
      np.asarray(jax.jit(qbase.dequantize)(q)), want)
  np.testing.assert_array_equal(np.asarray(qbase.dequantize(q.T)), want.T)
  # A 3-D tensor: blocks along the last axis of every row.
  w3 = _weights((2, 5, 64), seed=4)
  raw3 = gguf.quants.quantize(w3, qtype)
  np.testing.assert_array_equal(
      np.asarray(qbase.dequantize(qbase.from_gguf_blocks(raw3, name, w3.shape))),
      gguf.quants.dequantize(raw3, qtype))


@pytest.mark.parametrize('name', ['Q8_0', 'Q4_0', 'Q4_1'])
def test_gguf_linear_uses_hf_layout(name):
  gguf = pytest.importorskip('gguf')
  qtype = gguf.GGMLQuantizationType[name]
  w_hf = _weights((40, 64), seed=5)          # HF [out, in]
  raw = gguf.quants.quantize(w_hf, qtype)
  ref = gguf.quants.dequantize(raw, qtype)   # [out, in]
  bias = np.linspace(-1, 1, 40).astype(np.float32)
  layer = qbase.QuantizedLinear(
      qbase.from_gguf_blocks(raw, name, w_hf.shape).T, bias)
  assert (layer.in_features, layer.out_features) == (64, 40)
  x = np.random.default_rng(0).normal(size=(3, 7, 64)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x))),
                             x @ ref.T + bias, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- the layer


_apply = nnx.jit(lambda layer, x: layer(x))
_input_grad = nnx.jit(
    lambda layer, x, g: jax.grad(lambda x: jnp.sum(layer(x) * g))(x))


@pytest.mark.parametrize('fmt,kwargs', [
    ('int8', {}), ('nf4', {}),
    ('nf4', {'double_quant': True, 'double_quant_block_size': 16})])
def test_quantized_linear_is_x_at_dequantized_kernel(fmt, kwargs):
  rng = np.random.default_rng(6)
  lin = nnx.Linear(96, 24, rngs=nnx.Rngs(0))
  lin.bias.set_value(jnp.asarray(rng.normal(size=24), jnp.float32))
  layer = qbase.QuantizedLinear.from_linear(lin, fmt, 32, **kwargs)
  assert type(layer.codes) is qbase.QuantizedWeight
  assert not isinstance(layer.codes, nnx.Param)
  assert (layer.in_features, layer.out_features) == (96, 24)
  assert layer.param_dtype == jnp.float32
  w = np.asarray(layer.dequantized_kernel())
  np.testing.assert_array_equal(w, np.asarray(qbase.dequantize(
      qbase.quantize(lin.kernel[...], fmt, 32, **kwargs))))
  assert (layer.scale_meta is not None) == bool(kwargs)
  b = np.asarray(lin.bias[...])
  x = rng.normal(size=(2, 5, 96)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(_apply(layer, jnp.asarray(x))),
                             x @ w + b, rtol=1e-5, atol=1e-5)
  # The kernel is constant; the gradient flows to the input only.
  g = rng.normal(size=(2, 5, 24)).astype(np.float32)
  dx = _input_grad(layer, jnp.asarray(x), jnp.asarray(g))
  np.testing.assert_allclose(np.asarray(dx), g @ w.T, rtol=1e-5, atol=1e-5)
  # bf16 compute: the kernel is dequantized in bf16.
  lin16 = qbase.QuantizedLinear(layer.kernel, lin.bias[...], dtype=jnp.bfloat16)
  y16 = _apply(lin16, jnp.asarray(x))
  assert y16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y16, np.float32), x @ w + b,
                             rtol=0.05, atol=0.05 * np.abs(x @ w).max())


def test_dequantized_kernels_are_transient():
  """Compiled memory: about one dequantized kernel at a time.

  Not one per layer (the forward kernels kept for the backward pass) and not
  one per client (dequantizing inside ``vmap`` per client).
  """
  d, layers, clients = 512, 4, 4
  qs = [qbase.quantize_nf4(jnp.asarray(_weights((d, d), seed=i)), 64)
        for i in range(layers)]

  def loss(x, qs):
    for q in qs:
      x = jnp.tanh(qbase.quantized_matmul(x, q))
    return jnp.sum(x)

  step = jax.jit(jax.vmap(jax.grad(loss), in_axes=(0, None)))
  x = jax.ShapeDtypeStruct((clients, 8, d), jnp.float32)
  temp = step.lower(x, qs).compile().memory_analysis().temp_size_in_bytes
  assert temp < 2.5 * d * d * 4, temp   # untied: about 4 kernels, 5 with vmap


def test_quantize_base_report_and_targets():
  model = Decoder(DEC, rngs=nnx.Rngs(0))
  before = {p: np.asarray(v) for p, v in
            _flat(nnx.to_pure_dict(nnx.state(model))).items()}
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 12)))
  want = np.asarray(_forward(model, ids))
  report = qbase.quantize_base(model, 'int8', 32)
  per_layer = ['attn.q_proj', 'attn.k_proj', 'attn.v_proj', 'attn.o_proj',
               'mlp.gate_proj', 'mlp.up_proj', 'mlp.down_proj']
  assert sorted(report.paths) == sorted(f'layers.{i}.{p}' for i in range(2)
                                       for p in per_layer)
  assert isinstance(model.lm_head, nnx.Linear)
  assert isinstance(model.embed, nnx.Embed)
  assert isinstance(model.layers[1].mlp.down_proj, qbase.QuantizedLinear)
  kernels = [k for p, k in before.items()
             if p.startswith('layers.') and p.endswith('kernel')]
  assert report.replaced_bytes_before == sum(k.nbytes for k in kernels)
  assert report.replaced_bytes_after == sum(
      k.size + 4 * (k.size // 32) for k in kernels)
  assert report.frozen_bytes_before == sum(v.nbytes for v in before.values())
  assert report.frozen_bytes_before - report.frozen_bytes_after == (
      report.replaced_bytes_before - report.replaced_bytes_after)
  # Same model up to the quantization error.
  got = np.asarray(_forward(model, ids))
  assert np.abs(got - want).max() < 0.05 * np.abs(want).max()
  with pytest.raises(ValueError, match='matched no frozen nnx.Linear'):
    qbase.quantize_base(model, 'nf4', targets=('nothing_here',))
  with pytest.raises(ValueError, match='fmt'):
    qbase.quantize_base(model, 'fp8')


def _flat(tree):
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'.'.join(str(getattr(k, 'key', k)) for k in p): v for p, v in leaves}


def _set_dequantized_reference(qmodel, ref_model):
  """Gives ``ref_model`` (plain nnx.Linear) the dequantized kernels of ``qmodel``."""
  for path, mod in nnx.iter_modules(qmodel):
    if isinstance(mod, qbase.QuantizedLinear):
      target = ref_model
      for key in path:
        target = target[key] if isinstance(key, int) else getattr(target, key)
      target.kernel.set_value(mod.dequantized_kernel())


def _lora_decoders(fmt):
  """A LoRA Decoder on a quantized base, and the same on its dequantized kernels."""
  model = Decoder(DEC, rngs=nnx.Rngs(0))
  ref = Decoder(DEC, rngs=nnx.Rngs(0))
  for m in (model, ref):
    peft.apply_lora(m, rank=4, alpha=8.0, target_modules=('q_proj', 'v_proj'),
                    rngs=nnx.Rngs(1))
  report = qbase.quantize_base(model, fmt, 32)   # reaches LoRALinear.base
  _set_dequantized_reference(model, ref)
  return model, ref, report


def test_lora_split_of_quantized_decoder():
  model, _, report = _lora_decoders('nf4')
  assert 'layers.0.attn.q_proj.base' in report.paths
  assert isinstance(model.layers[0].attn.q_proj, LoRALinear)
  assert isinstance(model.layers[0].attn.q_proj.base, qbase.QuantizedLinear)
  for method in ('lora', 'full'):
    split = peft.split_model(model, method)
    trainable, frozen = _flat(split.trainable), _flat(split.frozen)
    assert not any('codes' in p or 'scales' in p for p in trainable)
    assert 'layers.0.attn.q_proj.base.codes' in frozen
    assert 'layers.1.mlp.up_proj.scales' in frozen
    assert frozen['layers.1.mlp.up_proj.codes'].dtype == np.uint8
  split = peft.split_model(model, 'lora')
  trainable = _flat(split.trainable)
  assert trainable and all(p.endswith(('lora_a', 'lora_b')) for p in trainable)


@pytest.mark.slow
@pytest.mark.parametrize('fmt', ['nf4'])   # int8 runs in test_experiments' quantized-base run
def test_lora_on_quantized_decoder_trains_one_round(fmt):
  model, ref, _ = _lora_decoders(fmt)
  split = peft.split_model(model, 'lora')
  ref_split = peft.split_model(ref, 'lora')
  trainable = _flat(split.trainable)
  assert trainable and all(p.endswith(('lora_a', 'lora_b')) for p in trainable)

  # The quantized model computes what its dequantized f32 reference computes.
  ids = np.random.default_rng(0).integers(0, 64, (2, 12))
  np.testing.assert_allclose(np.asarray(_forward(model, jnp.asarray(ids))),
                             np.asarray(_forward(ref, jnp.asarray(ids))),
                             rtol=1e-5, atol=1e-5)

  task = tasks.causal_lm_task()
  clients, steps, batch = 4, 2, 2
  rng = np.random.default_rng(1)
  data = {
      'batch': {'input_ids': rng.integers(0, 64, (clients, steps, batch, 12)),
                'attention_mask': np.ones((clients, steps, batch, 12), np.int32)},
      'example_mask': np.ones((clients, steps, batch), bool),
      'step_mask': np.ones((clients, steps), bool),
      'weight': np.full((clients,), 4.0, np.float32),
      'client_id': np.arange(clients, dtype=np.int32),
      'client_mask': np.ones((clients,), bool),
  }
  results = []
  for s in (split, ref_split):
    fed = engine.build_round(tasks.make_loss_fn(s.graphdef, task), s.trainable,
                             client_optimizer=optax.sgd(0.5),
                             server_optimizer=optax.sgd(1.0), num_clients=clients,
                             strategy='chunked', chunk_size=2)
    state = fed.init(s.trainable, jax.random.key(0))
    frozen_before = jax.tree.map(np.asarray, s.frozen)
    state, metrics = fed.apply(state, s.frozen, data)
    jax.tree.map(np.testing.assert_array_equal, s.frozen, frozen_before)
    results.append((state, metrics))
  (state, metrics), (ref_state, ref_metrics) = results
  assert np.isfinite(float(metrics['train_loss']))
  new = _flat(state.params)
  assert set(new) == set(trainable)
  moved = [p for p in new if not np.array_equal(new[p], trainable[p])]
  assert any(p.endswith('lora_b') for p in moved)
  # One round on the quantized base equals one on its dequantized reference.
  ref_new = _flat(ref_state.params)
  for p in new:
    np.testing.assert_allclose(new[p], ref_new[p], rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(float(metrics['train_loss']),
                             float(ref_metrics['train_loss']), rtol=1e-5)


def test_lora_wraps_a_quantized_layer_directly():
  """``LoRALinear(base=QuantizedLinear)``: runs once lora.py accepts any linear leaf."""
  layer = qbase.QuantizedLinear.from_linear(
      nnx.Linear(64, 16, rngs=nnx.Rngs(0)), 'nf4', 32)
  try:
    lora = LoRALinear(layer, rank=2, alpha=4.0, rngs=nnx.Rngs(1))
  except TypeError:
    pytest.skip('peft/lora.py accepts only an nnx.Linear base')
  rng = np.random.default_rng(0)
  lora.lora_b.set_value(jnp.asarray(rng.normal(size=(2, 16)), jnp.float32))
  x = rng.normal(size=(3, 64)).astype(np.float32)
  a, b = np.asarray(lora.lora_a[...]), np.asarray(lora.lora_b[...])
  want = x @ np.asarray(layer.dequantized_kernel()) + layer.bias[...] + (
      x @ a @ b) * 2.0
  np.testing.assert_allclose(np.asarray(lora(jnp.asarray(x))), want,
                             rtol=1e-5, atol=1e-5)
