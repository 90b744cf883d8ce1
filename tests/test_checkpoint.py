"""Checkpoints: resume after SIGKILL (mid-training and mid-save) is bit-identical."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from fedjax_fm import checkpoint
from fedjax_fm import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = 'experiments/configs/mlp_synthetic.py:tiny'
ROUNDS = 14

# Runs the tiny config; with KILL_IN_SAVE=k, SIGKILLs itself while orbax is
# writing the checkpoint of round k (as soon as its temporary directory exists).
DRIVER = r'''
import os, signal, sys, threading, time, glob
import orbax.checkpoint as ocp
from absl import app
kill_round = int(os.environ.get('KILL_IN_SAVE', '0'))
if kill_round:
  original = ocp.CheckpointManager.save
  def save(self, step, *args, **kwargs):
    if step != kill_round:
      return original(self, step, *args, **kwargs)
    t = threading.Thread(target=original, args=(self, step) + args, kwargs=kwargs)
    t.start()
    deadline = time.time() + 30
    while time.time() < deadline:
      if glob.glob(os.path.join(str(self.directory), '*tmp*')):
        break
    os.kill(os.getpid(), signal.SIGKILL)
  ocp.CheckpointManager.save = save
sys.argv = ['main'] + sys.argv[1:]
from experiments import main
app.run(main.main)
'''


def _run(workdir, extra_env=None, wait=True):
  cmd = [sys.executable, '-c', DRIVER, f'--config={CONFIG}', f'--workdir={workdir}',
         f'--config.num_rounds={ROUNDS}', '--config.checkpoint.every=2',
         '--config.progress=False', '--config.eval.every=100']
  env = {**os.environ, 'XLA_FLAGS': '', **(extra_env or {})}
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  if wait:
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out, err
  return proc


def _final_params(workdir):
  config = _config()
  exp = train.build_experiment(config, str(workdir))
  like = exp.fed_round.init(exp.split.trainable, jax.random.key(0))
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'))
  state, _ = ckpt.restore(like)
  ckpt.close()
  return state


def _config():
  from tests.test_experiments import load_config  # pylint: disable=g-import-not-at-top
  c = load_config('mlp_synthetic')
  c.num_rounds = ROUNDS
  return c


def _rounds(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line)['round'] for line in f]


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_identical(tmp_path):
  ref_dir, kill_dir, save_dir = tmp_path / 'ref', tmp_path / 'train_kill', tmp_path / 'save_kill'
  rc, _, err = _run(ref_dir)
  assert rc == 0, err[-2000:]
  ref = _final_params(ref_dir)
  assert int(ref.round) == ROUNDS

  # 1) SIGKILL mid-training: once a few rounds are logged, kill at once.
  proc = _run(kill_dir, wait=False)
  deadline = time.time() + 300
  while time.time() < deadline:
    path = kill_dir / 'metrics.jsonl'
    if path.exists() and len(path.read_text().splitlines()) >= 5:
      break
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  assert proc.returncode == -signal.SIGKILL
  assert len(_rounds(kill_dir)) < ROUNDS
  rc, out, err = _run(kill_dir)
  assert rc == 0, err[-2000:]
  assert 'resumed from' in out
  assert _rounds(kill_dir) == list(range(1, ROUNDS + 1))

  # 2) SIGKILL while orbax writes the checkpoint of round 6.
  rc, _, _ = _run(save_dir, {'KILL_IN_SAVE': '6'})
  assert rc == -signal.SIGKILL
  ckpt = checkpoint.Checkpointer(os.path.join(save_dir, 'checkpoints'))
  assert ckpt.latest_round() == 4      # the torn save of round 6 is not visible
  ckpt.close()
  rc, out, err = _run(save_dir)
  assert rc == 0, err[-2000:]
  assert 'resumed from' in out and 'at round 4' in out

  for workdir in (kill_dir, save_dir):
    got = _final_params(workdir)
    assert int(got.round) == ROUNDS
    assert checkpoint.tree_equal(got.params, ref.params)
    assert checkpoint.tree_equal(got.opt_state, ref.opt_state)
    np.testing.assert_array_equal(jax.random.key_data(got.key), jax.random.key_data(ref.key))


@pytest.mark.slow
def test_same_seed_gives_bit_identical_metrics(tmp_path):
  c = _config()
  c.num_rounds = 3
  c.progress = False
  train.run(c, str(tmp_path / 'a'))
  train.run(c, str(tmp_path / 'b'))
  strip = lambda recs: [{k: v for k, v in r.items() if not k.endswith('time_s')} for r in recs]
  read = lambda d: [json.loads(l) for l in open(os.path.join(d, 'metrics.jsonl'))]
  assert strip(read(tmp_path / 'a')) == strip(read(tmp_path / 'b'))


def test_restore_without_checkpoint_is_a_clear_error(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'none'))
  with pytest.raises(FileNotFoundError, match='no checkpoint under'):
    ckpt.restore(None)
  ckpt.close()


@pytest.mark.slow
def test_lora_stack_run_resumes_bit_identically(tmp_path):
  """`stack` merges into the base inside the round (ServerState.base_delta), so a
  run stopped after a checkpoint and resumed equals an uninterrupted one."""
  from experiments.configs import decoder_lora_lm  # pylint: disable=g-import-not-at-top
  c = decoder_lora_lm.get_config('tiny')
  c.peft.lora_aggregation = 'stack'
  c.num_rounds, c.checkpoint.every, c.eval.every = 4, 2, 2
  c.progress, c.tensorboard = False, False
  train.run(c, str(tmp_path / 'straight'))
  c.num_rounds = 2
  train.run(c, str(tmp_path / 'resumed'))            # stops after the round-2 checkpoint
  c.num_rounds = 4
  train.run(c, str(tmp_path / 'resumed'))            # resumes at round 2
  strip = lambda recs: [{k: v for k, v in r.items() if not k.endswith('time_s')} for r in recs]
  read = lambda d: [json.loads(l) for l in open(os.path.join(d, 'metrics.jsonl'))]
  straight, resumed = read(tmp_path / 'straight'), read(tmp_path / 'resumed')
  assert [r['round'] for r in resumed] == [1, 2, 3, 4]
  assert strip(straight) == strip(resumed)
  assert straight[-1]['eval'] == resumed[-1]['eval']
  ckpts = [checkpoint.Checkpointer(str(tmp_path / d / 'checkpoints'))
           for d in ('straight', 'resumed')]
  exp = train.build_experiment(c, str(tmp_path / 'x'))
  like = exp.fed_round.init(exp.split.trainable, jax.random.key(0))
  (a, _), (b, _) = [k.restore(like) for k in ckpts]
  assert jax.tree.leaves(a.base_delta)   # the merged base update is in the state
  raw = lambda s: s._replace(key=jax.random.key_data(s.key))
  assert checkpoint.tree_equal(raw(a), raw(b))
  for k in ckpts:
    k.close()
