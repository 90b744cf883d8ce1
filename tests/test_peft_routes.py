"""Every PEFT route trains in its tiny config; only its variables are trainable."""

import jax
import numpy as np
import pytest

from experiments.configs import peft_routes
from fedjax_fm import config as config_lib
from fedjax_fm import train


def test_every_route_is_a_valid_config():
  for route in peft_routes.ROUTES:
    config_lib.validate(peft_routes.get_config(route), num_devices=1)
    config_lib.validate(peft_routes.get_config(route + ',tiny'), num_devices=1)
  with pytest.raises(ValueError, match='unknown'):
    peft_routes.get_config('qlora')


EXPECTED_LEAVES = {
    'adapter': ('down_', 'up_', 'classifier'), 'bitfit': ('bias', 'classifier'),
    'ia3': ('ia3', 'classifier'),
    'lora_ffa': ('lora_b', 'classifier'), 'prompt': ('prompt',), 'prefix': ('prefix',),
}


@pytest.mark.slow
@pytest.mark.parametrize('route', peft_routes.ROUTES)
def test_route_trains_tiny(tmp_path, route):
  c = peft_routes.get_config(route + ',tiny')
  c.progress = False
  c.checkpoint.every = 0
  if route == 'slora':
    c.num_rounds, c.peft.slora_stage1_rounds = 3, 1
  if route in EXPECTED_LEAVES:
    exp = train.build_experiment(c, str(tmp_path / 'build'))
    paths = ['/'.join(map(str, k)) for k, _ in
             jax.tree_util.tree_flatten_with_path(exp.split.trainable)[0]]
    assert paths and all(any(w in p for w in EXPECTED_LEAVES[route]) for p in paths), paths
  summary = train.run(c, str(tmp_path / 'run'))
  assert np.isfinite(summary['after']['loss'])
  assert summary['trainable_params'] > 0
  if route in ('prompt', 'prefix', 'full', 'lora_fedit'):
    assert summary['after']['loss'] < summary['before']['loss']


@pytest.mark.slow
def test_slora_stages_share_one_accountant_and_one_metrics_file(tmp_path):
  """SLoRA is a stage of one loop: the rounds of both stages are accounted together."""
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  from fedjax_fm import privacy  # pylint: disable=g-import-not-at-top
  c = peft_routes.get_config('slora,tiny')
  c.progress = c.tensorboard = False
  c.checkpoint.every = 0
  c.num_rounds, c.peft.slora_stage1_rounds = 4, 2
  c.privacy.enabled, c.privacy.noise_multiplier, c.privacy.clip_norm = True, 1.0, 1.0
  summary = train.run(c, str(tmp_path))
  records = [json.loads(l) for l in open(os.path.join(tmp_path, 'metrics.jsonl'))]
  assert [r['round'] for r in records] == [1, 2, 3, 4]
  eps = [r['epsilon'] for r in records]
  assert eps == sorted(eps) and eps[2] > eps[1]
  population = train.build_experiment(c, str(tmp_path / 'x')).data.train.num_clients
  want = privacy.epsilon(1.0, c.fl.clients_per_round / population, 4, c.privacy.delta,
                         sampling='fixed', population=population)
  assert summary['epsilon'] == pytest.approx(want, rel=1e-9)
  assert 'stage1_after' in summary
