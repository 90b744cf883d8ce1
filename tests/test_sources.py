"""Tests for fedjax_fm.data.sources."""

import json

import numpy as np
import pytest
import tensorflow_datasets as tfds

from fedjax_fm.data import sources


class TestTfds:

  def test_mnist_mock(self):
    with tfds.testing.mock_data(num_examples=6):
      data = sources.load_tfds('mnist', 'train')
    assert set(data) == {'image', 'label'}
    assert data['image'].shape == (6, 28, 28, 1)
    assert data['image'].dtype == np.uint8
    assert data['label'].shape == (6,)
    assert np.issubdtype(data['label'].dtype, np.integer)
    assert np.all((data['label'] >= 0) & (data['label'] < 10))

  def test_text_mock_keys_and_max_examples(self):
    with tfds.testing.mock_data(num_examples=5):
      data = sources.load_tfds('imdb_reviews', 'train', keys=['text'],
                               max_examples=3)
    assert list(data) == ['text']
    assert data['text'].dtype == object and data['text'].shape == (3,)
    assert all(isinstance(t, str) for t in data['text'])

  def test_unknown_key(self):
    with tfds.testing.mock_data(num_examples=2):
      with pytest.raises(ValueError, match="'nope'.*available.*label"):
        sources.load_tfds('imdb_reviews', 'train', keys=['nope'])

  def test_unknown_dataset(self):
    with pytest.raises(ValueError, match='no_such_dataset_xyz'):
      sources.load_tfds('no_such_dataset_xyz', 'train')

  def test_bad_max_examples(self):
    with pytest.raises(ValueError, match='max_examples'):
      sources.load_tfds('mnist', 'train', max_examples=0)


class TestJsonl:

  def test_load(self, tmp_path):
    path = tmp_path / 'd.jsonl'
    rows = [{'text': 'a b', 'label': 1, 'score': 0.5},
            {'text': 'c', 'label': 0, 'score': 1.5}]
    path.write_text('\n'.join(json.dumps(r) for r in rows) + '\n\n')
    data = sources.load_jsonl(path)
    assert list(data) == ['text', 'label', 'score']
    assert data['text'].dtype == object
    assert list(data['text']) == ['a b', 'c']
    np.testing.assert_array_equal(data['label'], [1, 0])
    assert np.issubdtype(data['label'].dtype, np.integer)
    np.testing.assert_allclose(data['score'], [0.5, 1.5])
    only = sources.load_jsonl(path, fields=['label'])
    assert list(only) == ['label']

  def test_missing_field(self, tmp_path):
    path = tmp_path / 'd.jsonl'
    path.write_text('{"text": "a", "label": 1}\n{"text": "b"}\n')
    with pytest.raises(ValueError, match=r"line 2.*'label'"):
      sources.load_jsonl(path)
    with pytest.raises(ValueError, match=r"'nope'.*available.*'label'"):
      sources.load_jsonl(path, fields=['nope'])

  def test_malformed_line(self, tmp_path):
    path = tmp_path / 'd.jsonl'
    path.write_text('{"a": 1}\n\n{"a": 2\n')
    with pytest.raises(ValueError, match='line 3'):
      sources.load_jsonl(path)
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match='line 2.*object'):
      sources.load_jsonl(path)

  def test_empty_and_missing(self, tmp_path):
    path = tmp_path / 'e.jsonl'
    path.write_text('\n  \n')
    with pytest.raises(ValueError, match='empty'):
      sources.load_jsonl(path)
    with pytest.raises(FileNotFoundError, match='missing.jsonl'):
      sources.load_jsonl(tmp_path / 'missing.jsonl')


class TestCsv:

  def test_load_and_types(self, tmp_path):
    path = tmp_path / 'd.csv'
    path.write_text('text,label,score\n"hello, world",1,0.5\nbye,2,3\n')
    data = sources.load_csv(path)
    assert list(data['text']) == ['hello, world', 'bye']
    assert data['text'].dtype == object
    assert data['label'].dtype == np.int64
    np.testing.assert_array_equal(data['label'], [1, 2])
    assert data['score'].dtype == np.float64
    np.testing.assert_allclose(data['score'], [0.5, 3.0])
    assert list(sources.load_csv(path, fields=['score'])) == ['score']

  def test_delimiter(self, tmp_path):
    path = tmp_path / 'd.tsv'
    path.write_text('a\tb\n1\tx y\n')
    data = sources.load_csv(path, delimiter='\t')
    assert list(data['b']) == ['x y']

  def test_errors(self, tmp_path):
    path = tmp_path / 'd.csv'
    path.write_text('a,b\n1,2\n3\n')
    with pytest.raises(ValueError, match='line 3'):
      sources.load_csv(path)
    path.write_text('a,b\n1,2\n')
    with pytest.raises(ValueError, match=r"'c'.*available.*'a', 'b'"):
      sources.load_csv(path, fields=['c'])
    path.write_text('')
    with pytest.raises(ValueError, match='empty'):
      sources.load_csv(path)
    with pytest.raises(FileNotFoundError):
      sources.load_csv(tmp_path / 'nope.csv')


class TestText:

  def test_load(self, tmp_path):
    path = tmp_path / 't.txt'
    path.write_text('first line\n\n   \nsecond  line\r\nthird\n')
    data = sources.load_text(path)
    assert list(data) == ['text']
    assert list(data['text']) == ['first line', 'second  line', 'third']
    assert data['text'].dtype == object

  def test_errors(self, tmp_path):
    path = tmp_path / 't.txt'
    path.write_text('\n\n')
    with pytest.raises(ValueError, match='no non-empty'):
      sources.load_text(path)
    with pytest.raises(FileNotFoundError):
      sources.load_text(tmp_path / 'nope.txt')
