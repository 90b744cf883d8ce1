"""Tests for the BERT encoder and the HF loader against NumPy references."""

import json
import math
import os

import numpy as np
import pytest

import jax.numpy as jnp
from flax import nnx
from safetensors.numpy import save_file

from fedjax_fm import peft
from fedjax_fm import hf
from fedjax_fm.models.encoder import Encoder, EncoderConfig

TINY_HF = {
    'model_type': 'bert', 'vocab_size': 50, 'hidden_size': 16,
    'num_hidden_layers': 2, 'num_attention_heads': 4, 'intermediate_size': 32,
    'max_position_embeddings': 20, 'type_vocab_size': 2,
    'layer_norm_eps': 1e-12, 'hidden_act': 'gelu',
}


# ------------------------------------------------- NumPy BERT (from HF keys)

_erf = np.vectorize(math.erf)


def np_gelu(x):
  return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def np_layer_norm(x, w, b, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * w + b


def np_bert(t, ids, mask, num_layers, num_heads, eps, types=None):
  """Straight BERT forward on HF-named float64 tensors; returns [B, L, H]."""
  t = {k: v.astype(np.float64) for k, v in t.items()}
  b, l = ids.shape
  types = np.zeros_like(ids) if types is None else types
  x = (t['embeddings.word_embeddings.weight'][ids]
       + t['embeddings.position_embeddings.weight'][np.arange(l)][None]
       + t['embeddings.token_type_embeddings.weight'][types])
  x = np_layer_norm(x, t['embeddings.LayerNorm.weight'],
                    t['embeddings.LayerNorm.bias'], eps)
  hidden = x.shape[-1]
  hd = hidden // num_heads
  lin = lambda z, name: z @ t[name + '.weight'].T + t[name + '.bias']
  add_mask = (1.0 - mask[:, None, None, :]) * -1e9
  for i in range(num_layers):
    p = f'encoder.layer.{i}.'
    heads = lambda z: z.reshape(b, l, num_heads, hd).transpose(0, 2, 1, 3)
    q = heads(lin(x, p + 'attention.self.query'))
    k = heads(lin(x, p + 'attention.self.key'))
    v = heads(lin(x, p + 'attention.self.value'))
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd) + add_mask
    s = np.exp(s - s.max(-1, keepdims=True))
    s = s / s.sum(-1, keepdims=True)
    ctx = (s @ v).transpose(0, 2, 1, 3).reshape(b, l, hidden)
    x = np_layer_norm(x + lin(ctx, p + 'attention.output.dense'),
                      t[p + 'attention.output.LayerNorm.weight'],
                      t[p + 'attention.output.LayerNorm.bias'], eps)
    h = np_gelu(lin(x, p + 'intermediate.dense'))
    x = np_layer_norm(x + lin(h, p + 'output.dense'),
                      t[p + 'output.LayerNorm.weight'],
                      t[p + 'output.LayerNorm.bias'], eps)
  return x


def np_mean_pool(h, mask):
  m = mask[..., None].astype(np.float64)
  return (h * m).sum(1) / np.maximum(m.sum(1), 1e-9)


def random_bert_tensors(cfg, seed=0):
  """HF-named random tensors for a BERT config (torch [out, in] layout)."""
  rng = np.random.default_rng(seed)
  h, f = cfg['hidden_size'], cfg['intermediate_size']
  r = lambda *s: rng.normal(0, 0.3, s).astype(np.float32)
  t = {
      'embeddings.word_embeddings.weight': r(cfg['vocab_size'], h),
      'embeddings.position_embeddings.weight':
          r(cfg['max_position_embeddings'], h),
      'embeddings.token_type_embeddings.weight': r(cfg['type_vocab_size'], h),
      'embeddings.LayerNorm.weight': 1 + r(h),
      'embeddings.LayerNorm.bias': r(h),
      'embeddings.position_ids':
          np.arange(cfg['max_position_embeddings'])[None].astype(np.int64),
      'pooler.dense.weight': r(h, h),
      'pooler.dense.bias': r(h),
  }
  for i in range(cfg['num_hidden_layers']):
    p = f'encoder.layer.{i}.'
    for name, (o, n) in {
        'attention.self.query': (h, h), 'attention.self.key': (h, h),
        'attention.self.value': (h, h), 'attention.output.dense': (h, h),
        'intermediate.dense': (f, h), 'output.dense': (h, f)}.items():
      t[p + name + '.weight'] = r(o, n)
      t[p + name + '.bias'] = r(o)
    for name in ('attention.output.LayerNorm', 'output.LayerNorm'):
      t[p + name + '.weight'] = 1 + r(h)
      t[p + name + '.bias'] = r(h)
  return t


@pytest.fixture(scope='module')
def tiny():
  cfg = hf.encoder_config_from_hf(TINY_HF, num_labels=3)
  tensors = random_bert_tensors(TINY_HF)
  model = Encoder(cfg, rngs=nnx.Rngs(0))
  hf.load_bert_into(model, tensors)
  rng = np.random.default_rng(1)
  ids = rng.integers(1, 50, (3, 9))
  mask = np.ones((3, 9), np.int64)
  mask[1, 5:] = 0
  mask[2, 2:] = 0
  return cfg, tensors, model, ids, mask


# ---------------------------------------------------------------------- tests


def test_config_from_hf_and_validate():
  cfg = hf.encoder_config_from_hf(TINY_HF, num_labels=5, pooling='cls')
  assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads) == (16, 2, 4)
  assert cfg.max_position == 20 and cfg.num_labels == 5
  assert cfg.pooling == 'cls'
  with pytest.raises(ValueError, match='pooling'):
    EncoderConfig(pooling='max').validate()
  with pytest.raises(ValueError, match='hidden_act'):
    EncoderConfig(hidden_act='swish').validate()
  with pytest.raises(ValueError, match='num_heads'):
    EncoderConfig(hidden_size=10, num_heads=3).validate()
  with pytest.raises(ValueError, match='model_type'):
    hf.encoder_config_from_hf({**TINY_HF, 'model_type': 'gpt2'})
  with pytest.raises(ValueError, match='unknown'):
    hf.encoder_config_from_hf(TINY_HF, poolng='cls')


def test_param_names(tiny):
  _, _, model, _, _ = tiny
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  assert set(params) == {'embeddings', 'layers', 'classifier'}
  assert set(params['layers'][0]) == {
      'query', 'key', 'value', 'attn_out', 'attn_norm', 'intermediate',
      'output', 'out_norm'}
  assert params['classifier']['kernel'].shape == (16, 3)


def test_tiny_forward_matches_numpy(tiny):
  cfg, tensors, model, ids, mask = tiny
  types = np.zeros_like(ids)
  types[:, 4:] = 1
  want = np_bert(tensors, ids, mask, 2, 4, cfg.layer_norm_eps, types)
  got = model.encode(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types))
  valid = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(got)[valid], want[valid],
                             rtol=1e-4, atol=1e-4)
  emb = model.embed_sentences(jnp.asarray(ids), jnp.asarray(mask))
  want_emb = np_mean_pool(np_bert(tensors, ids, mask, 2, 4, 1e-12), mask)
  np.testing.assert_allclose(np.asarray(emb), want_emb, rtol=1e-4, atol=1e-4)
  emb_n = model.embed_sentences(jnp.asarray(ids), jnp.asarray(mask),
                                normalize=True)
  np.testing.assert_allclose(
      np.asarray(emb_n),
      want_emb / np.linalg.norm(want_emb, axis=-1, keepdims=True),
      rtol=1e-4, atol=1e-5)
  # Classification logits = classifier(mean pooled).
  p = nnx.to_pure_dict(nnx.state(model.classifier, nnx.Param))
  logits = model(jnp.asarray(ids), jnp.asarray(mask))
  np.testing.assert_allclose(
      np.asarray(logits),
      want_emb @ np.asarray(p['kernel']) + np.asarray(p['bias']),
      rtol=1e-4, atol=1e-4)


def test_padding_invariance(tiny):
  _, _, model, ids, mask = tiny
  ids2 = np.where(mask == 1, ids, 7)
  a = model.embed_sentences(jnp.asarray(ids), jnp.asarray(mask))
  b = model.embed_sentences(jnp.asarray(ids2), jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_cls_pooling_and_dropout():
  cfg = hf.encoder_config_from_hf(TINY_HF, num_labels=2, pooling='cls',
                              dropout=0.5)
  model = Encoder(cfg, rngs=nnx.Rngs(0))
  ids = jnp.arange(27).reshape(3, 9) % 50
  mask = jnp.ones((3, 9), jnp.int32)
  hidden = model.encode(ids, mask)
  p = nnx.to_pure_dict(nnx.state(model.classifier, nnx.Param))
  want = np.asarray(hidden)[:, 0] @ np.asarray(p['kernel']) + np.asarray(
      p['bias'])
  np.testing.assert_allclose(np.asarray(model(ids, mask)), want, atol=1e-5)
  dropped = model(ids, mask, rngs=nnx.Rngs(dropout=0))
  assert np.abs(np.asarray(dropped) - want).max() > 1e-4


def test_load_errors(tiny):
  cfg, tensors, _, _, _ = tiny
  model = Encoder(cfg, rngs=nnx.Rngs(0))
  bad = dict(tensors)
  del bad['encoder.layer.1.output.dense.bias']
  with pytest.raises(ValueError, match='missing keys.*layer.1.output.dense'):
    hf.load_bert_into(model, bad)
  bad = {**tensors, 'encoder.layer.2.output.dense.bias': np.zeros(16)}
  with pytest.raises(ValueError, match='unexpected keys.*layer.2'):
    hf.load_bert_into(model, bad)
  bad = {**tensors, 'embeddings.word_embeddings.weight': np.zeros((51, 16))}
  with pytest.raises(ValueError, match='shape mismatch'):
    hf.load_bert_into(model, bad)
  # A `bert.` prefix and a classifier head in the checkpoint are fine.
  prefixed = {'bert.' + k: v for k, v in tensors.items()}
  prefixed['classifier.weight'] = np.zeros((3, 16), np.float32)
  hf.load_bert_into(model, prefixed)
  # Loading into a LoRA-wrapped model fills the wrapped base layers.
  peft.apply_lora(model, rank=2, alpha=4.0, target_modules=('query',),
                  rngs=nnx.Rngs(1))
  model.layers[0].query.base.kernel.set_value(jnp.zeros((16, 16)))
  hf.load_bert_into(model, tensors)
  np.testing.assert_array_equal(
      np.asarray(model.layers[0].query.base.kernel[...]),
      tensors['encoder.layer.0.attention.self.query.weight'].T)


def test_safetensors_single_and_sharded(tmp_path, tiny):
  cfg, tensors, _, ids, mask = tiny
  items = sorted(tensors.items())
  half = len(items) // 2
  shards = {'model-00001-of-00002.safetensors': dict(items[:half]),
            'model-00002-of-00002.safetensors': dict(items[half:])}
  sharded = tmp_path / 'sharded'
  sharded.mkdir()
  weight_map = {}
  for name, part in shards.items():
    save_file(part, str(sharded / name))
    weight_map.update({k: name for k in part})
  (sharded / 'model.safetensors.index.json').write_text(
      json.dumps({'metadata': {}, 'weight_map': weight_map}))
  (sharded / 'config.json').write_text(json.dumps(TINY_HF))
  loaded = hf.load_safetensors(sharded)
  assert set(loaded) == set(tensors)
  np.testing.assert_array_equal(loaded['encoder.layer.1.output.dense.weight'],
                                tensors['encoder.layer.1.output.dense.weight'])
  single = tmp_path / 'single'
  single.mkdir()
  save_file(tensors, str(single / 'model.safetensors'))
  assert set(hf.load_safetensors(single)) == set(tensors)
  assert set(hf.load_safetensors(single / 'model.safetensors')) == set(tensors)
  with pytest.raises(FileNotFoundError):
    hf.load_safetensors(tmp_path)
  cfg2 = hf.encoder_config_from_hf(hf.load_hf_config(sharded), num_labels=3)
  assert cfg2 == cfg
  model = Encoder(cfg2, rngs=nnx.Rngs(5))
  hf.load_bert_into(model, sharded)
  want = np_mean_pool(np_bert(tensors, ids, mask, 2, 4, 1e-12), mask)
  np.testing.assert_allclose(
      np.asarray(model.embed_sentences(jnp.asarray(ids), jnp.asarray(mask))),
      want, rtol=1e-4, atol=1e-4)


SENTENCES = [
    'A man is playing guitar.',
    'Someone plays a guitar.',
    'The stock market fell today.',
]


@pytest.fixture(scope='module')
def minilm(minilm_dir, minilm_encoder):
  model = minilm_encoder
  tokenizer = hf.load_tokenizer(minilm_dir)
  tokenizer.enable_padding(pad_id=0, pad_token='[PAD]')  # pad to longest
  enc = tokenizer.encode_batch(SENTENCES)
  ids = np.array([e.ids for e in enc])
  mask = np.array([e.attention_mask for e in enc])
  return model, ids, mask


@pytest.mark.slow
def test_minilm_matches_numpy(minilm, minilm_dir):
  model, ids, mask = minilm
  assert mask.min() == 0  # the batch really is padded
  assert model.config.num_layers == 6 and model.config.hidden_size == 384
  tensors = hf.load_safetensors(minilm_dir)
  want = np_mean_pool(np_bert(tensors, ids, mask, 6, 12, 1e-12), mask)
  got = model.embed_sentences(jnp.asarray(ids), jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_minilm_semantics(minilm):
  model, ids, mask = minilm
  e = np.asarray(model.embed_sentences(jnp.asarray(ids), jnp.asarray(mask),
                                       normalize=True))
  np.testing.assert_allclose(np.linalg.norm(e, axis=-1), 1.0, atol=1e-5)
  sim = e @ e.T
  assert sim[0, 1] > sim[0, 2] + 0.3
  assert sim[0, 1] > sim[1, 2] + 0.3
  assert model(jnp.asarray(ids), jnp.asarray(mask)).shape == (3, 2)


def test_minilm_dir_exists(minilm_dir):
  assert os.path.isfile(os.path.join(minilm_dir, 'tokenizer.json'))
