"""End-to-end: every experiment config's tiny variant, the main binary, invariants."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from fedjax_fm import config as config_lib
from fedjax_fm import hf
from fedjax_fm import peft
from fedjax_fm import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(ROOT, 'experiments', 'configs')


def load_config(name, arg='tiny'):
  spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIG_DIR, name + '.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(arg)
  c.progress = False
  return c


def _read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def test_every_config_documents_its_command():
  names = [f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith('.py') and f != '__init__.py']
  assert len(names) >= 4
  for name in names:
    with open(os.path.join(CONFIG_DIR, name + '.py')) as f:
      text = f.read()
    assert f'python -m experiments.main --config=experiments/configs/{name}.py' in text
    config_lib.validate(load_config(name, ''), num_devices=1)
    # Grid configs (a named cell, then ",tiny") are checked cell by cell in their tests.
    tiny = 'tiny' if 'POINTS' not in text and 'ROUTES' not in text and 'COMPUTATION' \
        not in text else None
    if tiny:
      config_lib.validate(load_config(name, tiny), num_devices=1)
    with pytest.raises(ValueError, match='unknown'):
      load_config(name, 'huge')


@pytest.mark.slow
def test_mlp_synthetic_tiny_learns(tmp_path):
  summary = train.run(load_config('mlp_synthetic'), str(tmp_path))
  assert summary['after']['accuracy'] > summary['before']['accuracy'] + 0.2
  records = _read_metrics(tmp_path)
  assert [r['round'] for r in records] == [1, 2, 3]
  assert records[0]['compile_time_s'] > 0
  # uplink = participating clients x the trainable params' f32 bytes (no compression).
  assert records[0]['uplink_bytes'] == records[0]['num_clients'] * summary['trainable_params'] * 4
  assert records[-1]['cum_uplink_bytes'] == sum(r['uplink_bytes'] for r in records)
  assert len(records[0]['client_loss']) == records[0]['num_clients'] == 8


@pytest.mark.parametrize('strategy,chunk', [('vmap', 8), ('sharded', 1)])
@pytest.mark.slow
def test_strategies_agree_end_to_end(tmp_path, strategy, chunk):
  base = load_config('mlp_synthetic')
  base.fl.chunk_size = 4
  ref = train.run(base, str(tmp_path / 'chunked'))
  other = load_config('mlp_synthetic')
  other.fl.strategy, other.fl.chunk_size = strategy, chunk
  got = train.run(other, str(tmp_path / strategy))
  np.testing.assert_allclose(got['after']['loss'], ref['after']['loss'], rtol=1e-5)


@pytest.mark.slow
def test_tfds_mnist_tiny_on_mock_data(tmp_path):
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=200):
    summary = train.run(load_config('tfds_mnist'), str(tmp_path))
  assert summary['data'].startswith('TFDS mnist')
  assert np.isfinite(summary['after']['loss'])
  assert len(_read_metrics(tmp_path)) == 2


@pytest.mark.slow
def test_decoder_lora_tiny(tmp_path):
  summary = train.run(load_config('decoder_lora_lm'), str(tmp_path))
  assert os.path.exists(tmp_path / 'spm.model')
  assert summary['after']['loss'] < summary['before']['loss']
  assert 'perplexity' in summary['after']


@pytest.mark.slow
def test_default_minilm_lora_tiny_keeps_base_bit_identical(tmp_path, minilm_dir):
  config = load_config('default')
  exp = train.build_experiment(config, str(tmp_path))
  split, fed = exp.split, exp.fed_round
  # Only the LoRA factors and the classifier head are trainable and sent.
  flat = {'/'.join(map(str, k)): v for k, v in
          jax.tree_util.tree_flatten_with_path(split.trainable)[0]}
  assert flat and all(('lora_a' in k or 'lora_b' in k or 'classifier' in k) for k in flat)
  assert fed.uplink_bytes_per_client == peft.tree_bytes(split.trainable)
  assert peft.count_params(split.trainable) < 0.01 * peft.count_params(split.frozen)

  state = fed.init(split.trainable, jax.random.key(0))
  for r in range(2):
    state, metrics = fed.apply(state, split.frozen, exp.round_data(r))
  assert np.isfinite(float(metrics['train_loss']))
  # The trained model's base weights equal the checkpoint's, bit for bit.
  trained = peft.merge(split.graphdef, state.params, split.frozen)
  ckpt = hf.load_safetensors(minilm_dir)
  np.testing.assert_array_equal(
      np.asarray(trained.layers[0].query.base.kernel[...]),
      ckpt['encoder.layer.0.attention.self.query.weight'].T)
  np.testing.assert_array_equal(
      np.asarray(trained.embeddings.word.embedding[...]),
      ckpt['embeddings.word_embeddings.weight'])
  # ... while the LoRA B factors moved away from zero.
  assert float(np.abs(np.asarray(state.params['layers'][0]['query']['lora_b'])).max()) > 0


@pytest.mark.slow
def test_main_binary_runs_default_tiny(tmp_path):
  workdir = tmp_path / 'run'
  proc = subprocess.run(
      [sys.executable, '-m', 'experiments.main',
       '--config=experiments/configs/default.py:tiny', f'--workdir={workdir}',
       '--config.num_rounds=1', '--config.progress=False'],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
      env={**os.environ, 'XLA_FLAGS': ''})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'held-out before' in proc.stdout and 'held-out after 1 rounds' in proc.stdout
  summary = json.loads((workdir / 'summary.json').read_text())
  assert summary['rounds'] == 1 and summary['trainable_params'] > 0
  assert len(_read_metrics(workdir)) == 1


@pytest.mark.slow
def test_main_binary_rejects_bad_override(tmp_path):
  proc = subprocess.run(
      [sys.executable, '-m', 'experiments.main',
       '--config=experiments/configs/mlp_synthetic.py:tiny', f'--workdir={tmp_path}',
       '--config.fl.clients_per_round=1000'],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert 'config.fl.clients_per_round=1000 is invalid' in proc.stderr
  assert not os.path.exists(tmp_path / 'metrics.jsonl')


def _jsonl(path, rows):
  with open(path, 'w') as f:
    for r in rows:
      f.write(json.dumps(r) + '\n')


def _text_config(path):
  c = load_config('default')
  c.model.kind, c.model.hidden_size, c.model.num_layers, c.model.mlp_dim = 'encoder', 16, 1, 32
  c.model.num_heads = 2
  c.data.source, c.data.path, c.data.num_clients, c.data.partition = 'jsonl', str(path), 4, 'iid'
  c.fl.clients_per_round, c.fl.chunk_size = 2, 1
  c.num_rounds = 1
  return c


def test_bad_data_gets_clear_errors(tmp_path):
  path = tmp_path / 'd.jsonl'
  _jsonl(path, [{'text': f'example {i}', 'label': 0.5} for i in range(20)])
  with pytest.raises(config_lib.ConfigError, match='labels must be integers or strings'):
    train.run(_text_config(path), str(tmp_path / 'w1'))
  _jsonl(path, [{'text': f'example {i}', 'y': 1} for i in range(20)])
  with pytest.raises(config_lib.ConfigError, match=r"label_key='label' is not a field"):
    train.run(_text_config(path), str(tmp_path / 'w2'))
  path.write_text('')
  with pytest.raises(ValueError, match='empty'):
    train.run(_text_config(path), str(tmp_path / 'w3'))
  _jsonl(path, [{'text': f'example {i}', 'label': i % 2} for i in range(4)])
  c = _text_config(path)
  c.data.num_clients = 10
  with pytest.raises(config_lib.ConfigError, match='num_clients=10 is invalid'):
    train.run(c, str(tmp_path / 'w4'))
  assert not os.path.exists(tmp_path / 'w4' / 'metrics.jsonl')


@pytest.mark.slow
def test_jsonl_text_classification_runs(tmp_path):
  path = tmp_path / 'd.jsonl'
  _jsonl(path, [{'text': ['good movie', 'bad film'][i % 2] + f' {i}',
                 'label': ['pos', 'neg'][i % 2]} for i in range(40)])
  summary = train.run(_text_config(path), str(tmp_path / 'w'))
  assert np.isfinite(summary['after']['loss'])


def test_nan_features_are_rejected(tmp_path, monkeypatch):
  from fedjax_fm.train import task_data  # pylint: disable=g-import-not-at-top
  real = task_data.load_raw

  def with_nan(config):
    arrays, names, desc = real(config)
    arrays['x'][3, 0] = np.nan
    return arrays, names, desc
  monkeypatch.setattr(task_data, 'load_raw', with_nan)
  with pytest.raises(ValueError, match="feature 'x' has NaN or Inf in 1 examples"):
    train.run(load_config('mlp_synthetic'), str(tmp_path))


@pytest.mark.slow
def test_dp_run_reports_epsilon_at_most_the_target(tmp_path):
  c = load_config('mlp_synthetic')
  c.privacy.enabled = True
  c.privacy.target_epsilon = 5.0
  c.privacy.clip_norm = 0.5
  summary = train.run(c, str(tmp_path))
  records = _read_metrics(tmp_path)
  eps = [r['epsilon'] for r in records]
  assert eps == sorted(eps) and 0 < eps[-1] <= 5.0 + 1e-6
  from fedjax_fm import privacy
  direct = privacy.epsilon(summary['noise_multiplier'], 8 / 20, 3, 1e-5, sampling='fixed',
                           population=20)
  np.testing.assert_allclose(eps[-1], direct, rtol=1e-6)


@pytest.mark.slow
def test_nan_attackers_never_reach_the_model(tmp_path):
  c = load_config('mlp_synthetic')
  c.attack.kind, c.attack.fraction = 'nan', 0.25
  summary = train.run(c, str(tmp_path))
  records = _read_metrics(tmp_path)
  assert sum(r.get('nonfinite_clients', 0) for r in records) > 0
  assert np.isfinite(summary['after']['loss'])
  assert all(np.isfinite(r['param_norm']) for r in records)


@pytest.mark.slow
def test_pruning_follows_its_schedule(tmp_path):
  from fedjax_fm import prune
  c = load_config('mlp_synthetic')
  c.num_rounds = 6
  c.prune.enabled, c.prune.final_sparsity, c.prune.every = True, 0.8, 1
  c.prune.begin_round, c.prune.end_round, c.prune.min_size = 0, 4, 64
  train.run(c, str(tmp_path))
  schedule = prune.polynomial_schedule(0.0, 0.8, 0, 4)
  for rec in _read_metrics(tmp_path):
    # the masks of round r were set before it ran (schedule at r - 1, 0-based)
    np.testing.assert_allclose(rec['sparsity'], schedule(rec['round'] - 1), atol=2e-3)


@pytest.mark.slow
def test_compressed_uplink_is_measured_from_the_payload(tmp_path):
  c = load_config('mlp_synthetic')
  c.compress.uplink, c.compress.fraction, c.compress.error_feedback = 'top_k', 0.05, True
  c.compress.then, c.compress.then_bits = 'stochastic_uniform', 4
  summary = train.run(c, str(tmp_path))
  rec = _read_metrics(tmp_path)[0]
  dense = summary['trainable_params'] * 4
  exp = train.build_experiment(c, str(tmp_path / 'x'))
  per_client = exp.fed_round.uplink_bytes_per_client
  assert rec['uplink_bytes'] == rec['num_clients'] * per_client
  assert per_client < dense / 10
  assert summary['after']['accuracy'] > summary['before']['accuracy']


@pytest.mark.parametrize('mode', ['fedit', 'ffa', 'product', 'stack'])
@pytest.mark.slow
def test_lora_aggregation_modes_train_and_report_their_error(tmp_path, mode):
  c = load_config('mlp_synthetic')
  c.num_rounds = 4
  c.peft.method, c.peft.rank, c.peft.alpha = 'lora', 2, 4.0
  c.peft.target_modules, c.peft.extra_trainable = (r'layers\.\d+',), ('classifier',)
  c.peft.lora_aggregation = mode
  c.server_optimizer.name, c.server_optimizer.learning_rate = 'fedavg', 1.0
  c.client_optimizer.learning_rate = 0.3
  summary = train.run(c, str(tmp_path))
  errors = [r.get('lora_aggregation_error') for r in _read_metrics(tmp_path)]
  assert summary['after']['loss'] < summary['before']['loss']
  if mode == 'ffa':
    assert max(errors) < 1e-6                      # A is shared: averaging is exact
  elif mode == 'stack':
    assert errors == [None] * 4                    # exact by construction
  else:
    assert max(errors) > 1e-4                      # FedIT / rank-r truncation error


@pytest.mark.slow
def test_held_out_split_is_a_random_sample_in_random_order(tmp_path):
  # The stdlib docstrings come sorted by package (the label): the held-out split,
  # and any leading part of it that `eval.max_examples` keeps, must still mix labels.
  c = load_config('default')
  data = train.build_task_data(c, str(tmp_path))
  labels = np.asarray(data.eval['label'])
  assert np.any(np.diff(labels) < 0), 'held-out examples are in source (label) order'
  head = labels[:c.eval.max_examples]
  assert len(np.unique(head)) >= data.num_labels // 2, np.bincount(head)
  train_n, eval_n = data.train.num_examples, len(labels)
  assert eval_n == round(c.data.eval_fraction * (train_n + eval_n))


@pytest.mark.slow
def test_quantized_base_lora_run(tmp_path):
  """model.base_quant through the binary's path: the projections of the blocks are
  stored as frozen int8 blocks, and the LoRA run on them trains."""
  c = load_config('decoder_lora_lm')
  c.num_rounds, c.eval.every = 2, 2
  c.model.base_quant = 'int8'
  config_lib.validate(c, num_devices=1)
  exp = train.build_experiment(c, str(tmp_path))
  frozen = jax.tree_util.tree_leaves_with_path(exp.split.frozen)
  codes = [x for p, x in frozen if 'codes' in jax.tree_util.keystr(p)]
  assert codes and all(x.dtype == np.int8 for x in codes)
  assert not any('codes' in jax.tree_util.keystr(p)
                 for p, _ in jax.tree_util.tree_leaves_with_path(exp.split.trainable))
  summary = train.run(c, str(tmp_path))
  assert np.isfinite(summary['after']['loss'])
  assert summary['after']['loss'] < summary['before']['loss']


def test_quantized_base_rejections():
  c = load_config('decoder_lora_lm')
  c.model.base_quant = 'int4'
  with pytest.raises(config_lib.ConfigError, match=r"model.base_quant='int4'.*allowed"):
    config_lib.validate(c, num_devices=1)
  c.model.base_quant, c.peft.method = 'nf4', 'full'
  with pytest.raises(config_lib.ConfigError, match='peft.method="full" trains'):
    config_lib.validate(c, num_devices=1)
  c.peft.method, c.peft.lora_aggregation = 'lora', 'stack'
  with pytest.raises(config_lib.ConfigError, match='config.peft.lora_aggregation'):
    config_lib.validate(c, num_devices=1)
