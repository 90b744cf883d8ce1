"""The README's "Your own data" commands, run as written on generated files.

Each command is taken from the README (the block after its ``<!-- own-data: NAME -->``
marker); the test writes a data file of the shape the README describes, points the
command's file and workdir at temporary paths and appends size overrides (fewer
rounds, shorter sequences) so it runs in CI. Everything else is the README's text.
"""

import json
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_command(name: str) -> list[str]:
  """argv of the bash block after ``<!-- own-data: name -->`` in README.md."""
  with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as fh:
    text = fh.read()
  match = re.search(rf'<!-- own-data: {name} -->\n```bash\n(.*?)```', text, re.S)
  assert match, f'README.md has no "own-data: {name}" block'
  return shlex.split(match.group(1).replace('\\\n', ' '))


def _run(argv: list[str], replace: dict[str, str], extra: list[str]) -> str:
  assert argv[:3] == ['python', '-m', 'experiments.main'], argv
  args = []
  for arg in argv[3:]:
    for old, new in replace.items():
      arg = arg.replace(old, new)
    args.append(arg)
  out = subprocess.run([sys.executable, '-m', 'experiments.main', *args, *extra,
                        '--compilation_cache='],
                       cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
  return out.stdout + out.stderr


def _workdir(argv: list[str]) -> str:
  return next(a.split('=', 1)[1] for a in argv if a.startswith('--workdir='))


def _write_reviews(path, rng) -> list[str]:
  """Reviews whose words give away the stars; clients = 16 countries."""
  words = {'1': ['awful', 'broken', 'refund', 'late'], '3': ['okay', 'average', 'fine', 'meh'],
           '5': ['great', 'perfect', 'fast', 'love']}
  filler = ['the', 'item', 'was', 'and', 'delivery', 'box', 'price']
  countries = ['PT', 'ES', 'FR', 'DE', 'IT', 'NL', 'BE', 'PL', 'SE', 'NO', 'FI', 'DK', 'AT', 'IE', 'CZ', 'GR']
  with open(path, 'w', encoding='utf-8') as fh:
    for i in range(480):
      country = countries[i % len(countries)]
      # label skew per country; one country's labels are numbers, not strings
      stars = rng.choice(['1', '3', '5'], p=[0.6, 0.2, 0.2] if i % 2 else [0.2, 0.2, 0.6])
      text = ' '.join(rng.choice(words[stars], 2).tolist() + rng.choice(filler, 3).tolist())
      label = int(stars) if country == 'DK' else stars
      fh.write(json.dumps({'review': text, 'stars': label, 'country': country}) + '\n')
  return countries


def _write_g2p(path, rng) -> None:
  """Words spelled out letter by letter as "phonemes"; clients = first letter."""
  letters = 'bcdfgkmpst'
  with open(path, 'w', encoding='utf-8') as fh:
    for _ in range(300):
      word = ''.join(rng.choice(list(letters)) + rng.choice(list('aeiou'))
                     for _ in range(rng.integers(1, 3)))
      fh.write(json.dumps({'word': word, 'phonemes': ' '.join(word.upper()),
                           'letter': word[0]}) + '\n')


@pytest.mark.slow
def test_readme_classification_command(tmp_path):
  argv = readme_command('classification')
  data = tmp_path / 'reviews.jsonl'
  countries = _write_reviews(data, np.random.default_rng(0))
  workdir = str(tmp_path / 'run')
  out = _run(argv, {'reviews.jsonl': str(data), _workdir(argv): workdir},
             ['--config.num_rounds=2', '--config.fl.local_steps=2', '--config.fl.batch_size=4',
              '--config.data.max_len=16', '--config.eval.every=2', '--config.checkpoint.every=2',
              '--config.model.pretrained_layers=2'])
  assert 'labels (3 classes): 0=1, 1=3, 2=5' in out
  with open(os.path.join(workdir, 'summary.json'), encoding='utf-8') as fh:
    summary = json.load(fh)
  assert summary['label_names'] == ['1', '3', '5']
  with open(os.path.join(workdir, 'predictions.jsonl'), encoding='utf-8') as fh:
    rows = [json.loads(line) for line in fh]
  held = {r['client'] for r in rows}
  assert held and held <= set(countries), held
  assert summary['heldout_clients']['accuracy']['num_clients'] == len(held)
  base = summary['baselines']
  assert set(base) >= {'majority_class', 'majority_per_client', 'centralised', 'iid'}, base
  for kind in ('centralised', 'iid'):
    assert os.path.exists(os.path.join(workdir, f'baseline_{kind}', 'summary.json'))
    assert base[kind]['heldout_clients']['accuracy']['num_clients'] == len(held)
  counts = {name: sum(r['reference'] == name for r in rows) for name in ('1', '3', '5')}
  top = max(counts.values()) / len(rows)      # the majority of the held-out rows
  assert base['majority_class']['accuracy'] <= top + 1e-9
  assert {r['reference'] for r in rows} <= {'1', '3', '5'}


@pytest.mark.slow
def test_readme_seq2seq_command(tmp_path):
  argv = readme_command('seq2seq')
  data = tmp_path / 'g2p.jsonl'
  _write_g2p(data, np.random.default_rng(1))
  workdir = str(tmp_path / 'run')
  _run(argv, {'g2p.jsonl': str(data), _workdir(argv): workdir},
       ['--config.num_rounds=2', '--config.eval.every=1', '--config.data.max_len=32',
        '--config.data.generate_max_tokens=8', '--config.data.generate_examples=6',
        '--config.fl.clients_per_round=3', '--config.fl.chunk_size=3',
        '--config.model.num_layers=1', '--config.checkpoint.every=2'])
  with open(os.path.join(workdir, 'summary.json'), encoding='utf-8') as fh:
    summary = json.load(fh)
  gen = summary['generation']
  assert {'rouge_l', 'exact_match', 'cer', 'ter'} <= set(gen), gen.keys()
  assert 0.0 <= gen['cer'] and np.isfinite(gen['cer'])
  with open(os.path.join(workdir, 'predictions.jsonl'), encoding='utf-8') as fh:
    rows = [json.loads(line) for line in fh]
  rounds = sorted({r['round'] for r in rows})
  assert rounds == [0, 1, 2], rounds     # before training and at every evaluation
  assert all(r['input'].endswith(' =') or ' =' in r['input'] for r in rows)
  assert {r['client'] for r in rows} <= set('bcdfgkmpst')
