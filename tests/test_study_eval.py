"""Evaluation a study needs: error rates, exact match's normalisation, held-out
splits by examples / whole clients / groups, saved predictions with per-client
and per-group metrics, and the majority, centralised and IID baselines."""

import copy
import dataclasses
import json
import os
import random
import types

import numpy as np
import pytest

from fedjax_fm import config as config_lib
from fedjax_fm.data.federated import FederatedDataset
from fedjax_fm.evaluation import federated as federated_eval
from fedjax_fm.evaluation import heldout
from fedjax_fm.evaluation import metrics
from fedjax_fm.train import baselines
from fedjax_fm.train import evaluate as evaluate_lib

# ---------------------------------------------------------------- references


def _levenshtein_reference(a, b) -> int:
  """Wagner-Fischer with the whole (len(a)+1) x (len(b)+1) table, in plain Python."""
  table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
  for i in range(len(a) + 1):
    table[i][0] = i
  for j in range(len(b) + 1):
    table[0][j] = j
  for i in range(1, len(a) + 1):
    for j in range(1, len(b) + 1):
      table[i][j] = min(table[i - 1][j] + 1, table[i][j - 1] + 1,
                        table[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
  return table[-1][-1]


def _random_text(rng, alphabet, max_len):
  return ''.join(rng.choice(alphabet) for _ in range(rng.randint(0, max_len)))


# -------------------------------------------------------------- edit distance


def test_edit_distance_matches_the_full_table_reference():
  rng = random.Random(0)
  for _ in range(400):
    a = _random_text(rng, 'abcé ', 14)
    b = _random_text(rng, 'abcé ', 14)
    expected = _levenshtein_reference(a, b)
    assert metrics.edit_distance(a, b) == expected, (a, b)
    assert metrics.edit_distance(b, a) == expected
  for _ in range(100):   # token sequences (any hashable items)
    a = [rng.choice(['x', 'yy', 'z', 3]) for _ in range(rng.randint(0, 9))]
    b = [rng.choice(['x', 'yy', 'z', 3]) for _ in range(rng.randint(0, 9))]
    assert metrics.edit_distance(a, b) == _levenshtein_reference(a, b)


def test_edit_distance_closed_forms():
  rng = random.Random(1)
  for _ in range(50):
    a = _random_text(rng, 'abcdef', 20)
    assert metrics.edit_distance(a, '') == len(a) == metrics.edit_distance('', a)
    assert metrics.edit_distance(a, a) == 0
    # k substitutions at distinct positions by a character not in the alphabet.
    if a:
      k = rng.randint(1, len(a))
      pos = rng.sample(range(len(a)), k)
      b = ''.join('#' if i in pos else ch for i, ch in enumerate(a))
      assert metrics.edit_distance(a, b) == k
    # Appending m characters costs m insertions.
    m = rng.randint(0, 5)
    assert metrics.edit_distance(a, a + 'z' * m) == m
  # Disjoint alphabets: max(len) edits (substitute the overlap, insert the rest).
  assert metrics.edit_distance('aaaa', 'bbbbbb') == 6
  assert metrics.edit_distance('ab', 'ba') == 2   # no transpositions in Levenshtein


def test_char_and_token_error_rates_pair_and_corpus():
  rng = random.Random(2)
  preds = [_random_text(rng, 'ab c', 15) for _ in range(20)]
  refs = [_random_text(rng, 'ab c', 15) for _ in range(20)]
  refs[0] = ''   # an empty reference counts with length 0 in the corpus
  for p, r in zip(preds, refs):
    assert metrics.char_error_rate(p, r) == pytest.approx(
        _levenshtein_reference(p, r) / max(len(r), 1))
    assert metrics.token_error_rate(p, r) == pytest.approx(
        _levenshtein_reference(p.split(), r.split()) / max(len(r.split()), 1))
  char_edits = sum(_levenshtein_reference(p, r) for p, r in zip(preds, refs))
  char_len = sum(len(r) for r in refs)
  tok_edits = sum(_levenshtein_reference(p.split(), r.split()) for p, r in zip(preds, refs))
  tok_len = sum(len(r.split()) for r in refs)
  assert metrics.char_error_rate(preds, refs) == pytest.approx(char_edits / char_len)
  assert metrics.token_error_rate(preds, refs) == pytest.approx(tok_edits / tok_len)
  # Closed forms: a perfect prediction is 0; an empty one deletes every unit (rate 1).
  assert metrics.char_error_rate('hello world', 'hello world') == 0.0
  assert metrics.char_error_rate('', 'hello') == 1.0
  assert metrics.token_error_rate('the cat', 'the cat sat down') == 0.5
  assert metrics.token_error_rate('a  b\tc', 'a b c') == 0.0   # whitespace tokens
  with pytest.raises(ValueError, match='both'):
    metrics.char_error_rate('a', ['a'])
  with pytest.raises(ValueError, match='predictions'):
    metrics.char_error_rate(['a', 'b'], ['a'])


# ---------------------------------------------------------------- exact match


@pytest.mark.parametrize('pred, ref, squad, strip, none', [
    ('The Cat!', 'cat', 1.0, 0.0, 0.0),          # squad drops case, punctuation, articles
    ('  an apple ', 'apple', 1.0, 0.0, 0.0),
    ('  apple\n', 'apple', 1.0, 1.0, 0.0),       # strip: outer whitespace only
    ('Apple', 'apple', 1.0, 0.0, 0.0),           # strip is case-sensitive
    ('apple', 'apple', 1.0, 1.0, 1.0),
    ('a b', 'a  b', 1.0, 0.0, 0.0),
])
def test_exact_match_normalisations(pred, ref, squad, strip, none):
  assert metrics.exact_match(pred, ref) == squad   # the default is unchanged: squad
  assert metrics.exact_match(pred, ref, normalize='squad') == squad
  assert metrics.exact_match(pred, ref, normalize='strip') == strip
  assert metrics.exact_match(pred, ref, normalize='none') == none


def test_exact_match_rejects_unknown_normalisation_and_config_agrees():
  with pytest.raises(ValueError, match='normalize'):
    metrics.exact_match('a', 'a', normalize='lower')
  with pytest.raises(ValueError, match='em_normalize'):
    metrics.generative_metrics(['a'], ['a'], em_normalize='lower')
  assert config_lib.EM_NORMALIZATIONS == metrics.EM_NORMALIZATIONS
  assert config_lib.base_config().eval.em_normalize == 'squad'


def test_generative_metrics_report_cer_ter_against_the_closest_reference():
  preds = ['The cat sat.', 'blue sky', 'abc']
  refs = [['a dog', 'the cat sat'], 'the blue sky today', ['abd', 'xyz']]
  got = metrics.generative_metrics(preds, refs)
  edits = {'char': 0, 'token': 0}
  length = {'char': 0, 'token': 0}
  for p, rs in zip(preds, [refs[0], [refs[1]], refs[2]]):
    for unit, split in (('char', list), ('token', str.split)):
      pairs = [(_levenshtein_reference(split(p), split(r)), len(split(r))) for r in rs]
      e, n = min(pairs, key=lambda x: x[0] / max(x[1], 1))
      edits[unit] += e
      length[unit] += n
  assert got['cer'] == pytest.approx(edits['char'] / length['char'])
  assert got['ter'] == pytest.approx(edits['token'] / length['token'])
  # Exact match follows em_normalize; the other metrics do not depend on it.
  none = metrics.generative_metrics(preds, refs, em_normalize='none')
  assert got['exact_match'] == pytest.approx(1 / 3) and none['exact_match'] == 0.0
  assert {k: v for k, v in none.items() if k != 'exact_match'} == {
      k: v for k, v in got.items() if k != 'exact_match'}
  # Aggregating a subset of the per-example scores equals scoring that subset.
  scores = metrics.generative_scores(preds, refs)
  sub = metrics.aggregate_generative(scores, np.array([True, False, True]))
  direct = metrics.generative_metrics([preds[0], preds[2]], [refs[0], refs[2]])
  assert sub == pytest.approx(direct)


# ------------------------------------------------------------------ held out


def _split_config(mode='examples', fraction=0.25, seed=3, cpr=2, **data):
  c = config_lib.base_config()
  c.seed = seed
  c.fl.clients_per_round = cpr
  c.data.eval_split = mode
  c.data.eval_fraction = fraction
  for k, v in data.items():
    c.data[k] = v
  return c


def test_examples_split_is_the_seeded_permutation():
  n, frac, seed = 53, 0.25, 3
  got = heldout.heldout_split(_split_config(fraction=frac, seed=seed), n)
  perm = np.random.default_rng(seed).permutation(n)
  n_eval = round(n * frac)
  np.testing.assert_array_equal(got.eval, perm[:n_eval])
  np.testing.assert_array_equal(got.train, np.sort(perm[n_eval:]))
  assert got.held_out == () and got.description == ''
  other = heldout.heldout_split(_split_config(fraction=frac, seed=seed + 1), n)
  assert not np.array_equal(other.eval, got.eval)


def test_clients_split_holds_out_whole_clients():
  rng = np.random.default_rng(0)
  clients = rng.choice([f'c{i}' for i in range(8)], size=200)
  got = heldout.heldout_split(_split_config('clients', fraction=0.25),
                              clients=clients, client_key='country')
  held = set(got.held_out)
  assert len(held) == 2   # round(8 * 0.25) of the 8 clients
  assert set(clients[got.eval]) == held
  assert not held & set(clients[got.train])
  assert sorted(np.concatenate([got.train, got.eval])) == list(range(200))
  assert np.all(np.diff(got.train) > 0)
  assert 'held out' in got.description
  # Deterministic; too few clients left for fl.clients_per_round names the field.
  again = heldout.heldout_split(_split_config('clients', fraction=0.25), clients=clients)
  np.testing.assert_array_equal(again.eval, got.eval)
  with pytest.raises(config_lib.ConfigError, match=r'config\.data\.eval_fraction=.*country'):
    heldout.heldout_split(_split_config('clients', fraction=0.25, cpr=7),
                          clients=clients, client_key='country')


def test_group_split_explicit_values_and_fraction():
  rng = np.random.default_rng(1)
  years = rng.choice([2019, 2020, 2021, 2022], size=120)
  c = _split_config('group', eval_group_key='year', eval_group_values=(2022, '2021'))
  got = heldout.heldout_split(c, groups=years)
  expected = np.flatnonzero(np.isin(years, [2021, 2022]))
  np.testing.assert_array_equal(np.sort(got.eval), expected)
  np.testing.assert_array_equal(got.train, np.flatnonzero(~np.isin(years, [2021, 2022])))
  assert got.held_out == ('2021', '2022')
  with pytest.raises(config_lib.ConfigError, match=r'config\.data\.eval_group_values=.*1999'):
    heldout.heldout_split(_split_config('group', eval_group_key='year',
                                        eval_group_values=('1999',)), groups=years)
  with pytest.raises(config_lib.ConfigError, match='leaves 0 to train'):
    heldout.heldout_split(_split_config('group', eval_group_key='year',
                                        eval_group_values=(2019, 2020, 2021, 2022)),
                          groups=years)
  # Without values: a seeded eval_fraction of the groups.
  frac = heldout.heldout_split(_split_config('group', fraction=0.5, eval_group_key='year'),
                               groups=years)
  assert len(frac.held_out) == 2
  assert set(years[frac.eval].astype(str)) == set(frac.held_out)
  with pytest.raises(config_lib.ConfigError, match='eval_group_key'):
    heldout.heldout_split(_split_config('group', eval_group_key='year'), n=120)


def test_field_values_names_the_config_field():
  with pytest.raises(config_lib.ConfigError, match=r"config\.data\.eval_group_key='year'.*"
                     r"\['label', 'text'\]"):
    heldout.field_values({'text': [], 'label': []}, 'year', 'data.eval_group_key')


@pytest.mark.parametrize('overrides, field', [
    ({'data.eval_split': 'group'}, 'data.eval_group_key'),
    ({'data.eval_group_values': ('2020',)}, 'data.eval_group_values'),
    ({'data.eval_split': 'group', 'data.eval_group_key': 'year',
      'data.eval_group_values': ('x', 1.5)}, 'data.eval_group_values'),
    ({'data.eval_split': 'clients'}, 'data.eval_split'),   # dirichlet, no client field
    ({'data.source': 'synthetic', 'data.eval_split': 'group',
      'data.eval_group_key': 'year', 'model.kind': 'mlp'}, 'data.eval_split'),
    ({'eval.em_normalize': 'lower'}, 'eval.em_normalize'),
])
def test_config_errors_name_the_field(overrides, field):
  c = config_lib.base_config()
  for key, value in overrides.items():
    section, name = key.split('.')
    c[section][name] = value
  with pytest.raises(config_lib.ConfigError, match=rf'config\.{field}='):
    config_lib.validate(c, num_devices=1)


def test_config_accepts_clients_and_group_splits():
  for overrides in ({'data.eval_split': 'clients', 'data.partition': 'natural'},
                    {'data.eval_split': 'clients', 'data.client_key': 'module'},
                    {'data.eval_split': 'group', 'data.eval_group_key': 'module',
                     'data.eval_group_values': ('json', 3)},
                    {'data.eval_group_key': 'module'},
                    {'eval.em_normalize': 'none'}):
    c = config_lib.base_config()
    for key, value in overrides.items():
      section, name = key.split('.')
      c[section][name] = value
    config_lib.validate(c, num_devices=1)


# ------------------------------------------------------------------ majority


def _dataset(labels_per_client):
  labels = np.concatenate([np.asarray(v, np.int32) for v in labels_per_client])
  offsets = np.concatenate([[0], np.cumsum([len(v) for v in labels_per_client])])
  return FederatedDataset({'label': labels}, offsets.astype(np.int64))


def test_majority_class_overall_and_per_client_on_local_test_data():
  train = _dataset([[0, 0, 1], [2, 2, 2, 1], [1, 1, 0], []])
  test = _dataset([[0, 1], [2, 2, 0], [0, 0, 1, 1], [1, 2]])
  eval_labels = np.array([2, 2, 1, 0, 2, 1])
  got = baselines.majority_baselines(train, eval_labels, client_test=test,
                                     label_names=('a', 'b', 'c'))
  # Training counts: 0 -> 3, 1 -> 4, 2 -> 3: the majority is 1 ("b").
  assert got['majority_class'] == {'label': 'b', 'label_id': 1,
                                   'accuracy': pytest.approx(2 / 6), 'num_examples': 6}
  per = got['majority_per_client']
  # Own majorities: 0, 2, 1, and the overall 1 for the client without training data.
  acc = np.array([1 / 2, 2 / 3, 2 / 4, 1 / 2])
  counts = np.array([2, 3, 4, 2])
  assert per['per_client'] == pytest.approx({'0': acc[0], '1': acc[1], '2': acc[2],
                                             '3': acc[3]})
  assert per['accuracy'] == pytest.approx(np.sum(acc * counts) / counts.sum())
  assert per['distribution']['accuracy'] == pytest.approx(
      federated_eval.distribution(acc, counts))
  assert per['evaluated_on'] == 'local test data'
  assert per['clients_without_training_data'] == 1
  assert baselines.majority_class([3, 1, 3, 1]) == 1   # ties: the smallest label


def test_majority_per_client_on_held_out_examples_with_unseen_clients():
  train = _dataset([[0, 0, 1], [2, 2]])
  eval_labels = np.array([0, 1, 2, 2, 0, 1, 1])
  eval_clients = ['fr', 'fr', 'de', 'de', 'de', 'it', 'it']   # it: unseen
  got = baselines.majority_baselines(train, eval_labels, eval_clients=eval_clients,
                                     client_names=('fr', 'de'))
  overall = got['majority_class']['label_id']
  assert overall == 0   # 0 -> 2, 2 -> 2, 1 -> 1: the smallest of the tied
  per = got['majority_per_client']
  assert per['per_client'] == pytest.approx({'de': 2 / 3, 'fr': 1 / 2, 'it': 0.0})
  assert per['accuracy'] == pytest.approx(3 / 7)
  assert per['clients_without_training_data'] == 1
  assert per['evaluated_on'] == 'held-out examples'
  assert 'majority_per_client' not in baselines.majority_baselines(train, eval_labels)


# ---------------------------------------------------- centralised and IID


def _tiny_config():
  from experiments.configs import mlp_synthetic  # pylint: disable=g-import-not-at-top
  c = mlp_synthetic.get_config('tiny')
  c.progress = False
  c.tensorboard = False
  return c


def test_centralised_config_sees_the_same_examples_per_round():
  c = _tiny_config()
  c.privacy.enabled = True
  c.privacy.noise_multiplier = 0.5
  original = copy.deepcopy(c)
  cen = baselines.baseline_config(c, 'centralised')
  assert c == original   # not modified
  f, g = c.fl, cen.fl
  assert (cen.data.partition, cen.data.num_clients, g.clients_per_round) == ('iid', 1, 1)
  assert g.chunk_size == 1 and not cen.privacy.enabled
  # Examples per round: K * S * B of the federated run, all from one client.
  assert g.clients_per_round * g.local_steps * g.batch_size == (
      f.clients_per_round * f.local_steps * f.batch_size)
  changes = baselines.config_changes(c, cen)
  assert changes['fl.local_steps'] == [f.local_steps, f.local_steps * f.clients_per_round]
  iid = baselines.baseline_config(c, 'iid', num_clients=12)
  assert baselines.config_changes(c, iid) == {'data.partition': ['dirichlet', 'iid'],
                                              'data.num_clients': [20, 12]}
  with pytest.raises(ValueError, match='kind'):
    baselines.baseline_config(c, 'local')


def test_baselines_keep_the_held_out_clients_of_a_natural_partition():
  c = config_lib.base_config()
  c.data.source, c.data.task = 'instructions', 'causal_lm'
  c.model.kind, c.data.tokenizer = 'decoder', 'sentencepiece'
  c.data.partition, c.data.eval_split = 'natural', 'clients'
  c.fl.clients_per_round, c.fl.chunk_size = 2, 2
  config_lib.validate(c, num_devices=1)
  for kind in ('centralised', 'iid'):
    b = baselines.baseline_config(c, kind, num_clients=4)
    assert b.data.eval_split == 'clients' and b.data.client_key == 'category'
    assert b.data.partition == 'iid'


def test_baseline_runs_hold_out_the_same_examples(tmp_path):
  from fedjax_fm.train import task_data as task_data_lib  # pylint: disable=g-import-not-at-top
  c = _tiny_config()
  base = task_data_lib.build_task_data(c, str(tmp_path))
  for kind in ('centralised', 'iid'):
    other = task_data_lib.build_task_data(baselines.baseline_config(c, kind), str(tmp_path))
    for key in base.eval:
      np.testing.assert_array_equal(other.eval[key], base.eval[key])
    assert other.train.num_examples == base.train.num_examples
    assert other.train.num_clients == (1 if kind == 'centralised' else c.data.num_clients)


# ------------------------------------------------------------- predictions


@pytest.fixture(scope='module')
def mlp_experiment():
  from fedjax_fm.train import build  # pylint: disable=g-import-not-at-top
  c = _tiny_config()
  c.eval.max_examples = 50
  return build.build_experiment(c)


def _read(path):
  with open(path, encoding='utf-8') as fh:
    return [json.loads(line) for line in fh]


def test_classification_predictions_are_saved_with_label_names(mlp_experiment, tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  from fedjax_fm import models  # pylint: disable=g-import-not-at-top
  exp = mlp_experiment
  trainable = jax.tree.map(lambda x: x * 3.0, exp.split.trainable)   # a less uniform model
  out = evaluate_lib.record_predictions(exp, trainable, None, str(tmp_path), 3)
  assert out == {}   # the synthetic held-out examples carry no client or group
  records = _read(tmp_path / evaluate_lib.PREDICTIONS_FILE)
  n = exp.config.eval.max_examples
  assert len(records) == n
  labels = exp.data.eval['label'][:n]
  names = exp.data.label_names
  # The task's own per-example `correct` agrees with the saved predictions.
  eval_fn = models.make_eval_fn(exp.split.graphdef, exp.task)
  correct = np.asarray(eval_fn(trainable, exp.split.frozen,
                               {k: v[:n] for k, v in exp.data.eval.items()})['correct'])
  for r, label, ok in zip(records, labels, correct):
    assert set(r) == {'round', 'client', 'input', 'reference', 'prediction',
                      'reference_id', 'prediction_id'}
    assert r['round'] == 3 and r['reference_id'] == int(label)
    assert r['reference'] == names[label] and r['prediction'] == names[r['prediction_id']]
    assert (r['prediction_id'] == r['reference_id']) == bool(ok)
  # A later evaluation appends its own lines.
  evaluate_lib.record_predictions(exp, trainable, None, str(tmp_path), 6)
  assert [r['round'] for r in _read(tmp_path / evaluate_lib.PREDICTIONS_FILE)] == (
      [3] * n + [6] * n)


def test_classification_breakdown_per_client_and_group(mlp_experiment, tmp_path):
  exp = mlp_experiment
  n = exp.config.eval.max_examples
  rng = np.random.default_rng(0)
  clients = rng.choice(['fr', 'de', 'it'], size=len(exp.data.eval['label']))
  groups = rng.choice(['2020', '2021'], size=len(clients))
  data = types.SimpleNamespace(**{**vars(exp.data), 'eval_clients': clients,
                                  'eval_groups': groups,
                                  'eval_inputs': [f'row {i}' for i in range(len(clients))]})
  exp2 = dataclasses.replace(exp, data=data)
  out = evaluate_lib.record_predictions(exp2, exp.split.trainable, None, str(tmp_path), 0)
  records = _read(tmp_path / evaluate_lib.PREDICTIONS_FILE)
  assert [r['client'] for r in records] == list(clients[:n])
  assert [r['group'] for r in records] == list(groups[:n])
  assert records[4]['input'] == 'row 4'
  ok = np.array([r['prediction_id'] == r['reference_id'] for r in records], np.float64)
  acc = {c: ok[clients[:n] == c].mean() for c in ('de', 'fr', 'it')}
  counts = np.array([(clients[:n] == c).sum() for c in ('de', 'fr', 'it')])
  assert out['heldout_clients']['accuracy'] == pytest.approx(federated_eval.distribution(
      np.array([acc['de'], acc['fr'], acc['it']]), counts))
  for g in ('2020', '2021'):
    assert out['heldout_groups'][g] == {'accuracy': pytest.approx(ok[groups[:n] == g].mean()),
                                        'num_examples': int((groups[:n] == g).sum())}
  # The majority baseline reads the same held-out clients.
  maj = baselines.majority_from_task_data(exp.config, data)
  assert maj['majority_class']['num_examples'] == n
  assert set(maj['majority_per_client']['per_client']) == {'de', 'fr', 'it'}


def test_generation_predictions_and_per_client_metrics(monkeypatch, tmp_path):
  preds = ['the cat sat', 'blue', 'x y z', 'Paris', 'four']
  refs = ['the cat sat', 'blue sky', 'x y', 'paris', '4']
  clients = ['a', 'a', 'b', 'b', 'c']
  groups = ['g1', 'g2', 'g1', 'g2', 'g2']
  fake = {'prompts': [f'prompt {i}' for i in range(5)], 'references': refs,
          'predictions': preds, 'clients': clients, 'groups': groups}
  monkeypatch.setattr(evaluate_lib, '_generate', lambda exp, tr, fr=None: fake)
  cfg = config_lib.base_config()
  cfg.eval.em_normalize = 'strip'
  exp = types.SimpleNamespace(config=cfg)
  out = evaluate_lib.record_generation(exp, None, None, str(tmp_path), 20)
  assert out['em_normalize'] == 'strip'
  assert out['generation'] == pytest.approx(
      {k: v for k, v in metrics.generative_metrics(preds, refs, em_normalize='strip').items()
       if k != 'num_examples'})
  records = _read(tmp_path / evaluate_lib.PREDICTIONS_FILE)
  assert records[2] == {'round': 20, 'client': 'b', 'group': 'g1', 'input': 'prompt 2',
                        'reference': 'x y', 'prediction': 'x y z'}
  # Per client: CER is each client's own corpus rate; the distribution weighs by examples.
  cer = {c: sum(_levenshtein_reference(p, r) for p, r, k in zip(preds, refs, clients)
                if k == c) / sum(len(r) for r, k in zip(refs, clients) if k == c)
         for c in ('a', 'b', 'c')}
  dist = out['generation_clients']['cer']
  assert dist == pytest.approx(federated_eval.distribution(
      np.array([cer['a'], cer['b'], cer['c']]), np.array([2, 2, 1]), higher_is_better=False))
  assert dist['worst'] == pytest.approx(max(cer.values()))   # lower is better
  em = out['generation_clients']['exact_match']
  assert em['worst'] == 0.0 and em['best'] == 0.5   # strip: 'Paris' != 'paris'
  g1 = metrics.generative_metrics([preds[0], preds[2]], [refs[0], refs[2]],
                                  em_normalize='strip')
  assert out['generation_groups']['g1'] == pytest.approx(g1)


# ------------------------------------------------------------- real runs


@pytest.mark.slow
def test_generation_through_the_decoder(tmp_path):
  from experiments.configs import instruction_tuning  # pylint: disable=g-import-not-at-top
  from fedjax_fm.train import build  # pylint: disable=g-import-not-at-top
  c = instruction_tuning.get_config('tiny')
  exp = build.build_experiment(c, str(tmp_path))
  out = evaluate_lib.record_predictions(exp, exp.split.trainable, None, str(tmp_path), 0)
  records = _read(tmp_path / evaluate_lib.PREDICTIONS_FILE)
  assert len(records) == c.data.generate_examples
  assert [r['client'] for r in records] == list(
      exp.data.instructions['category'][:c.data.generate_examples])
  assert out['generation'] == pytest.approx({
      k: v for k, v in metrics.generative_metrics(
          [r['prediction'] for r in records], [r['reference'] for r in records]).items()
      if k != 'num_examples'})
  both = evaluate_lib.generation_before_after(exp, exp.split.trainable, exp.split.frozen,
                                              str(tmp_path))
  assert both['generation'] == pytest.approx(out['generation'])   # the same model, greedy
  assert both['em_normalize'] == 'squad'
  assert set(both['generation']) == {'rouge_l', 'exact_match', 'token_f1', 'cer', 'ter'}
  assert both['generation_clients']['rouge_l']['num_clients'] == len(
      set(r['client'] for r in records))


@pytest.mark.slow
def test_write_baselines_through_the_real_run(tmp_path):
  from fedjax_fm import train  # pylint: disable=g-import-not-at-top
  c = _tiny_config()
  workdir = str(tmp_path / 'run')
  summary = train.run(c, workdir)
  result = baselines.write_baselines(c, workdir, ['majority', 'centralised', 'iid'])
  with open(os.path.join(workdir, 'summary.json')) as fh:
    written = json.load(fh)
  assert written['baselines'] == json.loads(json.dumps(result))
  assert written['after'] == summary['after']
  maj = result['majority_class']
  from fedjax_fm.train import task_data as task_data_lib  # pylint: disable=g-import-not-at-top
  data = task_data_lib.build_task_data(c, str(tmp_path / 'scratch'))
  labels = data.train.arrays['label']
  assert maj['label_id'] == int(np.argmax(np.bincount(labels)))
  assert maj['accuracy'] == pytest.approx(float(np.mean(data.eval['label'] == maj['label_id'])))
  for kind in ('centralised', 'iid'):
    sub = result[kind]
    assert sub['workdir'] == os.path.join(workdir, f'baseline_{kind}')
    assert 0.0 <= sub['after']['accuracy'] <= 1.0 and sub['rounds'] == c.num_rounds
    with open(os.path.join(sub['workdir'], 'summary.json')) as fh:
      assert json.load(fh)['after'] == sub['after']
  assert result['centralised']['changes']['data.num_clients'] == [20, 1]
  # A second call resumes the finished baseline runs: the same numbers, no training.
  again = baselines.run_baselines(c, workdir, ['centralised'])
  assert again['centralised']['after'] == result['centralised']['after']
