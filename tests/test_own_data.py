"""Own data through the config: keys, prompt templates, tokenizers, partitions, labels.

Every case builds the task the way the training loop does (`config.validate`, then
`train.build_task_data`) from small files written into ``tmp_path``.
"""

import io
import json
import os
import random
import re

import numpy as np
import pytest

from fedjax_fm import config as config_lib
from fedjax_fm import data as data_lib
from fedjax_fm import train
from fedjax_fm.data import partition as partition_lib
from fedjax_fm.data import tokenizers as tokenizers_lib

spm = pytest.importorskip('sentencepiece')

LETTERS = 'abcdefgh'


def _jsonl(path, records):
  path.write_text(''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in records),
                  encoding='utf-8')
  return path


def _phoneme_records(n=96, seed=0):
  """{"word", "phonemes", "letter"} records; the phonemes are the word's letters, upper-cased."""
  rng = random.Random(seed)
  records = []
  for i in range(n):
    letter = LETTERS[i % len(LETTERS)]
    word = letter + ''.join(rng.choice('aeioulmnrst') for _ in range(rng.randint(2, 5)))
    records.append({'word': word, 'phonemes': ' '.join(word.upper()), 'letter': letter})
  return records


def _decoder_config(path, **data):
  c = config_lib.base_config()
  c.progress = False
  c.model.kind = 'decoder'
  c.model.hidden_size, c.model.num_layers, c.model.mlp_dim = 16, 1, 32
  c.model.num_heads, c.model.num_kv_heads = 2, 1
  c.data.source, c.data.task, c.data.path = 'instructions', 'causal_lm', str(path)
  c.data.tokenizer, c.data.max_len = 'char', 48
  c.data.generate_max_tokens, c.data.generate_examples = 12, 4
  c.data.partition = 'natural'
  c.fl.clients_per_round, c.fl.chunk_size, c.fl.local_steps, c.fl.batch_size = 4, 2, 2, 4
  c.num_rounds = 1
  for key, value in data.items():
    c.data[key] = value
  return c


def _classification_config(path, **data):
  c = config_lib.base_config()
  c.progress = False
  c.model.kind = 'encoder'
  c.model.hidden_size, c.model.num_layers, c.model.mlp_dim, c.model.num_heads = 16, 1, 32, 2
  c.data.source, c.data.path = 'jsonl', str(path)
  c.data.tokenizer, c.data.max_len = 'char', 32
  c.data.num_clients, c.data.partition = 4, 'iid'
  c.fl.clients_per_round, c.fl.chunk_size = 2, 1
  for key, value in data.items():
    c.data[key] = value
  return c


def _build(c, workdir):
  config_lib.validate(c, num_devices=1)
  return train.build_task_data(c, str(workdir))


def _rows(td, i):
  ds = td.train
  return {k: v[ds.offsets[i]:ds.offsets[i + 1]] for k, v in ds.arrays.items()}


# ------------------------------------------------- 1, 2: keys, client key, templates


def test_any_fields_as_input_target_and_client_key(tmp_path):
  records = _phoneme_records()
  path = _jsonl(tmp_path / 'words.jsonl', records)
  c = _decoder_config(path, input_key='word', target_key='phonemes', client_key='letter',
                      prompt_template='{input} ->')
  td = _build(c, tmp_path / 'w')
  tok = td.tokenizer
  by_word = {r['word']: r for r in records}
  # One client per letter, and every client's rows are words of its letter.
  assert td.train.num_clients == len(LETTERS)
  seen = 0
  for i in range(td.train.num_clients):
    rows = _rows(td, i)
    letters = set()
    for ids, attn, loss in zip(rows['input_ids'], rows['attention_mask'], rows['loss_mask']):
      prompt_ids = ids[(attn == 1) & (loss == 0)]
      assert prompt_ids[0] == tok.bos_id
      prompt = tok.decode(prompt_ids[1:])
      word = prompt[:-len(' ->')]
      assert prompt == f'{word} ->'            # the prompt is the template, nothing else
      target_ids = ids[loss == 1]
      assert target_ids[-1] == tok.eos_id
      assert tok.decode(target_ids[:-1]) == by_word[word]['phonemes']
      letters.add(by_word[word]['letter'])
      seen += 1
    assert len(letters) == 1
  assert seen + len(td.eval['input_ids']) == len(records)
  # The held-out records carry the client key's value as their category.
  for word, category in zip(td.instructions['input'], td.instructions['category']):
    assert by_word[word]['letter'] == category
  assert data_lib.format_prompts(td.instructions, td.prompt_template) == [
      f'{w} ->' for w in td.instructions['input']]


def test_template_names_other_record_fields(tmp_path):
  records = [{**r, 'hint': f'starts with {r["letter"]}'} for r in _phoneme_records(48)]
  path = _jsonl(tmp_path / 'words.jsonl', records)
  c = _decoder_config(path, input_key='word', target_key='phonemes', client_key='letter',
                      prompt_template='{hint}: {input} =')
  td = _build(c, tmp_path / 'w')
  hints = {r['word']: r['hint'] for r in records}
  prompts = data_lib.format_prompts(td.instructions, td.prompt_template)
  assert prompts == [f'{hints[w]}: {w} =' for w in td.instructions['input']]


def test_client_key_on_the_default_schema(tmp_path):
  # Alpaca-schema records (no input_key / target_key) partitioned by their own field.
  records = [{'instruction': f'Spell {w}.', 'output': w, 'user': f'u{i % 5}'}
             for i, w in enumerate(['cat', 'dog', 'owl', 'ant', 'bee', 'elk'] * 5)]
  path = _jsonl(tmp_path / 'a.jsonl', records)
  c = _decoder_config(path, client_key='user', instruction_template='short')
  td = _build(c, tmp_path / 'w')
  assert td.train.num_clients == 5
  # The default stays one client per category: these records have none.
  c = _decoder_config(path, instruction_template='short')
  with pytest.raises(config_lib.ConfigError) as e:
    _build(c, tmp_path / 'w2')
  msg = str(e.value)
  for text in ("field 'category'", "have 1 ('none')", 'config.data.client_key',
               'config.fl.clients_per_round=4', 'config.data.partition="iid"',
               "records without a 'category' field"):
    assert text in msg, msg


def test_whole_clients_held_out_by_the_client_key(tmp_path):
  records = _phoneme_records(64)
  path = _jsonl(tmp_path / 'w.jsonl', records)
  c = _decoder_config(path, input_key='word', target_key='phonemes', client_key='letter',
                      prompt_template='{input} ->', eval_split='clients', eval_fraction=0.25)
  td = _build(c, tmp_path / 'w')
  held = set(td.instructions['category'])
  assert len(held) == 2 and td.train.num_clients == len(LETTERS) - 2
  assert len(td.instructions['input']) == sum(r['letter'] in held for r in records)
  assert all(w[0] in held for w in td.instructions['input'])
  for i in range(td.train.num_clients):
    ids = _rows(td, i)['input_ids'][:, 1]      # the first character after BOS
    first = {td.tokenizer.decode([t]) for t in ids}
    assert len(first) == 1 and not first & held


def test_too_few_natural_clients_names_the_field(tmp_path):
  records = [{**r, 'half': r['letter'] < 'e'} for r in _phoneme_records(40)]
  path = _jsonl(tmp_path / 'w.jsonl', records)
  c = _decoder_config(path, input_key='word', target_key='phonemes', client_key='half')
  with pytest.raises(config_lib.ConfigError,
                     match=r"clients_per_round=4 is invalid: .*field 'half' "
                           r"\(config.data.client_key\).* have 2 \('False', 'True'\)"):
    _build(c, tmp_path / 'w1')
  # The classification path says the same.
  cls = _jsonl(tmp_path / 'c.jsonl', [{'text': f'row {i}', 'label': i % 2, 'src': i % 3}
                                      for i in range(30)])
  c = _classification_config(cls, partition='natural', client_key='src')
  c.fl.clients_per_round = 4
  c.data.num_clients = 4
  with pytest.raises(config_lib.ConfigError, match=r"field 'src'.* have 3 \('0', '1', '2'\)"):
    _build(c, tmp_path / 'w2')


def test_unknown_fields_are_named_with_the_available_ones(tmp_path):
  path = _jsonl(tmp_path / 'w.jsonl', _phoneme_records(24))
  cases = [
      (dict(input_key='wrd', target_key='phonemes', client_key='letter'), 'input_key'),
      (dict(input_key='word', target_key='phones', client_key='letter'), 'target_key'),
      (dict(input_key='word', target_key='phonemes', client_key='initial'), 'client_key'),
      (dict(input_key='word', target_key='phonemes', client_key='letter',
            prompt_template='{input} ({lang}) ->'), 'prompt_template'),
  ]
  for overrides, field in cases:
    with pytest.raises(config_lib.ConfigError,
                       match=rf"config.data.{field}=.* no record .* has the field .*"
                             r"fields: \['letter', 'phonemes', 'word'\]"):
      _build(_decoder_config(path, **overrides), tmp_path / 'w')


@pytest.mark.parametrize('template, match', [
    ('{input ->', 'bad braces'),
    ('{input} -> }', 'bad braces'),
    ('{} ->', r'field \{\}'),
    ('{0} ->', r'field \{0\}'),
    ('{input.upper} ->', r'field \{input.upper\}'),
    ('{input[0]} ->', r'field \{input\[0\]\}'),
    ('just text', 'names no record field'),
    ('{input} = {phonemes}', r'names the target \{phonemes\}'),
    ('{input} = {output}', r'names the target \{output\}'),
])
def test_prompt_template_is_checked_by_validate(tmp_path, template, match):
  c = _decoder_config(tmp_path / 'w.jsonl', input_key='word', target_key='phonemes',
                      prompt_template=template)
  with pytest.raises(config_lib.ConfigError, match='config.data.prompt_template=.*' + match):
    config_lib.validate(c, num_devices=1)


def test_key_fields_are_checked_by_validate(tmp_path):
  path = tmp_path / 'w.jsonl'
  with pytest.raises(config_lib.ConfigError, match='config.data.target_key=.*set together'):
    config_lib.validate(_decoder_config(path, input_key='word'), num_devices=1)
  with pytest.raises(config_lib.ConfigError, match='config.data.target_key=.*must differ'):
    config_lib.validate(_decoder_config(path, input_key='w', target_key='w'), num_devices=1)
  c = _classification_config(path, prompt_template='{input} ->')
  with pytest.raises(config_lib.ConfigError, match='config.data.prompt_template=.*data.source'):
    config_lib.validate(c, num_devices=1)
  c = _decoder_config(path, prompt_template='{input} ->', instruction_template='chat')
  c.model.kind, c.data.tokenizer = 'gguf', 'model'
  with pytest.raises(config_lib.ConfigError, match='not both'):
    config_lib.validate(c, num_devices=1)
  # Literal braces are fine.
  config_lib.validate(_decoder_config(path, prompt_template='{{x}} {input} ->'), num_devices=1)


# --------------------------------------------------------- 3: tokenizer options


@pytest.mark.parametrize('field, value, match', [
    ('character_coverage', 0.5, r'in \[0.98, 1.0\]'),
    ('character_coverage', 1.5, r'in \[0.98, 1.0\]'),
    ('character_coverage', None, r'in \[0.98, 1.0\]'),
    ('byte_fallback', None, 'True or False'),
    ('tokenizer', 'chars', r"allowed values are \(.*'char'\)"),
])
def test_tokenizer_options_are_validated(tmp_path, field, value, match):
  c = _decoder_config(tmp_path / 'w.jsonl', **{field: value})
  with pytest.raises(config_lib.ConfigError, match=f'config.data.{field}=.*{match}'):
    config_lib.validate(c, num_devices=1)


def _spm_trainer_accepts(texts, vocab_size, coverage, byte_fallback):
  """SentencePiece's own trainer, without this package's check in front of it."""
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=io.BytesIO(), vocab_size=vocab_size,
        character_coverage=coverage, byte_fallback=byte_fallback, pad_id=0, unk_id=1,
        bos_id=2, eos_id=3, hard_vocab_limit=False, minloglevel=2)
    return True
  except RuntimeError as e:
    assert 'Vocabulary size is smaller than required_chars' in str(e)
    return False


@pytest.mark.parametrize('coverage, byte_fallback', [
    (1.0, False), (1.0, True), (0.995, False), (0.98, False), (0.98, True)])
def test_min_vocab_is_sentencepieces_rule(coverage, byte_fallback):
  # Skewed character frequencies, so that coverage < 1 leaves rare characters out;
  # full-width letters and tabs check the normalisation (NFKC, whitespace runs).
  rng = random.Random(7)
  alphabet = [chr(0x4e00 + i) for i in range(60)] + list('abcdefＡＢ\t')
  weights = [1.0 / (i + 1) for i in range(len(alphabet))]
  texts = [''.join(rng.choices(alphabet, weights, k=rng.randint(3, 40)))
           + rng.choice(['', ' ', '  x']) for _ in range(80)]
  need = tokenizers_lib.sentencepiece_min_vocab(
      texts, character_coverage=coverage, byte_fallback=byte_fallback)
  assert need.required_chars <= need.distinct_chars
  if coverage < 1:
    assert need.required_chars < need.distinct_chars
  assert not _spm_trainer_accepts(texts, need.min_vocab_size - 1, coverage, byte_fallback)
  assert _spm_trainer_accepts(texts, need.min_vocab_size, coverage, byte_fallback)


def test_library_train_checks_the_vocab_first(tmp_path):
  texts = ['αβγδε ζηθ', 'ικλμν ξοπ']
  need = tokenizers_lib.sentencepiece_min_vocab(texts)
  assert (need.distinct_chars, need.min_vocab_size) == (17, 21)   # 16 letters + the space
  with pytest.raises(ValueError, match=r'`vocab_size`=20 is smaller than the 21 pieces'):
    data_lib.SentencePieceTokenizer.train(texts, 20, tmp_path / 'spm')
  assert not (tmp_path / 'spm.model').exists()
  tok = data_lib.SentencePieceTokenizer.train(texts, 21, tmp_path / 'spm')
  assert tok.vocab_size >= 21
  with pytest.raises(ValueError, match='character_coverage'):
    data_lib.SentencePieceTokenizer.train(texts, 21, tmp_path / 'spm', character_coverage=0.5)


def test_small_sentencepiece_vocab_is_caught_before_training(tmp_path):
  # Every row holds the same 40 distinct characters: whatever the split, the training
  # rows hold 40 + the space (one piece) = 41; with the 4 special pieces: 45.
  chars = [chr(0x3b1 + i) for i in range(20)] + [chr(0x430 + i) for i in range(20)]
  rng = random.Random(0)
  rows = []
  for i in range(40):
    shuffled = rng.sample(chars, len(chars))
    rows.append({'text': ''.join(shuffled[:20]) + ' ' + ''.join(shuffled[20:]),
                 'label': i % 2})
  path = _jsonl(tmp_path / 'c.jsonl', rows)
  c = _classification_config(path, tokenizer='sentencepiece', vocab_size=40)
  with pytest.raises(config_lib.ConfigError) as e:
    _build(c, tmp_path / 'w')
  msg = str(e.value)
  for text in ('config.data.vocab_size=40 is invalid', 'at least 45 pieces',
               '41 distinct characters', 'config.data.character_coverage=1.0 keeps 41',
               'data.tokenizer="char"'):
    assert text in msg, msg
  assert not os.path.exists(tmp_path / 'w' / 'spm.model')   # caught before training
  c.data.byte_fallback = True
  c.data.vocab_size = 280
  with pytest.raises(config_lib.ConfigError, match=r'at least 301 pieces.*256 byte pieces '
                                                    r'\(config.data.byte_fallback=True\)'):
    _build(c, tmp_path / 'w')
  c.data.vocab_size = 301
  td = _build(c, tmp_path / 'w')
  assert td.tokenizer.vocab_size >= 301


def test_char_tokenizer(tmp_path):
  texts = ['héllo wörld', 'tab\there', 'ünïcode ✓']
  tok = tokenizers_lib.CharTokenizer.train(texts, add_bos=True, add_eos=True)
  assert isinstance(tok, data_lib.Tokenizer)
  assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
  assert tok.chars == tuple(sorted(set(''.join(texts))))
  assert tok.vocab_size == 4 + len(set(''.join(texts)))
  enc = tok.encode(texts, 16)
  for text, ids, mask in zip(texts, enc['input_ids'], enc['attention_mask']):
    n = int(mask.sum())
    assert n == min(len(text), 14) + 2 and ids[0] == tok.bos_id and ids[n - 1] == tok.eos_id
    assert tok.decode(ids) == text[:14]
    assert [tok.chars[i - 4] for i in ids[1:n - 1]] == list(text[:14])
  # Unknown characters: unk, decoded as U+FFFD.
  ids = tok.encode_ids(['hé?'])[0]
  assert ids[2] == tok.unk_id and tok.decode(ids) == 'hé\ufffd'
  tok.save(tmp_path / 'v.json')
  again = tokenizers_lib.CharTokenizer.load(tmp_path / 'v.json', add_bos=True, add_eos=True)
  assert again.chars == tok.chars
  np.testing.assert_array_equal(again.encode(texts, 16)['input_ids'], enc['input_ids'])
  with pytest.raises(ValueError, match='outside the vocabulary'):
    tok.decode([tok.vocab_size])
  with pytest.raises(ValueError, match='max_len'):
    tok.encode(texts, 2)


def test_char_tokenizer_from_a_saved_vocabulary(tmp_path):
  path = _jsonl(tmp_path / 'w.jsonl', _phoneme_records(48))
  c = _decoder_config(path, input_key='word', target_key='phonemes', client_key='letter',
                      prompt_template='{input} ->')
  first = _build(c, tmp_path / 'w1')
  vocab = tmp_path / 'w1' / train.task_data.CHAR_VOCAB_FILE
  c.data.tokenizer_path = str(vocab)
  second = _build(c, tmp_path / 'w2')
  assert second.tokenizer.chars == first.tokenizer.chars
  np.testing.assert_array_equal(second.train.arrays['input_ids'],
                                first.train.arrays['input_ids'])


# ------------------------------------------ 4: tokenizers see the training rows only


def _rows_with_own_chars(n):
  """Text rows, each with one character no other row has (U+0100 + i)."""
  return [f'{"ab"[i % 2]} row {chr(0x100 + i)} x' for i in range(n)]


@pytest.mark.parametrize('tokenizer', ['char', 'sentencepiece'])
def test_classification_tokenizer_reads_training_rows_only(tmp_path, tokenizer):
  texts = _rows_with_own_chars(40)
  path = _jsonl(tmp_path / 'c.jsonl', [{'text': t, 'label': i % 2}
                                       for i, t in enumerate(texts)])
  c = _classification_config(path, tokenizer=tokenizer, vocab_size=120)
  td = _build(c, tmp_path / 'w')
  unk = td.tokenizer.unk_id if tokenizer == 'char' else td.tokenizer.processor.unk_id()
  train_ids, eval_ids = td.train.arrays['input_ids'], td.eval['input_ids']
  # Each held-out row's own character is unknown; no training row has an unknown one.
  assert ((eval_ids == unk).sum(axis=1) == 1).all()
  assert not (train_ids == unk).any()
  if tokenizer == 'char':
    own = {ch for ch in td.tokenizer.chars if ord(ch) >= 0x100}
    assert len(own) == len(train_ids)
  else:
    sp = td.tokenizer.processor
    own = [chr(0x100 + i) for i in range(40)]
    assert sum(sp.piece_to_id(ch) != sp.unk_id() for ch in own) == len(train_ids)


@pytest.mark.parametrize('tokenizer', ['char', 'sentencepiece'])
def test_instruction_tokenizer_reads_training_rows_only(tmp_path, tokenizer):
  texts = _rows_with_own_chars(40)
  records = [{'word': t, 'phonemes': t[::-1], 'letter': t[0]} for t in texts]
  path = _jsonl(tmp_path / 'w.jsonl', records)
  c = _decoder_config(path, input_key='word', target_key='phonemes', client_key='letter',
                      prompt_template='{input} ->', tokenizer=tokenizer, vocab_size=200)
  c.fl.clients_per_round = c.fl.chunk_size = 2
  td = _build(c, tmp_path / 'w')
  if tokenizer == 'char':
    vocab = set(td.tokenizer.chars)
  else:
    sp = td.tokenizer.processor
    vocab = {ch for ch in map(chr, range(0x100, 0x100 + 80)) if sp.piece_to_id(ch) != sp.unk_id()}
  held_out = {ch for w in td.instructions['input'] for ch in w if ord(ch) >= 0x100}
  assert held_out and not held_out & vocab
  # ... and every character of the training rows is in it.
  train_chars = {ch for r in records if r['word'] not in set(td.instructions['input'])
                 for ch in r['word'] + r['phonemes'] if ord(ch) >= 0x100}
  assert train_chars <= vocab


# ------------------------------------------- 5: partitions named by config fields


def test_dirichlet_failure_names_config_fields(tmp_path):
  # 300 examples, the default 100 clients: the Dirichlet draw leaves clients empty.
  path = _jsonl(tmp_path / 'c.jsonl', [{'text': f'row {i}', 'label': ['x', 'y', 'z'][i % 3]}
                                       for i in range(300)])
  c = _classification_config(path, partition='dirichlet', num_clients=100)
  with pytest.raises(config_lib.ConfigError) as e:
    _build(c, tmp_path / 'w')
  msg = str(e.value)
  for text in ('config.data.num_clients=100', 'config.data.min_client_size=1',
               'config.data.alpha=0.5', 'the 240 training examples', '3 labels'):
    assert text in msg, msg
  assert 'max_attempts' not in msg and '`min_size`' not in msg
  # The number it proposes does work.
  c.data.num_clients = int(re.search(r'num_clients=(\d+) works', msg).group(1))
  assert _build(c, tmp_path / 'w').train.num_clients == c.data.num_clients
  # The library's own message stays in argument names.
  with pytest.raises(partition_lib.MinSizeError, match='`min_size`'):
    partition_lib.dirichlet(np.arange(240) % 3, 100, 0.5, 0, min_size=1)


def test_partition_sizes_are_named_by_config_fields(tmp_path):
  path = _jsonl(tmp_path / 'c.jsonl', [{'text': f'row {i}', 'label': i % 2}
                                       for i in range(50)])
  c = _classification_config(path, partition='dirichlet', num_clients=10, min_client_size=5)
  with pytest.raises(config_lib.ConfigError,
                     match=r'config.data.min_client_size=5 is invalid: 5 x '
                           r'config.data.num_clients=10 exceeds the 40 training'):
    _build(c, tmp_path / 'w')
  c = _classification_config(path, partition='shards', num_clients=10, labels_per_client=5)
  with pytest.raises(config_lib.ConfigError, match='config.data.labels_per_client=5 is invalid'):
    _build(c, tmp_path / 'w')
  c = _classification_config(path, partition='iid', num_clients=41)
  with pytest.raises(config_lib.ConfigError, match='config.data.num_clients=41 is invalid'):
    _build(c, tmp_path / 'w')


def test_instruction_dirichlet_failure_names_config_fields(tmp_path):
  path = _jsonl(tmp_path / 'w.jsonl', _phoneme_records(60))
  c = _decoder_config(path, input_key='word', target_key='phonemes', client_key='letter',
                      partition='dirichlet', num_clients=40, alpha=0.05)
  with pytest.raises(config_lib.ConfigError,
                     match=r"num_clients=40.*min_client_size=1.*8 distinct values of 'letter', "
                           r'config.data.alpha=0.05'):
    _build(c, tmp_path / 'w')


# ---------------------------------------------------------------- 6: labels


def test_mixed_int_and_string_labels(tmp_path, capsys):
  labels = [1, 'cat', 2, 'dog', 1.0, '2', 'cat', 2] * 5
  path = _jsonl(tmp_path / 'c.jsonl', [{'text': f'row {i}', 'label': y}
                                       for i, y in enumerate(labels)])
  td = _build(_classification_config(path), tmp_path / 'w')
  as_text = [str(int(y)) if isinstance(y, (int, float)) else y for y in labels]
  assert td.label_names == tuple(sorted(set(as_text)))
  assert td.num_labels == 4
  assert 'labels (4 classes): 0=1, 1=2, 2=cat, 3=dog' in capsys.readouterr().out
  # Every example's class is its label's name (held-out and training rows alike).
  raw = data_lib.load_jsonl(path)
  np.testing.assert_array_equal(raw['label'], np.asarray(as_text, dtype=object))
  got = np.concatenate([td.train.arrays['label'], td.eval['label']])
  want = [td.label_names.index(t) for t in as_text]
  assert sorted(got.tolist()) == sorted(want)
  # CSV: the column is text as soon as one value is.
  csv = tmp_path / 'c.csv'
  csv.write_text('text,label\n' + ''.join(f'row {i},{y}\n' for i, y in enumerate(as_text)))
  c = _classification_config(csv)
  c.data.source = 'csv'
  assert _build(c, tmp_path / 'w2').label_names == td.label_names


def test_labels_that_are_neither_are_rejected(tmp_path):
  path = _jsonl(tmp_path / 'c.jsonl', [{'text': f'row {i}', 'label': [1, 'a', None][i % 3]}
                                       for i in range(30)])
  with pytest.raises(config_lib.ConfigError,
                     match=r"label_key='label': labels must be integers or strings; 10 are "
                           r'not, e.g. row 2: None'):
    _build(_classification_config(path), tmp_path / 'w')


# ------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_own_seq2seq_data_trains_and_generates(tmp_path):
  path = _jsonl(tmp_path / 'words.jsonl', _phoneme_records(64))
  c = _decoder_config(path, input_key='word', target_key='phonemes', client_key='letter',
                      prompt_template='{input} ->')
  c.num_rounds, c.eval.every = 2, 2
  c.peft.target_modules, c.peft.extra_trainable, c.peft.rank = ('q_proj', 'v_proj'), (), 4
  summary = train.run(c, str(tmp_path / 'w'))
  assert np.isfinite(summary['after']['loss'])
  assert 0.0 <= summary['generation']['rouge_l'] <= 1.0
  with open(tmp_path / 'w' / 'generations.jsonl', encoding='utf-8') as fh:
    records = [json.loads(line) for line in fh]
  assert records and all(r['prompt'].endswith(' ->') for r in records)
