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


def test_system_options_are_valid_with_comm_none():
  """Heterogeneous clients (het) and FedNova / SCAFFOLD on every computational route."""
  for comp in matrix.COMPUTATION:
    for opts in ('het', 'fednova', 'scaffold', 'fednova,het', 'scaffold,het'):
      c = matrix.get_config(f'{comp},none,{opts},tiny')
      config_lib.validate(c, num_devices=1)
      assert c.fl.algorithm == ('fednova' if 'fednova' in opts else
                                'scaffold' if 'scaffold' in opts else 'fedavg')
      assert (c.fl.step_budget == 'uniform') == ('het' in opts)
  config_lib.validate(matrix.get_config('lora,q4,het'), num_devices=1)
  with pytest.raises(config_lib.ConfigError, match='compress.uplink'):
    config_lib.validate(matrix.get_config('lora,topk_ef,scaffold'), num_devices=1)
  with pytest.raises(ValueError, match='two algorithms'):
    matrix.get_config('lora,none,fednova,scaffold')


def test_hetlora_option_is_valid_with_lora_and_comm_none():
  """Heterogeneous LoRA ranks: COMP=lora, COMM=none; other cells are rejected."""
  for variant in ('', ',tiny'):
    c = matrix.get_config('lora,none,hetlora' + variant)
    config_lib.validate(c, num_devices=1)
    assert c.peft.rank_distribution == 'tiers' and c.peft.lora_aggregation == 'hetlora'
    assert max(c.peft.ranks) == c.peft.rank
  with pytest.raises(config_lib.ConfigError, match='compress.uplink'):
    config_lib.validate(matrix.get_config('lora,q4,hetlora'), num_devices=1)
  with pytest.raises(config_lib.ConfigError, match='heterogeneous LoRA ranks'):
    config_lib.validate(matrix.get_config('lora,prune,hetlora'), num_devices=1)
  with pytest.raises(ValueError, match='COMP=lora'):
    matrix.get_config('adapter,none,hetlora')


def test_fedkseed_column():
  """COMM=fedkseed: the zeroth-order algorithm on every route; with het; not with others."""
  for comp in matrix.COMPUTATION:
    c = matrix.get_config(f'{comp},fedkseed,tiny')
    assert c.fl.algorithm == 'fedkseed' and c.client_optimizer.name == 'sgd'
  c = matrix.get_config('lora,fedkseed,het,tiny')
  config_lib.validate(c, num_devices=1)
  assert c.fl.algorithm == 'fedkseed' and c.fl.step_budget == 'uniform'
  with pytest.raises(ValueError, match='itself the algorithm'):
    matrix.get_config('lora,fedkseed,scaffold')
  with pytest.raises(config_lib.ConfigError, match='peft'):
    config_lib.validate(matrix.get_config('lora,fedkseed,hetlora'), num_devices=1)


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
