"""docs/ops.md: the ops used from plain JAX code, run as written."""

import os
import re

import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ops_page_runs(capsys):
  with open(os.path.join(ROOT, 'docs', 'ops.md')) as f:
    blocks = re.findall(r'```python\n(.*?)```', f.read(), flags=re.S)
  assert len(blocks) >= 4
  namespace = {}
  for block in blocks:
    exec(compile(block, 'docs/ops.md', 'exec'), namespace)  # pylint: disable=exec-used
  out = capsys.readouterr().out
  assert 'bytes' in out and 'epsilon' in out
