"""Run bookkeeping: totals kept across resumes, a finished run left as it is."""

import contextlib
import io
import json
import os
import time

import pytest

from fedjax_fm import train
from fedjax_fm.train import loop


def _tiny(num_rounds: int):
  from experiments.configs import mlp_synthetic  # pylint: disable=g-import-not-at-top
  c = mlp_synthetic.get_config('tiny')
  c.num_rounds = num_rounds
  c.checkpoint.every = 1
  c.eval.every = num_rounds
  c.progress = False
  return c


def _run(config, workdir):
  """``train.run`` with its console lines captured: (summary, stdout, wall seconds)."""
  out = io.StringIO()
  t0 = time.time()
  with contextlib.redirect_stdout(out):
    summary = train.run(config, workdir)
  return summary, out.getvalue(), time.time() - t0


def _snapshot(workdir):
  """Every file and directory under ``workdir``: its mtime and (files) its bytes."""
  snap = {}
  for root, dirs, files in os.walk(workdir):
    for name in dirs + files:
      path = os.path.join(root, name)
      st = os.stat(path)
      data = None
      if name in files:
        with open(path, 'rb') as f:
          data = f.read()
      snap[os.path.relpath(path, workdir)] = (st.st_mtime_ns, data)
  snap['.'] = (os.stat(workdir).st_mtime_ns, None)
  return snap


# ---- fast: the record's arithmetic

def test_totals_add_this_process_to_the_earlier_ones():
  clock = loop.Clock(start=time.time() - 5.0, build_s=1.5, compile_s=2.0)
  rec = loop.RunRecord(before={'loss': 1.0}, last_eval={'loss': 0.5}, clock=clock,
                       earlier={'wall_s': 10.0, 'build_s': 3.0, 'compile_s': 4.0})
  t = rec.totals()
  assert 15.0 <= t['wall_s'] < 15.0 + 60.0
  assert t['build_s'] == pytest.approx(4.5) and t['compile_s'] == pytest.approx(6.0)
  # Through the checkpoint (JSON extras) into the next process.
  extras = json.loads(json.dumps(rec.extras()))
  later = loop.Clock(build_s=0.25)
  rec2 = loop.RunRecord.restore(extras, later)
  t2 = rec2.totals()
  assert t2['wall_s'] >= t['wall_s']
  assert t2['build_s'] == pytest.approx(4.75) and t2['compile_s'] == pytest.approx(6.0)
  assert (rec2.before, rec2.last_eval) == (rec.before, rec.last_eval)


def test_extras_without_times_count_them_as_zero():
  extras = dict(before={}, last_eval={}, total_up=3, total_down=4)   # an older checkpoint
  rec = loop.RunRecord.restore(extras, loop.Clock(build_s=1.0))
  t = rec.totals()
  assert t['build_s'] == 1.0 and t['compile_s'] == 0.0 and t['wall_s'] < 60.0
  assert (rec.total_up, rec.total_down) == (3, 4)


# ---- end to end (mlp_synthetic:tiny): fresh, finished rerun, resume with more rounds

@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('bookkeeping'))
  first, first_out, _ = _run(_tiny(2), workdir)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    first_metrics = [json.loads(line) for line in f]
  before = _snapshot(workdir)
  time.sleep(0.05)   # a rewrite would show in the mtimes
  rerun, rerun_out, _ = _run(_tiny(2), workdir)
  after = _snapshot(workdir)
  resumed, resumed_out, resumed_wall = _run(_tiny(3), workdir)
  return dict(workdir=workdir, first=first, first_out=first_out, first_metrics=first_metrics,
              before=before, after=after, rerun=rerun, rerun_out=rerun_out,
              resumed=resumed, resumed_out=resumed_out, resumed_wall=resumed_wall)


@pytest.mark.slow
def test_fresh_run_says_so(runs):
  ckpt_dir = os.path.join(runs['workdir'], 'checkpoints')
  assert f'no checkpoint found in {ckpt_dir}, starting fresh' in runs['first_out']
  assert 'resumed from' not in runs['first_out']


@pytest.mark.slow
def test_total_time_includes_build_compile_and_rounds(runs):
  s = runs['first']
  assert s['build_time_s'] > 0 and s['compile_time_s'] > 0
  rounds_s = sum(r['round_time_s'] for r in runs['first_metrics'])
  assert s['total_time_s'] >= s['build_time_s'] + s['compile_time_s'] + rounds_s
  assert s['rounds'] == s['final_round'] == 2
  on_disk = json.loads(runs['before']['summary.json'][1])   # as the first run wrote it
  assert on_disk['total_time_s'] == s['total_time_s']


@pytest.mark.slow
def test_rerun_of_finished_run_changes_nothing(runs):
  summary_path = os.path.join(runs['workdir'], 'summary.json')
  assert (f'run already finished at round 2: nothing to do; summary in {summary_path}'
          in runs['rerun_out'])
  assert 'held-out' not in runs['rerun_out']      # nothing built, trained or evaluated
  assert runs['after'] == runs['before']          # every path, mtime and byte
  assert any(p.startswith('tensorboard') for p in runs['before'])
  assert runs['rerun'] == runs['first']


@pytest.mark.slow
def test_resume_keeps_the_totals_of_the_whole_run(runs):
  first, resumed = runs['first'], runs['resumed']
  ckpt_dir = os.path.join(runs['workdir'], 'checkpoints')
  assert f'resumed from {ckpt_dir} at round 2' in runs['resumed_out']
  assert 'no checkpoint found' not in runs['resumed_out']
  assert resumed['rounds'] == resumed['final_round'] == 3
  # The first process's whole time, plus at most this one's.
  assert first['total_time_s'] <= resumed['total_time_s']
  assert resumed['total_time_s'] <= first['total_time_s'] + runs['resumed_wall']
  assert resumed['build_time_s'] > first['build_time_s']          # built again
  assert resumed['compile_time_s'] > first['compile_time_s']      # compiled again
  assert resumed['total_time_s'] >= resumed['build_time_s'] + resumed['compile_time_s']
  with open(os.path.join(runs['workdir'], 'metrics.jsonl')) as f:
    assert [json.loads(line)['round'] for line in f] == [1, 2, 3]
