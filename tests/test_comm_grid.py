"""The communication grid's tiny points run and the plot is drawn from their metrics."""

import json
import os
import subprocess
import sys

import pytest

from experiments.configs import comm_grid
from fedjax_fm import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_point_is_a_valid_config():
  for point in comm_grid.POINTS:
    config_lib.validate(comm_grid.get_config(point), num_devices=1)
    config_lib.validate(comm_grid.get_config(point + ',tiny'), num_devices=1)
  with pytest.raises(ValueError, match='unknown'):
    comm_grid.get_config('top99')


@pytest.mark.slow
def test_grid_and_plot(tmp_path):
  out = tmp_path / 'comm'
  proc = subprocess.run(
      [sys.executable, 'scripts/run_comm_grid.py', f'--out={out}', '--tiny',
       '--points', 'none', 'topk1_ef'],
      cwd=ROOT, capture_output=True, text=True, timeout=900,
      env={**os.environ, 'XLA_FLAGS': ''})
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result['bench'] == 'comm_grid'
  assert result['none_uplink_bytes'] > 50 * result['topk1_ef_uplink_bytes']
  png = tmp_path / 'comm.png'
  proc = subprocess.run([sys.executable, 'scripts/plot_comm.py', f'--runs={out}',
                         f'--out={png}'], cwd=ROOT, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert png.stat().st_size > 10_000
  with open(png, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
