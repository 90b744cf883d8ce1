"""Standard-library instruction data, the pretrained-LLM config and its tiny job end to end."""

import importlib.util
import inspect
import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from fedjax_fm import config as config_lib
from fedjax_fm import data as data_lib
from fedjax_fm.data import stdlib_instructions as si

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, 'experiments', 'configs', 'llm_instruct.py')


def _load_config(arg='tiny'):
  spec = importlib.util.spec_from_file_location('llm_instruct', CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(arg)
  c.progress = False
  return c


def _write(root, rel, source):
  path = root / rel
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(textwrap.dedent(source))


# ---------------------------------------------------------------- the data


def test_first_sentence_cleans_markup_and_keeps_abbreviations():
  assert si.first_sentence('Return ``x`` for :func:`~os.path.join` `paths`.  More.') == (
      'Return x for os.path.join paths.')
  assert si.first_sentence('Split e.g. a name. Then more.\n\nSecond paragraph.') == (
      'Split e.g. a name.')
  assert si.first_sentence('Open the\n   file\n\nDetails.') == 'Open the file.'
  assert si.first_sentence('Items are defined as follows:\n\n  x') == (
      'Items are defined as follows.')
  assert si.first_sentence('Is it empty? Yes.') == 'Is it empty?'
  assert si.first_sentence('') == ''


def _reference_signature(fn):
  """``def name(...)`` from the live function (inspect), spaces removed."""
  return ''.join(f'def {fn.__name__}{inspect.signature(fn)}'.split())


def test_signature_source_matches_inspect():
  source = textwrap.dedent('''
      def f(a: int, b=2, /, c: 'str' = 'x', *args: float, d, e=None, **kw) -> bool:
        pass
      async def g(x=(1, 2), *, y: dict[str, int] = {}):
        pass
      ''')
  namespace = {}
  exec(compile(source, '<test>', 'exec'), namespace)  # pylint: disable=exec-used
  tree = si.ast.parse(source)
  f_src, g_src = (si.signature_source(node) for node in tree.body)
  assert ''.join(f_src.split()) == _reference_signature(namespace['f'])
  assert g_src.startswith('async def g(')
  assert ''.join(g_src.split()) == 'async' + _reference_signature(namespace['g'])


def _fake_stdlib(root):
  long = 'word ' * 40
  _write(root, 'pkga/__init__.py', '''
      def top(path, mode='r'):
        """Open the file at path with the given mode.

        More details here.
        """
      def _private():
        """Private helpers are not public API at all."""
      ''')
  _write(root, 'pkga/mod.py', f'''
      class Reader:
        """A class docstring is not an example."""
        def read(self, n: int = -1) -> bytes:
          """Read up to n bytes; see ``read1``. Then more."""
        def __len__(self):
          """Dunder methods are skipped by the rule."""
        async def fetch(self):
          """Fetch the next chunk from the stream"""
      class _Hidden:
        def shown(self):
          """Methods of private classes are skipped."""
      def doctest_first():
        """>>> doctest_first()"""
      def echo(x):
        """echo(x) -> x, repeated as a signature."""
      def tiny():
        """Too short."""
      def long_one():
        """{long}."""
      def undocumented(a):
        return a
      ''')
  _write(root, 'pkga/_internal.py', '''
      def hidden():
        """Functions of private submodules are skipped."""
      ''')
  _write(root, 'pkga/tests/test_x.py', '''
      def test_it():
        """Tests are skipped by their directory."""
      ''')
  _write(root, 'single.py', '''
      def top(path, mode='r'):
        """Open the file at path with the given mode."""
      def other(a, *, b=None):
        """Combine a and b into one value."""
      ''')
  _write(root, '_private_top.py', '''
      def f():
        """Private top-level modules are skipped."""
      ''')
  _write(root, 'test/__init__.py', '''
      def f():
        """The test package is excluded."""
      ''')
  _write(root, 'pydoc_data/__init__.py', '')
  _write(root, 'pydoc_data/topics.py', '''
      topics = {'assert': 'The "assert" statement\\n'
                          '**********************\\n\\n'
                          'Assert statements are a way to insert checks:\\n\\n'
                          '   assert_stmt ::= "assert" expression\\n',
                'empty': 'Empty\\n*****\\n\\n   grammar only\\n'}
      ''')


def test_parsing_rules_on_a_fake_stdlib(tmp_path):
  _fake_stdlib(tmp_path)
  assert si.stdlib_modules(tmp_path) == ['pkga', 'single']
  data = si.build_stdlib_instructions(stdlib_dir=tmp_path)
  rows = list(zip(data['category'], data['module'], data['name'], data['input'],
                  data['output']))
  assert rows == [
      ('pkga', 'pkga', 'top', "def top(path, mode='r')",
       'Open the file at path with the given mode.'),
      ('pkga', 'pkga.mod', 'Reader.read', 'def read(self, n: int=-1) -> bytes',
       'Read up to n bytes; see read1.'),
      ('pkga', 'pkga.mod', 'Reader.fetch', 'async def fetch(self)',
       'Fetch the next chunk from the stream.'),
      # single.top repeats pkga.top's (signature, response): only the first is kept.
      ('single', 'single', 'other', 'def other(a, *, b=None)',
       'Combine a and b into one value.'),
  ]
  for field in si.FIELDS:
    assert data[field].dtype == object and len(data[field]) == len(rows)
  # Every instruction is a phrasing naming where the function lives.
  for instruction, module, name in zip(data['instruction'], data['module'], data['name']):
    where = f'`{module}.{name.split(".")[0]}`' if '.' in name else f'`{module}`'
    assert where in instruction
    assert any(re.fullmatch(re.escape(p).replace(r'\{what\}', '.+'), instruction)
               for p in si.PHRASINGS)


def test_topics_and_cap(tmp_path):
  _fake_stdlib(tmp_path)
  data = si.build_stdlib_instructions(stdlib_dir=tmp_path, include_topics=True)
  topics = [i for i, c in enumerate(data['category']) if c == si.TOPICS_CATEGORY]
  assert len(topics) == 1   # "empty" has no prose paragraph
  i = topics[0]
  assert data['output'][i] == 'Assert statements are a way to insert checks.'
  assert 'The "assert" statement' in data['instruction'][i] and data['input'][i] == ''
  capped = si.build_stdlib_instructions(('pkga',), stdlib_dir=tmp_path, max_per_package=2)
  full = si.build_stdlib_instructions(('pkga',), stdlib_dir=tmp_path)
  assert len(capped['output']) == 2
  positions = [list(full['name']).index(n) for n in capped['name']]
  assert positions == sorted(positions)     # a subset, in source order


def test_errors(tmp_path):
  _fake_stdlib(tmp_path)
  with pytest.raises(ValueError, match=r"unknown standard library package.*'nope'.*pkga"):
    si.build_stdlib_instructions(('nope',), stdlib_dir=tmp_path)
  with pytest.raises(ValueError, match='duplicates'):
    si.build_stdlib_instructions(('pkga', 'pkga'), stdlib_dir=tmp_path)
  with pytest.raises(ValueError, match='max_chars'):
    si.build_stdlib_instructions(stdlib_dir=tmp_path, min_chars=50, max_chars=10)
  with pytest.raises(ValueError, match='not a directory'):
    si.build_stdlib_instructions(stdlib_dir=tmp_path / 'missing')


def _reference_summary(doc):
  """The first sentence of a runtime ``__doc__``, cleaned independently of the module."""
  text = ' '.join(inspect.cleandoc(doc).split('\n\n')[0].split())
  text = re.sub(r':\w+:`~?([^`]+)`', r'\1', text).replace('``', '').replace('`', '')
  text = re.split(r'(?<=[.!?])\s+(?=[A-Z])', text)[0]
  return text if text[-1] in '.!?' else text + '.'


def test_real_stdlib_matches_runtime_docstrings():
  import json as json_module  # pylint: disable=g-import-not-at-top
  import textwrap as textwrap_module  # pylint: disable=g-import-not-at-top
  data = si.build_stdlib_instructions(('json', 'textwrap'))
  assert set(data['category']) == {'json', 'textwrap'}
  checked = 0
  for module, name, signature, output in zip(data['module'], data['name'], data['input'],
                                              data['output']):
    if module in ('json', 'textwrap') and '.' not in name:
      fn = getattr({'json': json_module, 'textwrap': textwrap_module}[module], name)
      assert output == _reference_summary(fn.__doc__), name
      assert ''.join(signature.split()) == _reference_signature(fn)
      checked += 1
  assert checked >= 4
  # Deterministic, and each example independent of which packages are chosen.
  again = si.build_stdlib_instructions(('json',))
  mask = data['category'] == 'json'
  for field in si.FIELDS:
    np.testing.assert_array_equal(again[field], data[field][mask])


def test_cache_round_trip(tmp_path):
  first = data_lib.load_stdlib_instructions(tmp_path, packages=('json',))
  files = list(tmp_path.glob('stdlib_instructions_*.json'))
  assert len(files) == 1
  again = data_lib.load_stdlib_instructions(tmp_path, packages=('json',))
  for field in si.FIELDS:
    np.testing.assert_array_equal(again[field], first[field])
  data_lib.load_stdlib_instructions(tmp_path, packages=('textwrap',))
  assert len(list(tmp_path.glob('stdlib_instructions_*.json'))) == 2


# ---------------------------------------------------------------- config


def test_config_and_tiny_validate():
  for arg in ('', 'tiny'):
    c = _load_config(arg)
    config_lib.validate(c, num_devices=1)
    assert c.model.kind == 'gguf' and c.data.source == 'stdlib_instructions'
  with pytest.raises(ValueError, match='unknown'):
    _load_config('huge')


@pytest.mark.parametrize('overrides,field', [
    ({'data.tokenizer': 'sentencepiece'}, 'data.tokenizer'),
    ({'model.kind': 'decoder'}, 'data.tokenizer'),
    ({'model.kind': 'decoder', 'data.tokenizer': 'sentencepiece'},
     'data.instruction_template'),
    ({'data.eval_split': 'everything'}, 'data.eval_split'),
    ({'data.partition': 'iid', 'data.num_clients': 20}, 'data.eval_split'),
    ({'data.packages': ('json', 'not a name')}, 'data.packages'),
    ({'model.path': '/tmp/model.bin'}, 'model.path'),
    ({'model.keep_layers': -1}, 'model.keep_layers'),
    ({'data.generate_max_tokens': 95}, 'data.generate_max_tokens'),
    ({'data.instruction_template': 'nope'}, 'data.instruction_template'),
])
def test_config_errors_name_the_field(overrides, field):
  c = _load_config('')
  for key, value in overrides.items():
    section, name = key.split('.')
    c[section][name] = value
  with pytest.raises(config_lib.ConfigError, match=re.escape(f'config.{field}=')):
    config_lib.validate(c, num_devices=1)


def test_stdlib_only_fields_are_refused_elsewhere():
  c = config_lib.base_config()
  c.data.packages = ('json',)
  with pytest.raises(config_lib.ConfigError, match='config.data.packages='):
    config_lib.validate(c, num_devices=1)
  c = config_lib.base_config()
  c.model.keep_layers = 2
  with pytest.raises(config_lib.ConfigError, match='config.model.keep_layers='):
    config_lib.validate(c, num_devices=1)
  c = config_lib.base_config()
  c.data.eval_split = 'clients'
  with pytest.raises(config_lib.ConfigError, match='config.data.eval_split='):
    config_lib.validate(c, num_devices=1)


# ----------------------------------------------- chat template, held-out clients


_CHATML = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
           "{{ '<|im_start|>system\\nBe {brief}.<|im_end|>\\n' }}{% endif %}"
           "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
           "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
           "{% endif %}")


def test_chat_prompt_template_equals_the_rendered_chat():
  pytest.importorskip('jinja2')
  from fedjax_fm.hf import gguf  # pylint: disable=g-import-not-at-top
  from fedjax_fm.train import registries  # pylint: disable=g-import-not-at-top

  def render(messages):
    return gguf.render_chat_template(_CHATML, messages, add_generation_prompt=True)

  template = registries.chat_prompt_template(render)
  for instruction, inp in (('Describe {this} function.', 'def f(x={})'),
                           ('Explain the topic.', '')):
    content = instruction + ('\n\n' + inp if inp else '')
    assert template.format(instruction, inp) == render([{'role': 'user',
                                                         'content': content}])


def _package_of(text):
  """The top-level package a rendered prompt names (`module` or `module.Class`)."""
  return re.search(r'`([\w.]+)`', text).group(1).split('.')[0]


def test_whole_clients_are_held_out(tmp_path):
  pytest.importorskip('sentencepiece')
  from fedjax_fm.train import task_data  # pylint: disable=g-import-not-at-top
  c = config_lib.base_config()
  c.model.kind = 'decoder'
  c.data.source, c.data.task = 'stdlib_instructions', 'causal_lm'
  c.data.tokenizer, c.data.vocab_size, c.data.byte_fallback = 'sentencepiece', 400, True
  c.data.instruction_template, c.data.max_len = 'short', 160
  c.data.packages = ('base64', 'csv', 'glob', 'heapq', 'json', 'shlex', 'textwrap')
  c.data.partition, c.data.eval_split, c.data.eval_fraction = 'natural', 'clients', 0.3
  c.fl.clients_per_round = c.fl.chunk_size = 2
  config_lib.validate(c, num_devices=1)
  td = task_data.build_task_data(c, str(tmp_path))
  held = set(td.instructions['category'])
  assert len(held) == round(0.3 * len(c.data.packages))
  # Every other package is one training client, and no training example is held out.
  assert td.train.num_clients == len(c.data.packages) - len(held)
  train = td.train.arrays['input_ids']
  for i in range(td.train.num_clients):
    rows = train[td.train.offsets[i]:td.train.offsets[i + 1]]
    packages = {_package_of(td.tokenizer.decode(row)) for row in rows}
    assert len(packages) == 1 and not packages & held
  for row, category in zip(td.eval['input_ids'], td.instructions['category']):
    assert _package_of(td.tokenizer.decode(row)) == category
  # The held-out examples are in random order across their clients.
  assert len(td.eval['input_ids']) == len(td.instructions['output'])
  assert list(td.instructions['category']) != sorted(td.instructions['category'])


# ------------------------------------------------------------ the real model


@pytest.fixture(scope='module')
def tiny_pretrained():
  pytest.importorskip('gguf')
  pytest.importorskip('jinja2')
  from fedjax_fm.hf import gguf  # pylint: disable=g-import-not-at-top
  try:
    gguf.smollm2_gguf_path()
  except (ImportError, FileNotFoundError) as e:
    pytest.skip(str(e))
  from fedjax_fm.train import registries  # pylint: disable=g-import-not-at-top
  c = _load_config('tiny')
  return c, registries.load_pretrained_decoder(c)


@pytest.mark.slow
def test_smollm2_chat_tokens_and_response_mask(tiny_pretrained):
  c, pretrained = tiny_pretrained
  tok = pretrained.tokenizer.tokenizer
  im_start, im_end = tok.token_to_id('<|im_start|>'), tok.token_to_id('<|im_end|>')
  assert pretrained.eos_id == im_end
  ex = {'instruction': ['Describe what this function from `json` does.'],
        'input': ['def dumps(obj)'], 'output': ['Serialize obj to a JSON formatted str.']}
  enc = data_lib.tokenize_instructions(ex, pretrained.tokenizer, c.data.max_len,
                                       template=pretrained.prompt_template,
                                       eos_id=pretrained.eos_id)
  ids = enc['input_ids'][0][enc['attention_mask'][0] == 1].tolist()
  assert ids[0] == im_start and ids[-1] == im_end
  # The loss covers exactly the response and the end of the turn.
  response = np.asarray(enc['loss_mask'][0][:len(ids)], bool)
  assert tok.decode([t for t, r in zip(ids, response) if r]) == ex['output'][0]
  assert pretrained.tokenizer.decode(np.asarray(ids)[~response]).endswith('assistant\n')
  cue = tok.encode('<|im_start|>assistant\n', add_special_tokens=False).ids
  start = int(np.argmax(response))
  assert cue[0] == im_start and ids[start - len(cue):start] == cue


@pytest.mark.slow
def test_kept_layers_are_the_full_models_and_each_model_is_its_own(tiny_pretrained):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from fedjax_fm import peft  # pylint: disable=g-import-not-at-top
  from fedjax_fm.hf import gguf  # pylint: disable=g-import-not-at-top
  from fedjax_fm.train import registries  # pylint: disable=g-import-not-at-top
  c, pretrained = tiny_pretrained
  full, _, _ = gguf.load_gguf(gguf.smollm2_gguf_path(), max_len=c.data.max_len)
  flat = lambda m: {'.'.join(map(str, k)): np.asarray(v.get_value())
                    for k, v in nnx.to_flat_state(nnx.state(m, nnx.Param))}
  kept, whole = flat(pretrained.model), flat(full)
  assert len(pretrained.model.layers) == c.model.keep_layers < len(full.layers)
  assert kept and set(kept) <= set(whole)
  for name, value in kept.items():
    np.testing.assert_array_equal(value, whole[name], err_msg=name)
  # Every call builds a model of its own: surgery or new values on one leave the next intact.
  first = registries.load_pretrained_decoder(c).model
  peft.apply_lora(first, rank=2, alpha=4.0, target_modules=('q_proj',), rngs=nnx.Rngs(0))
  first.embed.embedding.set_value(jnp.zeros_like(first.embed.embedding.get_value()))
  second = registries.load_pretrained_decoder(c).model
  assert type(second.layers[0].attn.q_proj).__name__ == 'Linear'
  np.testing.assert_array_equal(np.asarray(second.embed.embedding.get_value()),
                                kept['embed.embedding'])


@pytest.mark.slow
def test_tiny_job_end_to_end_through_the_binary(tmp_path, tiny_pretrained):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from fedjax_fm import models  # pylint: disable=g-import-not-at-top
  c, pretrained = tiny_pretrained
  workdir = tmp_path / 'run'
  cmd = [sys.executable, '-m', 'experiments.main', f'--config={CONFIG}:tiny',
         f'--workdir={workdir}', '--compilation_cache=', '--config.progress=False',
         '--config.tensorboard=False']
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  with open(workdir / 'summary.json') as f:
    summary = json.load(f)
  for key in ('generation', 'generation_before'):
    assert set(summary[key]) == {'rouge_l', 'exact_match', 'token_f1', 'cer', 'ter'}
    assert all(0.0 <= v <= 1.0 for v in summary[key].values())
  assert summary['before']['loss'] > 0 and summary['after']['loss'] > 0
  assert summary['rounds'] == c.num_rounds
  with open(workdir / 'generations.jsonl') as f:
    records = [json.loads(line) for line in f]
  n = c.data.generate_examples
  assert [r['model'] for r in records] == ['before'] * n + ['after'] * n
  for r in records:
    assert set(r) == {'model', 'prompt', 'reference', 'prediction', 'category'}
    assert r['prompt'].startswith('<|im_start|>system\n')
    assert r['prompt'].endswith('<|im_start|>assistant\n')
  # The instructions are the held-out clients' (the job names them in its description).
  held = re.search(r'clients held out \(([^)]*)\)', summary['data']).group(1).split(', ')
  assert {r['category'] for r in records} <= set(held)
  with open(workdir / 'metrics.jsonl') as f:
    assert len(f.readlines()) == c.num_rounds
  # "Before" is the untrained pretrained model: regenerate with the plain model.
  before = records[:n]
  enc = data_lib.tokenize_prompts(
      {'instruction': [r['prompt'] for r in before]}, pretrained.tokenizer, c.data.max_len,
      template=data_lib.PromptTemplate(with_input='{instruction}{input}',
                                       without_input='{instruction}'))
  gen = models.generate(pretrained.model, jnp.asarray(enc['input_ids']),
                        c.data.generate_max_tokens, prompt_mask=jnp.asarray(
                            enc['attention_mask']), eos_id=pretrained.eos_id)
  for r, row, length in zip(before, np.asarray(gen.ids), np.asarray(gen.lengths)):
    assert r['prediction'] == pretrained.tokenizer.decode(row[:length].tolist()).strip()
