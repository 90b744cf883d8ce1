"""The binary's errors: one short message and exit status 2, never a traceback."""

import os
import subprocess
import sys

import pytest

from experiments import main as main_lib

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
