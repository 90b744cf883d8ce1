"""The binary's errors: one short message and exit status 2, never a traceback."""

import os
import re
import subprocess
import sys

import pytest
from absl import app
from absl import flags

from experiments import main as main_lib
from fedjax_fm import config as config_lib
from fedjax_fm import config_docs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, 'experiments', 'configs', 'mlp_synthetic.py') + ':tiny'


def test_misspelled_field_names_section_and_suggests():
  msg = main_lib._unknown_override(['main', f'--config={TINY}', '--config.fl.num_clent=5'])
  assert msg.startswith('--config.fl.num_clent: fl has no field')
  assert "'data.num_clients'" in msg   # found in another section


def test_misspelled_section_suggests_section():
  msg = main_lib._unknown_override(['main', f'--config={TINY}', '--config.fll.local_steps=2'])
  assert 'the top level has no field' in msg and "did you mean 'fl'" in msg


def test_valid_overrides_are_not_reported():
  assert main_lib._unknown_override(
      ['main', f'--config={TINY}', '--config.fl.local_steps=2', '--config.seed=3']) is None


@pytest.mark.parametrize('make', ['file', 'missing_parent'])
def test_bad_workdir_exits_2(tmp_path, make, capsys):
  if make == 'file':
    workdir = tmp_path / 'a_file'
    workdir.write_text('x')
  else:
    blocker = tmp_path / 'blocker'
    blocker.write_text('x')
    workdir = blocker / 'run'
  with pytest.raises(SystemExit) as e:
    main_lib.check_workdir(str(workdir))
  assert e.value.code == main_lib.USAGE_ERROR
  assert f'--workdir={workdir}' in capsys.readouterr().err


def test_good_workdir_is_created(tmp_path):
  main_lib.check_workdir(str(tmp_path / 'new' / 'run'))
  assert (tmp_path / 'new' / 'run').is_dir()


def _run(*args):
  return subprocess.run([sys.executable, '-m', 'experiments.main', f'--config={TINY}', *args],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize('args, expected', [
    (['--config.fl.num_clent=5'], "fl has no field 'num_clent'"),
    (['--config.data.num_clients=-5'], 'config.data.num_clients=-5 is invalid'),
    (['--config.data.num_clients=abc'], 'invalid literal'),
    (['--workdir=/proc/fedjax_fm_x'], 'cannot be created'),
])
def test_binary_errors_are_short(tmp_path, args, expected):
  if not any(a.startswith('--workdir') for a in args):
    args = [*args, f'--workdir={tmp_path}']
  out = _run('--compilation_cache=', *args)
  assert out.returncode == main_lib.USAGE_ERROR, out.stderr
  assert expected in out.stderr
  assert 'Traceback' not in out.stderr
  assert len(out.stderr.strip().splitlines()) <= 3, out.stderr


@pytest.mark.slow
def test_verbose_shows_the_traceback(tmp_path):
  out = _run('--compilation_cache=', '--verbose', '--config.data.num_clients=-5',
             f'--workdir={tmp_path}')
  assert out.returncode != 0 and 'Traceback' in out.stderr


# ---- --config_help and the field docs

CONFIG_DIR = os.path.join(ROOT, 'experiments', 'configs')


def _shipped_configs():
  """(spec, config) of every config file under experiments/configs and its documented args."""
  specs = []
  for name in sorted(os.listdir(CONFIG_DIR)):
    if not name.endswith('.py') or name.startswith('_'):
      continue
    path = os.path.join(CONFIG_DIR, name)
    with open(path) as f:
      text = f.read()
    # The args a config's docstring runs it with (`--config=...py:ARG`), plus no arg.
    args = {''} | set(re.findall(re.escape(name) + r':([\w,]+)', text))
    specs += [f'{path}:{arg}' if arg else path for arg in sorted(args)]
  return specs


SHIPPED = _shipped_configs()


def test_shipped_configs_are_found():
  names = {os.path.basename(s.partition(':')[0]) for s in SHIPPED}
  assert {'default.py', 'mlp_synthetic.py', 'llm_instruct.py', 'matrix.py'} <= names
  assert f'{os.path.join(CONFIG_DIR, "mlp_synthetic.py")}:tiny' in SHIPPED


@pytest.mark.parametrize('spec', SHIPPED, ids=lambda s: os.path.relpath(s, CONFIG_DIR))
def test_every_field_of_every_shipped_config_is_documented(spec):
  config = main_lib._load_config_file(spec)
  assert config is not None, f'{spec} does not load'
  missing = config_docs.undocumented(config)
  assert not missing, (f'fields of {spec} without a line in fedjax_fm/config_docs.py '
                       f'FIELD_DOCS: {missing}')


def test_base_config_is_documented_and_docs_are_one_line():
  assert not config_docs.undocumented(config_lib.base_config())
  for name, doc in config_docs.FIELD_DOCS.items():
    assert doc.strip() and '\n' not in doc, name


def test_every_doc_names_a_field():
  stale = sorted(set(config_docs.FIELD_DOCS) - set(config_docs.field_names(
      config_lib.base_config())))
  assert not stale, f'FIELD_DOCS entries of fields base_config() no longer has: {stale}'


def test_undocumented_names_the_new_field():
  c = config_lib.base_config()
  c.fl.brand_new_field = 3
  c.brand_new_top = True
  new = set(config_docs.undocumented(c)) - set(config_docs.undocumented(
      config_lib.base_config()))
  assert new == {'brand_new_top', 'fl.brand_new_field'}


def test_config_help_lists_every_field_with_type_value_and_doc():
  c = main_lib._load_config_file(TINY)
  c.seed = 7
  text = main_lib.config_help(c)
  rows = {}
  for line in text.splitlines():
    parts = line.split()
    if line.startswith('  ') and parts:
      rows[parts[0]] = line
  assert set(rows) == set(config_docs.field_names(c))
  for name, line in rows.items():
    section, _, field = name.rpartition('.')
    value = c[section][field] if section else c[field]
    doc = config_docs.FIELD_DOCS.get(name, '(undocumented)')
    assert line.split()[1] == type(value).__name__, line
    assert repr(value) in line and line.endswith(doc), line
  assert rows['seed'].split()[:3] == ['seed', 'int', '7']
  assert rows['model.kind'].split()[2] == "'mlp'"          # the loaded config's value
  # Grouped: the top-level fields, then each section under its header, in order.
  headers = [line for line in text.splitlines() if line.startswith('[')]
  assert headers == ['[top level]'] + [f'[{s}]' for s in config_lib.SECTIONS]
  for section in config_lib.SECTIONS:
    block = text.split(f'[{section}]\n', 1)[1].split('\n\n', 1)[0]
    assert all(line.split()[0].startswith(section + '.') for line in block.splitlines())


def test_config_help_flag_prints_and_exits_0(capsys):
  """main() with --config_help and a path:arg config: the fields, status 0, nothing else."""
  try:
    main_lib.parse_flags(['main', f'--config={TINY}', '--config_help'])
    with pytest.raises(SystemExit) as e:
      app.run(main_lib.main, argv=['main'], flags_parser=lambda _: ['main'])
  finally:
    flags.FLAGS.unparse_flags()
  assert e.value.code in (0, None)
  out = capsys.readouterr().out
  assert out.startswith('Config fields')
  assert out.strip() == main_lib.config_help(main_lib._load_config_file(TINY))


@pytest.mark.slow
def test_binary_config_help_and_helpfull(tmp_path):
  out = _run('--config_help', '--config.seed=5', f'--workdir={tmp_path / "never"}')
  assert out.returncode == 0, out.stderr
  assert 'data.num_clients' in out.stdout and "'synthetic'" in out.stdout
  assert any(line.split()[:3] == ['seed', 'int', '5'] for line in out.stdout.splitlines())
  assert not (tmp_path / 'never').exists()      # exits before anything else
  full = subprocess.run([sys.executable, '-m', 'experiments.main', '--helpfull'], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
  assert '--[no]config_help' in full.stdout + full.stderr
