"""Tests for fedjax_fm.data.tokenizers."""

import os

import numpy as np
import pytest

from fedjax_fm.data import tokenizers


@pytest.fixture(scope='module')
def bert(minilm_dir):
  return tokenizers.HFTokenizer.from_file(
      os.path.join(minilm_dir, 'tokenizer.json'))


def _corpus(seed=0, n=400):
  rng = np.random.default_rng(seed)
  words = ['federated', 'learning', 'client', 'server', 'round', 'model',
           'update', 'gradient', 'average', 'data', 'privacy', 'token']
  return [' '.join(rng.choice(words, size=rng.integers(3, 10)))
          for _ in range(n)]


@pytest.fixture(scope='module')
def sp_model(tmp_path_factory):
  prefix = tmp_path_factory.mktemp('sp') / 'tiny'
  tok = tokenizers.SentencePieceTokenizer.train(
      _corpus(), vocab_size=60, model_path_prefix=prefix)
  return tok, prefix


class TestHF:

  def test_bert_hello_world(self, bert):
    out = bert.encode(['hello world'], max_len=8)
    np.testing.assert_array_equal(out['input_ids'],
                                  [[101, 7592, 2088, 102, 0, 0, 0, 0]])
    np.testing.assert_array_equal(out['attention_mask'],
                                  [[1, 1, 1, 1, 0, 0, 0, 0]])
    assert out['input_ids'].dtype == np.int32
    assert out['attention_mask'].dtype == np.int32
    assert bert.pad_id == 0
    assert bert.vocab_size == 30522
    assert isinstance(bert, tokenizers.Tokenizer)

  def test_truncation_keeps_sep(self, bert):
    out = bert.encode(['hello world ' * 20, 'hi'], max_len=6)
    assert out['input_ids'].shape == (2, 6)
    assert out['input_ids'][0, 0] == 101 and out['input_ids'][0, -1] == 102
    assert out['attention_mask'][0].all()
    assert out['attention_mask'][1].sum() == 3

  def test_decode_round_trip(self, bert):
    out = bert.encode(['Hello, federated world!'], max_len=16)
    assert bert.decode(out['input_ids'][0]) == 'hello, federated world!'

  def test_from_pretrained_dir(self, tmp_path, minilm_dir):
    tok = tokenizers.HFTokenizer.from_pretrained_dir(minilm_dir)
    assert tok.encode(['hello world'], 4)['input_ids'].tolist() == [
        [101, 7592, 2088, 102]]
    with pytest.raises(FileNotFoundError, match='tokenizer.json'):
      tokenizers.HFTokenizer.from_pretrained_dir(tmp_path)

  def test_bad_input(self, bert):
    with pytest.raises(ValueError, match='texts'):
      bert.encode('hello', 4)
    with pytest.raises(ValueError, match='max_len'):
      bert.encode(['hello'], 0)


class TestSentencePiece:

  def test_round_trip(self, sp_model):
    tok, _ = sp_model
    texts = ['federated learning round', 'client model update privacy']
    out = tok.encode(texts, max_len=32)
    assert out['input_ids'].shape == (2, 32)
    assert out['input_ids'].dtype == np.int32
    for i, text in enumerate(texts):
      n = out['attention_mask'][i].sum()
      assert 0 < n < 32
      assert np.all(out['input_ids'][i, n:] == tok.pad_id)
      assert np.all(out['input_ids'][i, :n] != tok.pad_id)
      assert tok.decode(out['input_ids'][i]) == text
    assert tok.pad_id == 0
    assert 12 < tok.vocab_size <= 60
    assert int(out['input_ids'].max()) < tok.vocab_size

  def test_bos_eos_and_truncation(self, sp_model):
    _, prefix = sp_model
    tok = tokenizers.SentencePieceTokenizer.load(
        f'{prefix}.model', add_bos=True, add_eos=True)
    sp = tok.processor
    out = tok.encode(['federated learning', 'gradient ' * 30], max_len=12)
    ids = out['input_ids']
    assert ids[0, 0] == sp.bos_id() and ids[1, 0] == sp.bos_id()
    n0 = out['attention_mask'][0].sum()
    assert ids[0, n0 - 1] == sp.eos_id()
    assert out['attention_mask'][1].all() and ids[1, -1] == sp.eos_id()
    assert tok.decode(ids[0]) == 'federated learning'
    with pytest.raises(ValueError, match='max_len'):
      tok.encode(['x'], max_len=2)

  def test_bpe(self, tmp_path):
    tok = tokenizers.SentencePieceTokenizer.train(
        _corpus(1), vocab_size=50, model_path_prefix=tmp_path / 'bpe',
        model_type='bpe')
    out = tok.encode(['server average data'], max_len=20)
    assert tok.decode(out['input_ids'][0]) == 'server average data'
    assert (tmp_path / 'bpe.model').is_file()

  def test_errors(self, tmp_path):
    with pytest.raises(ValueError, match='model_type'):
      tokenizers.SentencePieceTokenizer.train(
          ['a b'], 10, tmp_path / 'x', model_type='word2vec')
    with pytest.raises(FileNotFoundError):
      tokenizers.SentencePieceTokenizer.load(tmp_path / 'missing.model')


def test_pad_sequences():
  out = tokenizers.pad_sequences([[5, 6, 7], [], [1, 2, 3, 4, 5]], 4, 9)
  np.testing.assert_array_equal(out['input_ids'],
                                [[5, 6, 7, 9], [9, 9, 9, 9], [1, 2, 3, 4]])
  np.testing.assert_array_equal(out['attention_mask'],
                                [[1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
