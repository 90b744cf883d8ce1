"""The layer stack as one ``lax.scan`` (`fedjax_fm.models.scan`).

The reference is the Python loop over the same layers (``scan_layers=False``),
which the model tests check against NumPy and the HF parity tests against
transformers: the scanned forward, its LoRA gradients, every remat policy and
the vmapped per-client gradients must give its numbers.

Models are built abstractly (``nnx.eval_shape``) and filled from a NumPy
generator, so that two builds differing only in ``scan_layers``/``remat``
hold the same weights and no eager initialisation is compiled.
"""

import dataclasses
import functools
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from fedjax_fm import config as config_lib
from fedjax_fm import models
from fedjax_fm import peft
from fedjax_fm.hf import configs as hf_configs
from fedjax_fm.models import scan as scan_lib
from fedjax_fm.train import registries

RTOL, ATOL = 1e-5, 1e-5            # f32 forward and loss (two programs, two fusions)
GRAD_RTOL, GRAD_ATOL = 1e-5, 1e-6  # f32 gradients (remat reorders float sums)

_DEC = dict(vocab_size=32, dim=16, num_layers=2, num_heads=2, num_kv_heads=1,
            mlp_dim=32, max_len=16)
CONFIGS = {
    'llama': models.DecoderConfig(**_DEC),
    # Gemma2/3-like: alternating sliding-window layers with their own RoPE base,
    # sandwich norms, soft-capping, q/k norms.
    'gemma_sliding': models.DecoderConfig(
        **_DEC, sliding_window=3, sliding_layers=(True, False),
        local_rope_theta=100.0, post_norms=True, norm_scale_offset=1.0,
        embed_scale=True, qk_norm=True, attn_logit_softcap=20.0,
        final_logit_softcap=10.0, mlp_activation='gelu_new'),
    'gpt2': models.GPT2Config(vocab_size=32, dim=16, num_layers=2, num_heads=2,
                              mlp_dim=32, max_len=16),
    'encoder': models.EncoderConfig(vocab_size=32, hidden_size=16, num_layers=2,
                                    num_heads=2, intermediate_size=32,
                                    max_position=16, num_labels=3),
}
LORA_TARGETS = {'llama': ('q_proj', 'v_proj'), 'gemma_sliding': ('q_proj', 'v_proj'),
                'gpt2': ('q_proj', 'v_proj'), 'encoder': ('query', 'value')}
MODEL_CLASSES = {models.DecoderConfig: models.Decoder, models.GPT2Config: models.GPT2,
                 models.EncoderConfig: models.Encoder}


def build(family, *, lora_targets=None, **fields):
  """A model of ``family`` (LoRA on ``lora_targets``), weights from a NumPy RNG."""
  cfg = dataclasses.replace(CONFIGS[family], **fields)

  def make():
    model = MODEL_CLASSES[type(cfg)](cfg, rngs=nnx.Rngs(0))
    if lora_targets:
      peft.apply_lora(model, rank=2, alpha=4.0, dropout=cfg.dropout,
                      target_modules=lora_targets, rngs=nnx.Rngs(1))
    return model

  graphdef, state = nnx.split(nnx.eval_shape(make))
  rng = np.random.default_rng(0)
  state = jax.tree.map(
      lambda s: jnp.asarray(rng.normal(0.0, 0.3, s.shape).astype(s.dtype)), state)
  return nnx.merge(graphdef, state)


def lora_split(family, **fields):
  """A LoRA model of ``family`` (all layers alike) split as the engine does."""
  model = build(family, lora_targets=LORA_TARGETS[family], **fields)
  return model, peft.split_model(model, 'lora')


def batch_of(family, batch=2, length=7):
  rng = np.random.default_rng(1)
  ids = rng.integers(0, 32, (batch, length)).astype(np.int32)
  mask = np.ones((batch, length), np.int32)
  mask[1, -2:] = 0   # padding
  out = {'input_ids': jnp.asarray(ids), 'attention_mask': jnp.asarray(mask)}
  if family == 'encoder':
    out['label'] = jnp.asarray(rng.integers(0, 3, batch).astype(np.int32))
  return out


def task_of(family):
  if family == 'encoder':
    return models.classification_task()
  return models.causal_lm_task()


def mean_loss(split, family, batch):
  """``f(trainable, key=None)``: the engine's loss (merge, task loss), averaged."""
  loss_fn = models.make_loss_fn(split.graphdef, task_of(family))
  return lambda trainable, key=None: loss_fn(trainable, split.frozen, batch, key).mean()


def _sub_jaxprs(eqn):
  for param in eqn.params.values():
    for sub in param if isinstance(param, (tuple, list)) else (param,):
      if hasattr(sub, 'eqns') or hasattr(getattr(sub, 'jaxpr', None), 'eqns'):
        yield sub


def primitives(jaxpr) -> set[str]:
  """Names of all primitives in a (closed) jaxpr and its sub-jaxprs."""
  jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    for sub in _sub_jaxprs(eqn):
      names |= primitives(sub)
  return names


def policies(jaxpr) -> list:
  """The ``policy`` of every rematerialised region, sub-jaxprs included."""
  jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)
  out = []
  for eqn in jaxpr.eqns:
    if 'policy' in eqn.params:
      out.append(eqn.params['policy'])
    for sub in _sub_jaxprs(eqn):
      out += policies(sub)
  return out


def assert_trees_close(a, b, rtol=GRAD_RTOL, atol=GRAD_ATOL):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(
      np.asarray(x), np.asarray(y), rtol=rtol, atol=atol), a, b)


def outputs(family, **fields):
  """Logits, loss and LoRA gradients of one build, in one compiled function."""
  model, split = lora_split(family, **fields)
  batch = batch_of(family)
  f = mean_loss(split, family, batch)

  def run(trainable):
    m = nnx.merge(split.graphdef, trainable, split.frozen)
    logits = m(batch['input_ids'], batch['attention_mask'])
    loss, grads = jax.value_and_grad(f)(trainable)
    return logits, loss, grads

  return jax.make_jaxpr(run)(split.trainable), jax.jit(run)(split.trainable)


@pytest.mark.parametrize('family', [f if f == 'gpt2' else pytest.param(f, marks=pytest.mark.slow)
                                    for f in CONFIGS])
def test_scanned_forward_and_lora_grads_equal_loop(family):
  jaxpr, (logits, loss, grads) = outputs(family, scan_layers=True)
  loop_jaxpr, (logits_l, loss_l, grads_l) = outputs(family, scan_layers=False)
  assert 'scan' in primitives(jaxpr)
  assert 'scan' not in primitives(loop_jaxpr)
  np.testing.assert_allclose(logits, logits_l, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(loss, loss_l, rtol=RTOL)
  assert_trees_close(grads, grads_l)
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


_REMAT_POLICY = {'layer': jax.checkpoint_policies.nothing_saveable,
                 'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


@functools.lru_cache(maxsize=1)
def _remat_reference():
  family = 'gemma_sliding'
  _, split = lora_split(family, scan_layers=False)
  return jax.jit(jax.value_and_grad(mean_loss(split, family, batch_of(family))))(
      split.trainable)


@pytest.mark.parametrize('scan', [True, pytest.param(False, marks=pytest.mark.slow)])
@pytest.mark.parametrize('remat', ['layer', pytest.param('dots', marks=pytest.mark.slow)])
def test_remat_policy_keeps_loss_and_grads(remat, scan):
  family = 'gemma_sliding'
  _, split = lora_split(family, scan_layers=scan, remat=remat)
  f = mean_loss(split, family, batch_of(family))
  found = policies(jax.make_jaxpr(jax.grad(f))(split.trainable))
  assert found and all(p is _REMAT_POLICY[remat] for p in found)
  assert len(found) == (1 if scan else CONFIGS[family].num_layers)
  loss, grads = jax.jit(jax.value_and_grad(f))(split.trainable)
  loss_r, grads_r = _remat_reference()
  np.testing.assert_allclose(loss, loss_r, rtol=RTOL)
  assert_trees_close(grads, grads_r)


@pytest.mark.slow
def test_grads_under_vmap_over_lora_clients():
  """As the engine: per-client LoRA states vmapped, the base shared."""
  family = 'gemma_sliding'
  batch = batch_of(family)
  _, scanned = lora_split(family, scan_layers=True)
  _, looped = lora_split(family, scan_layers=False)
  f_scan, f_loop = mean_loss(scanned, family, batch), mean_loss(looped, family, batch)
  clients = [jax.tree.map(lambda x, c=c: x * (1.0 + 0.5 * c), scanned.trainable)
             for c in range(3)]
  stacked = jax.tree.map(lambda *x: jnp.stack(x), *clients)
  grads = jax.jit(jax.vmap(jax.grad(f_scan)))(stacked)
  grad_loop = jax.jit(jax.grad(f_loop))   # unbatched, one client at a time
  for c, trainable in enumerate(clients):
    assert_trees_close(jax.tree.map(lambda g, c=c: g[c], grads), grad_loop(trainable))


@pytest.mark.slow
@pytest.mark.parametrize('route', ['qlora_nf4', 'prefix'])
def test_other_peft_routes_are_scanned(route):
  """A quantized base under LoRA, or prefix hooks, on every layer: still one scan."""
  family = 'llama'
  batch = batch_of(family)
  results = []
  for scan in (True, False):
    model = build(family, scan_layers=scan)
    if route == 'prefix':
      peft.apply_prefix_tuning(model, 3, rngs=nnx.Rngs(1))
    else:
      peft.quantize_base(model, 'nf4', 16)
      peft.apply_lora(model, rank=2, alpha=4.0, target_modules=('q_proj', 'v_proj'),
                      rngs=nnx.Rngs(1))
    split = peft.split_model(model, 'prefix' if route == 'prefix' else 'lora')
    trainable = jax.tree.map(lambda x: x + 0.1, split.trainable)
    f = mean_loss(split, family, batch)
    assert ('scan' in primitives(jax.make_jaxpr(jax.grad(f))(trainable))) == scan
    results.append(jax.jit(jax.value_and_grad(f))(trainable))
  (loss_a, grad_a), (loss_b, grad_b) = results
  np.testing.assert_allclose(loss_a, loss_b, rtol=RTOL)
  assert_trees_close(grad_a, grad_b)


def test_heterogeneous_layers_fall_back_to_the_loop():
  family = 'llama'
  batch = batch_of(family)
  results = []
  for scan in (True, False):
    model = build(family, lora_targets=(r'layers\.1\.attn\.q_proj',), scan_layers=scan)
    assert not scan_lib.same_structure([nnx.split(layer) for layer in model.layers])
    split = peft.split_model(model, 'lora')
    f = mean_loss(split, family, batch)
    assert 'scan' not in primitives(jax.make_jaxpr(jax.grad(f))(split.trainable))
    results.append(jax.jit(jax.value_and_grad(f))(split.trainable))
  (loss_a, grad_a), (loss_b, grad_b) = results
  np.testing.assert_allclose(loss_a, loss_b, rtol=RTOL)
  assert_trees_close(grad_a, grad_b)


@pytest.mark.slow
@pytest.mark.parametrize('family', ['llama', 'encoder'])
def test_dropout_scanned_equals_loop_and_trains(family):
  """Each layer gets its own key in both modes; the key changes the loss."""
  batch = batch_of(family)
  runs = []
  for scan in (True, False):
    _, split = lora_split(family, dropout=0.2, scan_layers=scan)
    runs.append((jax.jit(jax.value_and_grad(mean_loss(split, family, batch))),
                 split.trainable))
  (f_scan, trainable), (f_loop, _) = runs
  key = jax.random.key(7)
  loss_s, grad_s = f_scan(trainable, key)
  loss_l, grad_l = f_loop(trainable, key)
  np.testing.assert_allclose(loss_s, loss_l, rtol=RTOL)
  assert_trees_close(grad_s, grad_l)
  loss_other, _ = f_scan(trainable, jax.random.key(8))
  assert abs(float(loss_s) - float(loss_other)) > 1e-4
  assert all(np.isfinite(np.asarray(g)).all() and np.abs(g).max() > 0
             for g in jax.tree.leaves(grad_s))


def test_layer_keys_are_distinct_per_layer():
  keys = scan_lib.layer_keys(nnx.Rngs(dropout=0), 4)
  data = np.asarray(jax.random.key_data(keys)).reshape(4, -1)
  assert len({row.tobytes() for row in data}) == 4
  assert scan_lib.layer_keys(None, 4) is None
  assert scan_lib.layer_keys(nnx.Rngs(params=0), 4) is None   # nothing to drop with


def test_scan_layers_helper_against_loop_and_dtype_fallback():
  rng = np.random.default_rng(3)
  layers = []
  for _ in range(3):
    graphdef, state = nnx.split(nnx.eval_shape(lambda: nnx.Linear(4, 4, rngs=nnx.Rngs(0))))
    layers.append(nnx.merge(graphdef, jax.tree.map(
        lambda s: jnp.asarray(rng.normal(size=s.shape).astype(np.float32)), state)))
  xs = np.arange(3.0, dtype=np.float32)

  def body(layer, h, x, rngs):
    del rngs
    return jnp.tanh(layer(h)) + x

  h = jnp.asarray(rng.normal(size=(2, 4)).astype(np.float32))
  expected = h
  for layer, x in zip(layers, xs):
    expected = body(layer, expected, x, None)
  run = jax.jit(lambda h: scan_lib.scan_layers(layers, body, h, xs))
  assert 'scan' in primitives(jax.make_jaxpr(run)(h))
  np.testing.assert_allclose(run(h), expected, rtol=RTOL, atol=ATOL)
  # A body that changes the carry's dtype cannot be scanned: the loop runs.
  low = h.astype(jnp.bfloat16)
  out = scan_lib.scan_layers(layers, body, low, xs)
  ref = low
  for layer, x in zip(layers, xs):
    ref = body(layer, ref, x, None)
  assert out.dtype == ref.dtype == jnp.float32
  np.testing.assert_allclose(out, ref, rtol=RTOL, atol=ATOL)
  splits = [nnx.split(m) for m in layers]
  assert scan_lib.same_structure(splits)
  other = nnx.split(nnx.eval_shape(lambda: nnx.Linear(4, 4, use_bias=False,
                                                      rngs=nnx.Rngs(0))))
  assert not scan_lib.same_structure(splits[:2] + [other])


@pytest.mark.parametrize('cls', [models.DecoderConfig, models.GPT2Config,
                                 models.EncoderConfig])
def test_bad_scan_fields_raise_naming_the_field(cls):
  with pytest.raises(ValueError, match=r"remat must be one of \('none', 'layer', "
                     r"'dots'\), got 'full'"):
    cls(remat='full').validate()
  with pytest.raises(ValueError, match='scan_layers must be a bool'):
    cls(scan_layers='yes').validate()
  for remat in scan_lib.REMAT_POLICIES:
    cls(remat=remat, scan_layers=False).validate()


def test_experiment_config_validates_and_reaches_the_models():
  c = config_lib.base_config()
  assert c.model.scan_layers is False and c.model.remat == 'none'
  for remat in scan_lib.REMAT_POLICIES:   # the config allows exactly the models' values
    c.model.remat = remat
    config_lib.validate(c)
  c.model.remat = 'full'
  with pytest.raises(config_lib.ConfigError, match=r"config\.model\.remat='full'"):
    config_lib.validate(c)
  c = config_lib.base_config()
  c.model = ml_collections.ConfigDict({**c.model.to_dict(), 'scan_layers': 1})
  with pytest.raises(config_lib.ConfigError, match=r'config\.model\.scan_layers=1'):
    config_lib.validate(c)

  c = config_lib.base_config()
  c.model.update(num_layers=2, hidden_size=16, num_heads=2, num_kv_heads=1, mlp_dim=32,
                 scan_layers=False, remat='dots')
  task_data = types.SimpleNamespace(tokenizer=types.SimpleNamespace(vocab_size=40),
                                    num_labels=3)
  for kind in ('decoder', 'encoder'):
    model = nnx.eval_shape(lambda kind=kind: registries.MODELS[kind](c, task_data)[0])
    assert (model.config.scan_layers, model.config.remat) == (False, 'dots')


def test_hf_config_translation_takes_the_scan_fields():
  hf = {'model_type': 'llama', 'vocab_size': 32, 'hidden_size': 16,
        'intermediate_size': 32, 'num_hidden_layers': 2, 'num_attention_heads': 2,
        'num_key_value_heads': 1, 'max_position_embeddings': 16}
  cfg = hf_configs.decoder_config_from_hf(hf, scan_layers=False, remat='layer')
  assert (cfg.scan_layers, cfg.remat) == (False, 'layer')
  with pytest.raises(ValueError, match='remat must be one of'):
    hf_configs.decoder_config_from_hf(hf, remat='everything')
  gpt2 = hf_configs.gpt2_config_from_hf(
      {'model_type': 'gpt2', 'vocab_size': 32, 'n_embd': 16, 'n_layer': 2,
       'n_head': 2, 'n_positions': 16}, remat='dots')
  assert gpt2.remat == 'dots' and not gpt2.scan_layers
