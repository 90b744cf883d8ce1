"""Two JAX processes on loopback (CPU) run the same rounds as one process."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _cmd(workdir, *extra):
  return [sys.executable, '-m', 'experiments.main',
          '--config=experiments/configs/mlp_synthetic.py:tiny', f'--workdir={workdir}',
          '--config.progress=False', '--config.fl.chunk_size=2', *extra]


def _records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}
  single = subprocess.run(_cmd(tmp_path / 'single'), cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
  assert single.returncode == 0, single.stderr[-2000:]

  port = _free_port()
  multi_dir = tmp_path / 'multi'
  procs = [subprocess.Popen(
      _cmd(multi_dir, '--config.fl.strategy=sharded',
           f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
           f'--process_id={i}'),
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  # Logs come from process 0 only.
  assert 'round 3/3' in outs[0][0] and 'round 3/3' not in outs[1][0]

  ref, got = _records(tmp_path / 'single'), _records(multi_dir)
  assert len(ref) == len(got) == 3
  for a, b in zip(ref, got):
    assert a['num_clients'] == b['num_clients'] and a['uplink_bytes'] == b['uplink_bytes']
    for key in ('train_loss', 'update_norm', 'param_norm'):
      np.testing.assert_allclose(b[key], a[key], rtol=1e-5)
    np.testing.assert_allclose(b['client_loss'], a['client_loss'], rtol=1e-5)
  np.testing.assert_allclose(got[-1]['eval']['accuracy'], ref[-1]['eval']['accuracy'])
