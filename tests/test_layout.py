"""The package's layout: the public surface and an import graph without upward arrows."""

import ast
import pathlib

import pytest

import fedjax_fm as fm

ROOT = pathlib.Path(__file__).resolve().parent.parent / 'fedjax_fm'

# package -> packages it must never import (directly, at any level of a module).
FORBIDDEN = {
    'engine': ('models', 'data', 'train', 'peft', 'hf', 'evaluation'),
    'aggregate': ('engine', 'models', 'data', 'train', 'peft', 'hf', 'evaluation'),
    'compress': ('engine', 'models', 'data', 'train', 'peft', 'hf', 'evaluation', 'aggregate'),
    'privacy': ('engine', 'models', 'data', 'train', 'peft', 'hf', 'evaluation'),
    'prune': ('engine', 'models', 'data', 'train', 'peft', 'hf', 'evaluation'),
    'models': ('peft', 'hf', 'train', 'engine', 'data'),
    'peft': ('hf', 'train', 'engine'),
    'data': ('engine', 'models', 'peft', 'hf', 'train'),
    'evaluation': ('train', 'hf'),
    'hf': ('train', 'engine'),
}


def _imports(path: pathlib.Path):
  """(module imported, names imported) for every import statement of a file."""
  tree = ast.parse(path.read_text())
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield alias.name, ()
    elif isinstance(node, ast.ImportFrom) and node.module:
      yield node.module, tuple(a.name for a in node.names)


def _package_of(module: str) -> str | None:
  parts = module.split('.')
  return parts[1] if len(parts) > 1 and parts[0] == 'fedjax_fm' else None


def _files():
  return sorted(p for p in ROOT.rglob('*.py'))


@pytest.mark.parametrize('package', sorted(FORBIDDEN))
def test_no_upward_imports(package):
  bad = []
  for path in sorted((ROOT / package).rglob('*.py')):
    for module, names in _imports(path):
      targets = {_package_of(module)}
      if module == 'fedjax_fm':   # from fedjax_fm import models
        targets |= set(names)
      for target in targets & set(FORBIDDEN[package]):
        bad.append(f'{path.relative_to(ROOT.parent)} imports fedjax_fm.{target}')
  assert not bad, '\n'.join(bad)


def test_no_cross_module_private_imports_and_no_flags():
  bad = []
  for path in _files():
    for module, names in _imports(path):
      if module.startswith('fedjax_fm') and any(n.startswith('_') for n in names):
        bad.append(f'{path.relative_to(ROOT.parent)}: from {module} import {names}')
      if module.split('.')[-1].startswith('_') and module.startswith('fedjax_fm'):
        bad.append(f'{path.relative_to(ROOT.parent)}: imports private module {module}')
      if module == 'absl.flags' or (module == 'absl' and 'flags' in names):
        bad.append(f'{path.relative_to(ROOT.parent)}: the library never reads flags')
  assert not bad, '\n'.join(bad)


def test_public_surface():
  assert fm.__version__
  for name in ('build_round', 'build_sweep', 'FederatedDataset', 'FederatedRound',
               'ServerState', 'Aggregator', 'Compressor'):
    assert callable(getattr(fm, name)) or isinstance(getattr(fm, name), type), name
  assert callable(fm.compress.top_k) and callable(fm.compress.error_feedback)
  assert callable(fm.aggregate.median) and callable(fm.aggregate.weighted_mean)
  assert callable(fm.privacy.DPFedAvg)
  assert callable(fm.train.run) and callable(fm.hf.from_pretrained)
  assert callable(fm.peft.apply_lora) and callable(fm.models.Decoder)
  with pytest.raises(AttributeError, match='no attribute'):
    fm.nope  # pylint: disable=pointless-statement


def test_every_package_directory_is_packaged():
  import tomllib  # pylint: disable=g-import-not-at-top
  cfg = tomllib.loads((ROOT.parent / 'pyproject.toml').read_text())
  listed = set(cfg['tool']['setuptools']['packages'])
  on_disk = {'.'.join(p.parent.relative_to(ROOT.parent).parts) for p in ROOT.rglob('__init__.py')}
  assert on_disk <= listed, sorted(on_disk - listed)
