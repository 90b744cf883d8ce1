"""The computation x communication matrix: every cell is a valid config; a sample runs."""

import json
import os
import subprocess
import sys

import pytest

from experiments.configs import matrix
from fedjax_fm import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_cell_is_valid():
  for comp in matrix.COMPUTATION:
    for comm in matrix.COMMUNICATION:
      config_lib.validate(matrix.get_config(f'{comp},{comm}'), num_devices=1)
      config_lib.validate(matrix.get_config(f'{comp},{comm},tiny'), num_devices=1)
  with pytest.raises(ValueError, match='COMP,COMM'):
    matrix.get_config('lora')


@pytest.mark.slow
def test_run_matrix_writes_the_table(tmp_path):
  proc = subprocess.run(
      [sys.executable, 'scripts/run_matrix.py', f'--out={tmp_path}', '--comp', 'prefix',
       '--comm', 'none', 'q4', '--rounds', '1'],
      cwd=ROOT, capture_output=True, text=True, timeout=900,
      env={**os.environ, 'XLA_FLAGS': ''})
  assert proc.returncode == 0, proc.stderr[-3000:]
  cells = json.loads(proc.stdout.strip().splitlines()[-1])['cells']
  assert set(cells) == {'prefix,none', 'prefix,q4'}
  # 4-bit values plus a (scale, offset) pair of f32 per 256-value block: 4.25 bits a
  # value against 32, i.e. at least 7.5x fewer bytes (every prefix tensor is compressed).
  ratio = cells['prefix,none']['uplink_bytes'] / cells['prefix,q4']['uplink_bytes']
  assert 7.0 < ratio <= 8.0, ratio
  table = (tmp_path / 'matrix.md').read_text()
  assert '| prefix |' in table and 'ppl' in table
