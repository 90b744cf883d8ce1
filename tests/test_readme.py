"""The README's code for other JAX codebases runs as written."""

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python_blocks():
  with open(os.path.join(ROOT, 'README.md')) as f:
    text = f.read()
  return re.findall(r'```python\n(.*?)```', text, flags=re.S)


@pytest.mark.slow
def test_ops_example_runs_and_learns(capsys):
  blocks = [b for b in _python_blocks() if 'engine.build_round' in b]
  assert len(blocks) == 1
  exec(compile(blocks[0], 'README.md', 'exec'), {})  # pylint: disable=exec-used
  lines = capsys.readouterr().out.strip().splitlines()
  losses = [float(line.split()[1]) for line in lines]
  uplink = [float(line.split()[2]) for line in lines]
  assert len(losses) == 3 and losses[-1] < losses[0]
  assert uplink[0] == 64 * 16 * 4 * 4   # 64 clients x a 16x4 f32 matrix


def test_readme_commands_match_ci():
  with open(os.path.join(ROOT, 'README.md')) as f:
    text = f.read()
  with open(os.path.join(ROOT, '.ci', 'run')) as f:
    ci = ' '.join(f.read().split())
  test_cmd = re.search(r'Run the tests.*?```bash\n(.*?)\n```', text, flags=re.S).group(1)
  for part in test_cmd.split(' && '):
    assert ' '.join(part.split()) in ci, part
