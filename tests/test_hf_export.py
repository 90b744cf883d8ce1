"""Exporting LoRA adapters (HF PEFT format) and full HF checkpoints.

The first tests need no torch; the ones marked by the ``hf_libs`` fixture
load our exports with transformers / peft (PyTorch CPU) and compare logits.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from fedjax_fm import hf
from fedjax_fm import peft
from fedjax_fm.models import Decoder
from fedjax_fm.models import DecoderConfig
from fedjax_fm.models import Encoder
from fedjax_fm.models import EncoderConfig
from fedjax_fm.models import GPT2
from fedjax_fm.models import GPT2Config

TOL = 1e-4
call = nnx.jit(lambda model, *args: model(*args))
IDS = np.random.RandomState(0).randint(0, 64, (3, 10))
MASK = np.ones((3, 10), np.int64)
MASK[1, 7:] = 0
MASK[2, :3] = 0


def randomize(model, seed=0, scale=0.3):
  graphdef, state = nnx.split(model)
  leaves, treedef = jax.tree_util.tree_flatten(state)
  rng = np.random.RandomState(seed)
  leaves = [jnp.asarray(rng.randn(*x.shape) * scale, x.dtype) for x in leaves]
  return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, leaves))


def build(cls, cfg, seed=0):
  return randomize(nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0))), seed)


def tiny_decoder(seed=0, **kw):
  return build(Decoder, DecoderConfig(
      vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
      mlp_dim=48, max_len=32, **kw), seed)


def tiny_gpt2(seed=0, **kw):
  return build(GPT2, GPT2Config(vocab_size=64, dim=32, num_layers=2,
                                num_heads=4, mlp_dim=64, max_len=32, **kw),
               seed)


def lora(model, *specs, seed=1):
  """Applies LoRA per ``(targets, rank, alpha)`` and sets random B."""
  for i, (targets, rank, alpha) in enumerate(specs):
    peft.apply_lora(model, rank=rank, alpha=alpha, target_modules=targets,
                    rngs=nnx.Rngs(seed + i))
  rng = np.random.RandomState(seed)
  for _, m in nnx.iter_modules(model):
    if isinstance(m, peft.LoRALinear):
      m.lora_b.set_value(jnp.asarray(rng.randn(*m.lora_b.shape) * 0.3,
                                     jnp.float32))
  return model


def real(x):
  return np.asarray(x)[MASK.astype(bool)]


# --- adapter format (no torch) -----------------------------------------------


def test_adapter_names_shapes_and_config(tmp_path):
  model = lora(tiny_decoder(), (('q_proj',), 4, 8.0), (('v_proj',), 2, 8.0))
  config = hf.export_lora_adapter(
      model, tmp_path, base_model_name_or_path='org/tiny-llama',
      hf_family='llama')
  with open(tmp_path / 'adapter_config.json') as f:
    assert json.load(f) == config
  assert config['peft_type'] == 'LORA' and config['task_type'] == 'CAUSAL_LM'
  assert config['base_model_name_or_path'] == 'org/tiny-llama'
  assert (config['r'], config['lora_alpha']) == (4, 8)
  assert config['target_modules'] == ['q_proj', 'v_proj']
  assert config['rank_pattern'] == {
      r'model\.layers\.0\.self_attn\.v_proj': 2,
      r'model\.layers\.1\.self_attn\.v_proj': 2,
  }
  assert config['alpha_pattern'] == {} and not config['fan_in_fan_out']
  tensors = load_file(str(tmp_path / 'adapter_model.safetensors'))
  assert len(tensors) == 8
  q = model.layers[1].attn.q_proj
  prefix = 'base_model.model.model.layers.1.self_attn.'
  a, b = tensors[prefix + 'q_proj.lora_A.weight'], tensors[
      prefix + 'q_proj.lora_B.weight']
  assert a.shape == (4, 32) and b.shape == (32, 4)  # [r, in], [out, r]
  np.testing.assert_array_equal(a, np.asarray(q.lora_a[...]).T)
  np.testing.assert_array_equal(b, np.asarray(q.lora_b[...]).T)
  assert tensors[prefix + 'v_proj.lora_B.weight'].shape == (16, 2)  # GQA


def test_adapter_from_split_equals_model(tmp_path):
  model = lora(tiny_decoder(), (('q_proj', 'v_proj'), 2, 4.0))
  split = peft.split_model(model, 'lora')
  hf.export_lora_adapter(split, tmp_path / 's',
                                base_model_name_or_path='b')
  hf.export_lora_adapter(model, tmp_path / 'm',
                                base_model_name_or_path='b')
  s = load_file(str(tmp_path / 's' / 'adapter_model.safetensors'))
  m = load_file(str(tmp_path / 'm' / 'adapter_model.safetensors'))
  assert set(s) == set(m)
  for k in s:
    np.testing.assert_array_equal(s[k], m[k])


def test_gpt2_fused_c_attn_adapter_is_exact():
  model = lora(tiny_gpt2(), (('q_proj', 'v_proj'), 4, 8.0),
               ((r'layers\.1\.mlp\.fc_out',), 2, 3.0))
  tensors, fields = hf.lora_adapter_state(model)
  # attn.c_proj/mlp.c_proj share the leaf name: a regex selects exactly.
  assert fields['target_modules'] == (
      r'(transformer\.h\.0\.attn\.c_attn|transformer\.h\.1\.attn\.c_attn|'
      r'transformer\.h\.1\.mlp\.c_proj)')
  assert fields['fan_in_fan_out']
  assert (fields['r'], fields['lora_alpha']) == (8, 16)  # q+v stacked
  key = 'base_model.model.transformer.h.0.attn.c_attn.lora_{}.weight'
  a, b = tensors[key.format('A')], tensors[key.format('B')]
  assert a.shape == (8, 32) and b.shape == (96, 8)
  x = np.random.RandomState(0).randn(5, 32).astype(np.float32)
  fused = x @ a.T @ b.T * (16 / 8)
  attn = model.layers[0].attn
  for i, proj in enumerate((attn.q_proj, None, attn.v_proj)):
    part = fused[:, 32 * i:32 * (i + 1)]
    if proj is None:  # k_proj has no LoRA
      np.testing.assert_array_equal(part, 0)
    else:
      want = x @ np.asarray(proj.lora_a[...]) @ np.asarray(
          proj.lora_b[...]) * proj.scaling
      np.testing.assert_allclose(part, want, atol=1e-5)


def test_adapter_errors(tmp_path):
  with pytest.raises(ValueError, match='no LoRALinear'):
    hf.export_lora_adapter(tiny_decoder(), tmp_path,
                                  base_model_name_or_path='b')
  model = lora(tiny_decoder(), (('q_proj',), 2, 4.0))
  with pytest.raises(ValueError, match="hf_family='gpt2' does not fit"):
    hf.export_lora_adapter(model, tmp_path, base_model_name_or_path='b',
                                  hf_family='gpt2')
  with pytest.raises(ValueError, match='hf_family must be one of'):
    hf.export_lora_adapter(model, tmp_path, base_model_name_or_path='b',
                                  hf_family='t5')
  model = lora(tiny_gpt2(), (('q_proj',), 2, 4.0), (('v_proj',), 2, 8.0))
  with pytest.raises(ValueError, match='scalings alpha/rank differ'):
    hf.lora_adapter_state(model)
  model = tiny_decoder()
  peft.apply_lora(model, rank=2, alpha=4.0, dropout=0.1,
                  target_modules=('q_proj',), rngs=nnx.Rngs(0))
  peft.apply_lora(model, rank=2, alpha=4.0, target_modules=('v_proj',),
                  rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='different dropout rates'):
    hf.lora_adapter_state(model)
  enc = build(Encoder, EncoderConfig(vocab_size=64, hidden_size=32,
                                     num_layers=1, num_heads=4,
                                     intermediate_size=64, max_position=16))
  peft.apply_lora(enc, rank=2, alpha=4.0, target_modules=('classifier',),
                  rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='no Hugging Face bert counterpart'):
    hf.lora_adapter_state(enc)


# --- full checkpoints (no torch) ---------------------------------------------


@pytest.mark.slow
def test_full_export_merges_lora_and_reloads(tmp_path):
  model = lora(tiny_decoder(tie_embeddings=True),
               (('q_proj', 'down_proj'), 4, 8.0))
  config = hf.export_hf_checkpoint(model, tmp_path)
  assert config['model_type'] == 'llama' and config['tie_word_embeddings']
  assert config['architectures'] == ['LlamaForCausalLM']
  loaded, _ = hf.from_pretrained(tmp_path)
  assert not any(isinstance(m, peft.LoRALinear)
                 for _, m in nnx.iter_modules(loaded))
  np.testing.assert_allclose(call(loaded, IDS, MASK), call(model, IDS, MASK),
                             atol=1e-5, rtol=0)


@pytest.mark.slow
def test_bert_export_round_trip(tmp_path):
  enc = build(Encoder, EncoderConfig(vocab_size=64, hidden_size=32,
                                     num_layers=2, num_heads=4,
                                     intermediate_size=64, max_position=16,
                                     num_labels=3))
  config = hf.export_hf_checkpoint(enc, tmp_path)
  assert config['model_type'] == 'bert'
  tensors = load_file(str(tmp_path / 'model.safetensors'))
  assert not any(k.startswith('classifier') for k in tensors)
  loaded, cfg = hf.from_pretrained(tmp_path, num_labels=3)
  assert isinstance(loaded, Encoder) and cfg.num_layers == 2
  encode = nnx.jit(lambda m, *a: m.encode(*a))
  np.testing.assert_array_equal(encode(loaded, IDS, MASK),
                                encode(enc, IDS, MASK))


def test_export_keeps_original_config_fields(tmp_path):
  model = tiny_gpt2()
  original = {**hf.gpt2_config_to_hf(model.config), 'bos_token_id': 7, 'eos_token_id': 9,
              'n_layer': 99, 'rope_scaling': None}
  config = hf.export_hf_checkpoint(model, tmp_path, original)
  assert (config['bos_token_id'], config['eos_token_id']) == (7, 9)
  assert config['n_layer'] == 2  # architecture comes from the model
  assert config['dtype'] == 'float32'
  with pytest.raises(ValueError, match="hf_family='llama' does not fit"):
    hf.export_hf_checkpoint(model, tmp_path, model_type='llama')


def test_export_rewrites_stale_decoder_fields():
  model = tiny_decoder(sliding_window=4)  # every layer: -> mistral
  original = {'model_type': 'mistral', 'bos_token_id': 5, 'head_dim': 99,
              'rope_scaling': {'rope_type': 'linear', 'factor': 2.0},
              'layer_types': ['sliding_attention', 'full_attention'],
              'partial_rotary_factor': 0.5}
  config = hf.hf_config_for(model, original)
  assert (config['model_type'], config['sliding_window']) == ('mistral', 4)
  assert config['head_dim'] == 8
  for stale in ('rope_scaling', 'layer_types', 'partial_rotary_factor'):
    assert stale not in config
  assert config['bos_token_id'] == 5 and config['eos_token_id'] is None
  assert hf.decoder_config_from_hf(config) == model.config
  assert hf.hf_config_for(model)['model_type'] == 'mistral'


# --- transformers / peft load our exports ------------------------------------


@pytest.fixture(scope='module')
def hf_libs():
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  hf_peft = pytest.importorskip('peft')
  return torch, transformers, hf_peft


def torch_logits(libs, model, ids=IDS, mask=MASK):
  torch = libs[0]
  with torch.no_grad():
    return model(torch.tensor(ids),
                 attention_mask=torch.tensor(mask)).logits.numpy()


def perturb(libs, model, seed=0):
  torch = libs[0]
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      one = 1.0 if p.ndim == 1 and name.endswith('weight') and (
          'norm' in name or '.ln_' in name) else 0.0
      p.copy_(noise * (0.1 if p.ndim == 1 else 0.2) + one)


@pytest.mark.slow
def test_peft_loads_our_llama_adapter(hf_libs, tmp_path):
  _, transformers, hf_peft = hf_libs
  base = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2,
      max_position_embeddings=32)).eval()
  perturb(hf_libs, base)
  base.save_pretrained(tmp_path / 'base')
  model, _ = hf.from_pretrained(tmp_path / 'base')
  lora(model, (('q_proj',), 4, 8.0), (('v_proj',), 2, 8.0))
  hf.export_lora_adapter(
      model, tmp_path / 'adapter',
      base_model_name_or_path=str(tmp_path / 'base'), hf_family='llama')
  peft_model = hf_peft.PeftModel.from_pretrained(
      transformers.LlamaForCausalLM.from_pretrained(tmp_path / 'base'),
      tmp_path / 'adapter').eval()
  ours = call(model, IDS, MASK)
  np.testing.assert_allclose(real(ours),
                             real(torch_logits(hf_libs, peft_model)),
                             atol=TOL, rtol=0)
  # The adapter matters: the bare base model differs.
  assert np.abs(real(ours) - real(torch_logits(hf_libs, base))).max() > 1e-2


@pytest.mark.slow
def test_peft_loads_our_gpt2_fused_adapter(hf_libs, tmp_path):
  _, transformers, hf_peft = hf_libs
  base = transformers.GPT2LMHeadModel(transformers.GPT2Config(
      vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32,
      bos_token_id=0, eos_token_id=0)).eval()
  perturb(hf_libs, base)
  base.save_pretrained(tmp_path / 'base')
  model, _ = hf.from_pretrained(tmp_path / 'base')
  lora(model, (('q_proj', 'v_proj'), 4, 8.0),
       ((r'layers\.1\.mlp\.fc_out',), 2, 3.0))
  hf.export_lora_adapter(
      model, tmp_path / 'adapter', base_model_name_or_path='gpt2-tiny',
      hf_family='gpt2')
  peft_model = hf_peft.PeftModel.from_pretrained(
      transformers.GPT2LMHeadModel.from_pretrained(tmp_path / 'base'),
      tmp_path / 'adapter').eval()
  np.testing.assert_allclose(real(call(model, IDS, MASK)),
                             real(torch_logits(hf_libs, peft_model)),
                             atol=TOL, rtol=0)


@pytest.mark.parametrize('model_type', ['llama', 'mistral', 'qwen2', 'gpt2'])
@pytest.mark.slow
def test_transformers_loads_our_full_checkpoint(hf_libs, tmp_path, model_type):
  _, transformers, _ = hf_libs
  if model_type == 'gpt2':
    model = lora(tiny_gpt2(), (('q_proj', 'fc_in'), 2, 4.0))
  else:
    kw = {'llama': dict(attention_bias=True, attention_out_bias=True,
                        mlp_bias=True),
          'mistral': {},
          'qwen2': dict(attention_bias=True, tie_embeddings=True)}[model_type]
    model = lora(tiny_decoder(**kw), (('q_proj', 'up_proj'), 2, 4.0))
  hf.export_hf_checkpoint(model, tmp_path, model_type=model_type)
  ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
  assert ref.config.model_type == model_type
  np.testing.assert_allclose(real(call(model, IDS, MASK)),
                             real(torch_logits(hf_libs, ref)),
                             atol=TOL, rtol=0)


@pytest.mark.slow
def test_transformers_and_peft_load_our_bert_exports(hf_libs, tmp_path):
  torch, transformers, hf_peft = hf_libs
  enc = build(Encoder, EncoderConfig(vocab_size=64, hidden_size=32,
                                     num_layers=2, num_heads=4,
                                     intermediate_size=64, max_position=16))
  hf.export_hf_checkpoint(enc, tmp_path / 'base')
  lora(enc, (('query', 'value'), 2, 4.0))
  config = hf.export_lora_adapter(
      enc, tmp_path / 'adapter', base_model_name_or_path='bert-tiny')
  assert config['task_type'] == 'FEATURE_EXTRACTION'
  mask = MASK.copy()
  mask[2] = 1
  keep = mask.astype(bool)
  encode = nnx.jit(lambda m, *a: m.encode(*a))
  ours = np.asarray(encode(enc, IDS, mask))[keep]
  base = transformers.AutoModel.from_pretrained(tmp_path / 'base').eval()
  for ref in (hf_peft.PeftModel.from_pretrained(base, tmp_path / 'adapter'),
              transformers.AutoModel.from_pretrained(tmp_path / 'base')):
    with torch.no_grad():
      hidden = ref(torch.tensor(IDS), attention_mask=torch.tensor(mask),
                   token_type_ids=torch.zeros(IDS.shape, dtype=torch.long)
                   ).last_hidden_state.numpy()[keep]
    if isinstance(ref, hf_peft.PeftModel):
      np.testing.assert_allclose(ours, hidden, atol=TOL, rtol=0)
    else:  # the plain base: our LoRA made a difference
      assert np.abs(ours - hidden).max() > 1e-2
  full = tmp_path / 'merged'
  hf.export_hf_checkpoint(enc, full)
  with torch.no_grad():
    hidden = transformers.AutoModel.from_pretrained(full).eval()(
        torch.tensor(IDS), attention_mask=torch.tensor(mask)
    ).last_hidden_state.numpy()[keep]
  np.testing.assert_allclose(ours, hidden, atol=TOL, rtol=0)


@pytest.mark.slow
def test_adapter_from_a_federated_run_loads_in_peft(hf_libs, tmp_path):
  """Federated LoRA rounds on a HF Llama, exported, loaded by HF peft: same logits."""
  import optax  # pylint: disable=g-import-not-at-top
  from fedjax_fm import engine  # pylint: disable=g-import-not-at-top
  from fedjax_fm import models  # pylint: disable=g-import-not-at-top
  _, transformers, hf_peft = hf_libs
  base = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2,
      max_position_embeddings=32)).eval()
  perturb(hf_libs, base)
  base.save_pretrained(tmp_path / 'base')
  model, _ = hf.from_pretrained(tmp_path / 'base')
  peft.apply_lora(model, rank=4, alpha=8.0, target_modules=('q_proj', 'v_proj'),
                  rngs=nnx.Rngs(1))
  split = peft.split_model(model, 'lora')
  fed = engine.build_round(models.make_loss_fn(split.graphdef, models.causal_lm_task()),
                           split.trainable, client_optimizer=optax.adam(3e-2),
                           server_optimizer=optax.sgd(1.0), num_clients=4,
                           strategy='chunked', chunk_size=2)
  rng = np.random.RandomState(0)
  ids = rng.randint(0, 64, (4, 2, 3, 12)).astype(np.int32)
  data = {'batch': {'input_ids': ids, 'attention_mask': np.ones_like(ids)},
          'example_mask': np.ones((4, 2, 3), bool), 'step_mask': np.ones((4, 2), bool),
          'weight': np.full(4, 6.0, np.float32), 'client_id': np.arange(4, dtype=np.int32)}
  state = fed.init(split.trainable, jax.random.key(0))
  for _ in range(3):
    state, _ = fed.apply(state, split.frozen, data)
  trained = peft.merge(split.graphdef, state.params, split.frozen)
  hf.export_lora_adapter(trained, tmp_path / 'adapter',
                                base_model_name_or_path=str(tmp_path / 'base'),
                                hf_family='llama')
  peft_model = hf_peft.PeftModel.from_pretrained(
      transformers.LlamaForCausalLM.from_pretrained(tmp_path / 'base'),
      tmp_path / 'adapter').eval()
  ours = call(trained, IDS, MASK)
  np.testing.assert_allclose(real(ours), real(torch_logits(hf_libs, peft_model)),
                             atol=TOL, rtol=0)
  assert np.abs(real(ours) - real(torch_logits(hf_libs, base))).max() > 1e-3
