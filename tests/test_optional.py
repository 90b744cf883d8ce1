"""Optional dependencies: the core install imports without them, and a missing
one is reported with the extra that installs it."""

import os
import subprocess
import sys

import pytest

from fedjax_fm import extras
from fedjax_fm.data import sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_require_returns_the_module():
  assert extras.require('json', 'none', 'x') is sys.modules['json']


def test_require_names_the_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, 'tensorboardX', None)
  with pytest.raises(ImportError, match=(
      r'--config.tensorboard=True needs tensorboardX: '
      r'pip install "fedjax_fm\[tensorboard\]"')) as e:
    extras.require('tensorboardX', 'tensorboard', '--config.tensorboard=True')
  assert isinstance(e.value.__cause__, ImportError)


def test_load_tfds_without_tfds(monkeypatch):
  monkeypatch.setitem(sys.modules, 'tensorflow_datasets', None)
  with pytest.raises(ImportError, match=(
      r'data.source="tfds" needs TensorFlow Datasets: '
      r'pip install "fedjax_fm\[tfds\]"')):
    sources.load_tfds('mnist', 'train')


def test_extras_are_declared():
  tomllib = pytest.importorskip('tomllib')
  with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
    project = tomllib.load(f)['project']
  declared = project['optional-dependencies']
  core = ' '.join(project['dependencies']).lower()
  for module, (_, extra) in extras.EXTRAS.items():
    assert extra in declared, (module, extra)
    for requirement in declared[extra]:
      name = requirement.split('>')[0].split('=')[0].split('[')[0].lower()
      assert name not in core, f'{name} is both core and in extra {extra!r}'


_BLOCKED = sorted(extras.EXTRAS)

_IMPORT_ALL = f"""
import importlib, pkgutil, sys

class Block:
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in {_BLOCKED!r}:
      raise ModuleNotFoundError(f'No module named {{name!r}} (blocked)')
    return None

sys.meta_path.insert(0, Block())
import fedjax_fm
for m in pkgutil.walk_packages(fedjax_fm.__path__, 'fedjax_fm.'):
  importlib.import_module(m.name)
import experiments.main
"""


@pytest.mark.slow
def test_core_imports_without_extras():
  """Every fedjax_fm module (and experiments.main) imports without the extras."""
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-c', _IMPORT_ALL], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-4000:]


def test_tensorboard_off_without_its_extra_says_how_to_get_it(tmp_path, monkeypatch, capsys):
  from fedjax_fm.train import logs  # pylint: disable=g-import-not-at-top
  monkeypatch.setitem(sys.modules, 'tensorboardX', None)   # import fails
  assert logs.tensorboard_writer(str(tmp_path)) is None
  out = capsys.readouterr().out
  assert 'pip install "fedjax_fm[tensorboard]"' in out and 'metrics.jsonl only' in out
