"""Tests for fedjax_fm.data.stdlib_docs."""

import collections
import textwrap

import numpy as np
import pytest

from fedjax_fm.data import stdlib_docs


@pytest.fixture(scope='module')
def default_data():
  return stdlib_docs.build_stdlib_docstrings()


@pytest.mark.slow
def test_default_dataset(default_data):
  data = default_data
  n = data['text'].shape[0]
  assert n > 1000
  assert data['text'].dtype == object and data['module'].dtype == object
  assert data['label'].dtype == np.int32
  assert data['label'].shape == data['module'].shape == (n,)
  assert data['label_names'] == list(stdlib_docs.DEFAULT_PACKAGES)
  assert 8 <= len(data['label_names']) <= 10
  assert data['label'].min() == 0
  assert data['label'].max() == len(data['label_names']) - 1
  counts = np.bincount(data['label'])
  assert counts.min() >= 100, dict(zip(data['label_names'], counts))
  assert len(set(data['text'])) == n  # unique texts
  lengths = np.array([len(t) for t in data['text']])
  assert lengths.min() >= 40 and lengths.max() <= 1000
  assert all(' '.join(t.split()) == t for t in data['text'])
  for module, label in zip(data['module'], data['label']):
    assert module.split('.')[0] == data['label_names'][label]
    assert '.test' not in module and '.tests' not in module
  assert len(set(data['module'])) > 50  # enough natural clients


@pytest.mark.slow
def test_deterministic(default_data):
  again = stdlib_docs.build_stdlib_docstrings()
  for key in ('text', 'label', 'module'):
    np.testing.assert_array_equal(again[key], default_data[key])


def test_max_per_package_and_options(default_data):
  capped = stdlib_docs.build_stdlib_docstrings(('email', 'json'),
                                               max_per_package=50,
                                               min_chars=100, max_chars=200)
  counts = collections.Counter(capped['label'].tolist())
  assert counts[0] == 50
  assert 0 < counts[1] <= 50
  lengths = [len(t) for t in capped['text']]
  assert min(lengths) >= 100 and max(lengths) <= 200
  # Subsampling keeps a subset of the uncapped texts, in source order.
  full = stdlib_docs.build_stdlib_docstrings(('email',), max_per_package=None,
                                             min_chars=100, max_chars=200)
  email = [t for t, l in zip(capped['text'], capped['label']) if l == 0]
  positions = [list(full['text']).index(t) for t in email]
  assert positions == sorted(positions)


def _write(root, rel, source):
  path = root / rel
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(textwrap.dedent(source))


def test_parsing_rules(tmp_path):
  long = 'x' * 50
  _write(tmp_path, 'pkga/__init__.py', f'''
      """Package docstring of pkga, long enough to be kept {long}."""
      ''')
  _write(tmp_path, 'pkga/mod.py', f'''
      """Module   docstring
         spread over lines {long}."""

      class Foo:
        """Class docstring of Foo {long}."""

        def method(self):
          """Short."""

        async def amethod(self):
          """Async method docstring {long}."""

      def func():
        """Function docstring {long}."""
        def inner():
          """Class docstring of Foo {long}."""
      ''')
  _write(tmp_path, 'pkga/broken.py', 'def oops(:\n  """Never seen."""\n')
  _write(tmp_path, 'pkga/tests/test_x.py', f'"""Test docstring {long}."""')
  _write(tmp_path, 'pkga/test/__init__.py', f'"""Test pkg doc {long}."""')
  _write(tmp_path, 'pkgb/sub/leaf.py', f'"""Leaf docstring {"y" * 80}."""')
  data = stdlib_docs.build_stdlib_docstrings(
      ('pkga', 'pkgb'), stdlib_dir=tmp_path, min_chars=30, max_chars=60)
  texts = list(data['text'])
  assert texts == [
      f'Package docstring of pkga, long enough to be kept {long}'[:60],
      f'Module docstring spread over lines {long}.'[:60],
      f'Class docstring of Foo {long}.'[:60],
      f'Async method docstring {long}.'[:60],
      f'Function docstring {long}.'[:60],
      f'Leaf docstring {"y" * 80}'[:60],
  ]
  assert list(data['module']) == ['pkga'] + ['pkga.mod'] * 4 + [
      'pkgb.sub.leaf']
  np.testing.assert_array_equal(data['label'], [0, 0, 0, 0, 0, 1])


def test_unknown_package():
  with pytest.raises(ValueError, match='no_such_package_xyz'):
    stdlib_docs.build_stdlib_docstrings(('email', 'no_such_package_xyz'))


@pytest.mark.parametrize('kwargs, match', [
    (dict(packages=()), 'packages'),
    (dict(packages=('email', 'email')), 'duplicates'),
    (dict(min_chars=-1), 'min_chars'),
    (dict(min_chars=50, max_chars=10), 'max_chars'),
    (dict(max_per_package=0), 'max_per_package'),
])
def test_bad_args(kwargs, match):
  with pytest.raises(ValueError, match=match):
    stdlib_docs.build_stdlib_docstrings(**kwargs)


def test_cache_round_trip(tmp_path):
  kwargs = dict(packages=('json',), max_per_package=None)
  first = stdlib_docs.load_stdlib_docstrings(tmp_path, **kwargs)
  files = list(tmp_path.glob('*.json'))
  assert len(files) == 1
  second = stdlib_docs.load_stdlib_docstrings(tmp_path, **kwargs)
  for key in ('text', 'label', 'module'):
    np.testing.assert_array_equal(first[key], second[key])
    assert first[key].dtype == second[key].dtype
  assert second['label_names'] == ['json']
  other = stdlib_docs.load_stdlib_docstrings(tmp_path, packages=('json',),
                                             min_chars=80)
  assert len(list(tmp_path.glob('*.json'))) == 2
  assert len(other['text']) < len(first['text'])
