"""Tests for instruction-tuning data (data/instructions.py) and loss masks."""

import json

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from fedjax_fm import data
from fedjax_fm import peft
from fedjax_fm.data import instructions as inst
from fedjax_fm.data.tokenizers import SentencePieceTokenizer, pad_sequences
from fedjax_fm.models import tasks
from fedjax_fm.models.decoder import Decoder, DecoderConfig


class CharTokenizer:
  """One token per character (id = ord + 2); pad 0, EOS 1."""

  pad_id = 0
  eos_id = 1
  vocab_size = 130

  def encode(self, texts, max_len):
    return pad_sequences([[ord(c) % 128 + 2 for c in t] for t in texts],
                         max_len, self.pad_id)

  def decode(self, ids):
    return ''.join(chr(int(i) - 2) for i in ids if i >= 2)


def _write_jsonl(path, records):
  path.write_text('\n'.join(json.dumps(r) for r in records) + '\n')
  return path


def test_load_sample_dolly():
  ex = data.load_instructions(data.sample_path())
  assert set(ex) == set(inst.FIELDS)
  assert all(v.shape == (60,) and v.dtype == object for v in ex.values())
  ids, names = data.category_ids(ex)
  assert list(names) == ['antonyms', 'arithmetic', 'capitals', 'plurals',
                         'unit_conversion']
  np.testing.assert_array_equal(np.bincount(ids), 12)
  # Dolly's context becomes input, response becomes output.
  raw = [json.loads(l) for l in data.sample_path().read_text().splitlines()]
  assert list(ex['input']) == [r['context'] for r in raw]
  assert list(ex['output']) == [r['response'] for r in raw]
  assert any(ex['input']) and not all(ex['input'])
  assert len(data.load_instructions(data.sample_path(), 'dolly',
                                    max_examples=5)['output']) == 5
  with pytest.raises(ValueError, match='available'):
    data.sample_path('nope.jsonl')


def test_load_alpaca_jsonl_and_json_list(tmp_path):
  records = [{'instruction': 'Say hi.', 'input': '', 'output': 'hi'},
             {'instruction': 'Echo.', 'output': 'x', 'input': 'x'},
             {'instruction': 'No input field.', 'output': 'ok'}]
  path = _write_jsonl(tmp_path / 'a.jsonl', records)
  ex = data.load_instructions(path)  # auto -> alpaca
  assert list(ex['input']) == ['', 'x', '']
  assert list(ex['category']) == ['none'] * 3
  lst = tmp_path / 'a.json'
  lst.write_text(json.dumps(records))
  ex2 = data.load_instructions(lst, 'alpaca')
  assert list(ex2['output']) == ['hi', 'x', 'ok']


def test_load_errors(tmp_path):
  good = {'instruction': 'a', 'output': 'b'}
  with pytest.raises(ValueError, match='schema'):
    data.load_instructions(data.sample_path(), 'sharegpt')
  with pytest.raises(FileNotFoundError):
    data.load_instructions(tmp_path / 'missing.jsonl')
  path = _write_jsonl(tmp_path / 'b.jsonl', [good, {'instruction': 'c'}])
  with pytest.raises(ValueError, match="line 2: missing field 'output'"):
    data.load_instructions(path)
  path = _write_jsonl(tmp_path / 'c.jsonl', [{'prompt': 'a'}])
  with pytest.raises(ValueError, match='cannot detect the schema'):
    data.load_instructions(path)
  path = _write_jsonl(tmp_path / 'd.jsonl', [{**good, 'output': 3}])
  with pytest.raises(ValueError, match="'output' must be a string"):
    data.load_instructions(path)
  with pytest.raises(ValueError, match='dolly'):
    data.load_instructions(_write_jsonl(tmp_path / 'e.jsonl', [good]),
                           'dolly')


def test_templates():
  tpl = data.ALPACA_TEMPLATE
  assert tpl.format('Do X.').endswith(
      '### Instruction:\nDo X.\n\n### Response:\n')
  assert '### Input:\nctx\n' in tpl.format('Do X.', 'ctx')
  assert data.format_prompts([{'instruction': 'I', 'input': 'c'}], 'short') == [
      '### Instruction:\nI\n### Input:\nc\n### Response:\n']
  custom = data.PromptTemplate('Q: {instruction} ({input})\nA:',
                               'Q: {instruction}\nA:')
  assert custom.format('why') == 'Q: why\nA:'
  with pytest.raises(ValueError, match='with_input'):
    data.PromptTemplate('{instruction}', '{instruction}')
  with pytest.raises(ValueError, match='without_input'):
    data.PromptTemplate('{instruction}{input}', '{instruction}{input}')
  with pytest.raises(ValueError, match='template'):
    data.format_prompts([{'instruction': 'I'}], 'chatml')


def test_loss_mask_marks_exactly_the_response():
  tok = CharTokenizer()
  examples = [{'instruction': 'Add.', 'input': '2 and 3', 'output': '5'},
              {'instruction': 'Hi?', 'output': 'hello'},
              {'instruction': 'Long prompt ' * 2, 'output': 'cut off here'}]
  out = data.tokenize_instructions(examples, tok, 64, template='short')
  assert set(out) == {'input_ids', 'attention_mask', 'loss_mask'}
  assert all(v.shape == (3, 64) and v.dtype == np.int32 for v in out.values())
  prompts = data.format_prompts(examples, 'short')
  for i, (p, ex) in enumerate(zip(prompts, examples)):
    n_p, n_r = len(p), len(ex['output']) + 1  # + EOS
    n = min(n_p + n_r, 64)
    want = np.zeros(64, np.int32)
    want[n_p:n] = 1
    np.testing.assert_array_equal(out['loss_mask'][i], want)
    np.testing.assert_array_equal(out['attention_mask'][i],
                                  np.arange(64) < n)
    assert tok.decode(out['input_ids'][i, :n_p]) == p
  assert tok.decode(out['input_ids'][0, len(prompts[0]):]) == '5'
  assert out['input_ids'][1, len(prompts[1]) + 5] == tok.eos_id
  assert len(prompts[2]) + 13 > 64  # the response is truncated
  assert out['loss_mask'][2].sum() == 64 - len(prompts[2])
  no_eos = data.tokenize_instructions(examples, tok, 64, template='short',
                                      add_eos=False)
  assert no_eos['loss_mask'][0].sum() == 1


def test_sentencepiece_bos_eos(tmp_path):
  ex = data.load_instructions(data.sample_path())
  texts = data.format_prompts(ex, 'short') + list(ex['output'])
  tok = SentencePieceTokenizer.train(texts, 120, tmp_path / 'sp',
                                     add_bos=True, add_eos=True)
  sp = tok.processor
  out = data.tokenize_instructions(ex, tok, 96, template='short')
  for i in (0, 17, 59):
    p = sp.encode(data.format_prompts(ex, 'short')[i])
    r = sp.encode(ex['output'][i])
    want = [sp.bos_id()] + p + r + [sp.eos_id()]
    assert len(want) <= 96
    np.testing.assert_array_equal(out['input_ids'][i, :len(want)], want)
    np.testing.assert_array_equal(
        np.flatnonzero(out['loss_mask'][i]),
        np.arange(1 + len(p), len(want)))
  prompts = data.tokenize_prompts(ex, tok, 40, template='short')
  lengths = prompts['attention_mask'].sum(-1)
  assert prompts['attention_mask'][:, -1].all()  # left-padded
  p0 = [sp.bos_id()] + sp.encode(data.format_prompts(ex, 'short')[0])
  np.testing.assert_array_equal(prompts['input_ids'][0, 40 - lengths[0]:], p0)


@pytest.mark.slow
def test_causal_lm_loss_mask_key():
  cfg = DecoderConfig(vocab_size=40, dim=32, num_layers=1, num_heads=4,
                      num_kv_heads=2, mlp_dim=48, max_len=12)
  model = Decoder(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 40, (3, 8))
  mask = np.ones((3, 8), np.int32)
  mask[1, 6:] = 0
  loss_mask = np.zeros((3, 8), np.int32)
  loss_mask[0, 5:] = 1
  loss_mask[1, 3:] = 1  # includes padding positions: ignored
  batch = {'input_ids': jnp.asarray(ids), 'attention_mask': jnp.asarray(mask),
           'loss_mask': jnp.asarray(loss_mask)}
  split = peft.split_model(model, 'full')
  task = tasks.causal_lm_task(loss_mask_key='loss_mask')

  @jax.jit
  def run(trainable, frozen, batch):
    logits = peft.merge(split.graphdef, trainable, frozen)(
        batch['input_ids'], batch['attention_mask'])
    metrics = tasks.make_eval_fn(split.graphdef, task)(trainable, frozen,
                                                       batch)
    loss = tasks.make_loss_fn(split.graphdef, task)(trainable, frozen, batch)
    return logits, metrics, loss

  logits, metrics, loss = run(split.trainable, split.frozen, batch)
  logits = np.asarray(logits, np.float64)[:, :-1]
  lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + (
      logits.max(-1))
  nll = lse - np.take_along_axis(logits, ids[:, 1:, None], -1)[..., 0]
  valid = mask[:, 1:] * mask[:, :-1] * loss_mask[:, 1:]
  num = valid.sum(-1)
  np.testing.assert_array_equal(np.asarray(metrics['num_tokens']), [3, 3, 0])
  np.testing.assert_array_equal(np.asarray(metrics['num_tokens']), num)
  want = (nll * valid).sum(-1) / np.maximum(num, 1)
  np.testing.assert_allclose(np.asarray(loss), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(metrics['loss']), want, rtol=1e-5,
                             atol=1e-6)


def test_partitions_and_federated_dataset():
  ex = data.load_instructions(data.sample_path())
  cat_ids, names = data.category_ids(ex)
  clients = data.partition_instructions(ex, 'natural')
  assert len(clients) == 5
  for c, idx in enumerate(clients):
    np.testing.assert_array_equal(cat_ids[idx], c)
  clients = data.partition_instructions(ex, 'dirichlet', num_clients=6,
                                        alpha=0.1, seed=1)
  assert len(clients) == 6 and all(c.size >= 1 for c in clients)
  np.testing.assert_array_equal(np.sort(np.concatenate(clients)),
                                np.arange(60))
  # Small alpha: each client is dominated by few categories.
  top_share = [np.bincount(cat_ids[c]).max() / c.size for c in clients]
  assert np.mean(top_share) > 0.6
  iid = data.partition_instructions(ex, 'iid', num_clients=4, seed=0)
  assert sorted(c.size for c in iid) == [15] * 4
  with pytest.raises(ValueError, match='method'):
    data.partition_instructions(ex, 'shards', num_clients=2)
  with pytest.raises(ValueError, match='num_clients'):
    data.partition_instructions(ex, 'dirichlet')
  with pytest.raises(ValueError, match='one client per category'):
    data.partition_instructions(ex, 'natural', num_clients=3)
  ds = data.federated_instructions(data.sample_path(), CharTokenizer(), 96,
                                   template='short', partition='natural')
  assert ds.num_clients == 5 and ds.num_examples == 60
  assert set(ds.keys) == {'input_ids', 'attention_mask', 'loss_mask'}
  rb = ds.round_batch([0, 3], num_steps=2, batch_size=4, seed=0)
  assert rb['batch']['loss_mask'].shape == (2, 2, 4, 96)
