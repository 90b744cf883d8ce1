r"""Runs a federated experiment.

  python -m experiments.main                       # the embedded default
  python -m experiments.main --config=experiments/configs/mlp_synthetic.py:tiny --config_help
  python -m experiments.main --config=experiments/configs/mlp_synthetic.py:tiny \
      --workdir=/tmp/fl --config.num_rounds=3
  # compiled rounds are cached under ~/.cache/fedjax_fm/xla (--compilation_cache= to turn off)
  # two hosts (run on each, process_id 0 and 1):
  python -m experiments.main --config.fl.strategy=sharded \
      --coordinator_address=host0:1234 --num_processes=2 --process_id=0
"""

import difflib
import importlib.util
import os
import sys

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from fedjax_fm import config as config_lib
from fedjax_fm import config_docs
from fedjax_fm import sharding
from fedjax_fm import train
from fedjax_fm.train import baselines

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), 'configs', 'default.py')

_CONFIG = config_flags.DEFINE_config_file(
    'config', _DEFAULT_CONFIG,
    'Experiment config file (path[:arg]); --config_help lists its fields.', lock_config=True)
_CONFIG_HELP = flags.DEFINE_boolean(
    'config_help', False,
    'Print every field of --config (section.field, type, default, one-line doc), grouped '
    'by section, and exit; fields are overridden as --config.SECTION.FIELD=VALUE.')
_WORKDIR = flags.DEFINE_string('workdir', '/tmp/fedjax_fm/default',
                               'Directory for metrics.jsonl, summary.json and checkpoints.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None,
    'Multi-host: host:port of process 0 (or env FEDJAX_FM_COORDINATOR).')
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', None, 'Multi-host: number of processes (or env FEDJAX_FM_NUM_PROCESSES).')
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, 'Multi-host: this process (or env FEDJAX_FM_PROCESS_ID).')
_COMPILATION_CACHE = flags.DEFINE_string(
    'compilation_cache', os.path.join(os.path.expanduser('~'), '.cache', 'fedjax_fm', 'xla'),
    'Directory of JAX\'s persistent compilation cache: a rerun of the same program loads '
    'its compiled rounds instead of compiling them again. Empty: no cache.')
_BASELINES = flags.DEFINE_list(
    'baselines', [],
    'Baselines run after the experiment, written beside its numbers in summary.json '
    '("baselines"): majority (majority class overall and per client; classification), '
    'centralised (one client holding all training data), iid (IID partition over the same '
    'number of clients); e.g. --baselines=majority,centralised,iid.')
_VERBOSE = flags.DEFINE_boolean(
    'verbose', False, 'Show the full traceback of a config, data or workdir error.')

# A config, data or workdir error ends the binary with this status and one short message.
USAGE_ERROR = 2


def _fail(message: str) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(USAGE_ERROR)


def _load_config_file(spec: str):
  """``module.get_config(arg)`` of a ``path[:arg]`` config spec, or None if it cannot load."""
  path, _, arg = spec.partition(':')
  try:
    module_spec = importlib.util.spec_from_file_location('_fedjax_fm_config', path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()
  except Exception:  # pylint: disable=broad-except
    return None


def _unknown_override(argv) -> str | None:
  """Names the first ``--config.a.b`` override that is not a field, with close field names."""
  spec = _DEFAULT_CONFIG
  overrides = []
  for arg in argv[1:]:
    name = arg.lstrip('-').split('=', 1)[0]
    if name == 'config' and '=' in arg:
      spec = arg.split('=', 1)[1]
    elif name.startswith('config.'):
      overrides.append(name[len('config.'):])
  config = _load_config_file(spec)
  if config is None:
    return None
  for path in overrides:
    node, parts = config, path.split('.')
    for depth, part in enumerate(parts):
      keys = list(node.keys()) if hasattr(node, 'keys') else []
      if part not in keys:
        section = '.'.join(parts[:depth]) or 'the top level'
        close = difflib.get_close_matches(part, keys, n=3, cutoff=0.5)
        if not close:   # perhaps a field of another section
          everywhere = {f'{s}.{k}': k for s in config.keys() if hasattr(config[s], 'keys')
                        for k in config[s].keys()}
          by_name = difflib.get_close_matches(part, set(everywhere.values()), n=3, cutoff=0.6)
          close = [full for full, k in everywhere.items() if k in by_name]
        hint = (f'; did you mean {", ".join(repr(k) for k in close)}?' if close
                else f'; its fields are {", ".join(sorted(keys))}' if keys else '')
        return f'--config.{path}: {section} has no field {part!r}{hint}'
      node = node[part]
  return None


def config_help(config) -> str:
  """Every field of ``config`` as ``section.field  type  default  doc``, grouped by section."""
  sections: dict[str, list[tuple[str, str, str, str]]] = {}
  for name in config_docs.field_names(config):
    section, _, field = name.rpartition('.')
    value = config[section][field] if section else config[field]
    doc = config_docs.FIELD_DOCS.get(name, '(undocumented)')
    sections.setdefault(section, []).append((name, type(value).__name__, repr(value), doc))
  rows = [row for group in sections.values() for row in group]
  width = [max(len(row[i]) for row in rows) for i in range(2)]
  width.append(min(max(len(row[2]) for row in rows), 24))   # long defaults overflow
  order = [''] + [s for s in config_lib.SECTIONS if s in sections]
  order += sorted(s for s in sections if s not in order)
  lines = ['Config fields (override as --config.SECTION.FIELD=VALUE):']
  for section in order:
    if section not in sections:
      continue
    lines += ['', f'[{section or "top level"}]']
    lines += [f'  {n:<{width[0]}}  {t:<{width[1]}}  {v:<{width[2]}}  {d}'
              for n, t, v, d in sections[section]]
  return '\n'.join(lines)


def parse_flags(argv):
  """absl's flag parsing, with a misspelled config override as a short error (status 2)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(f'{e}\nPass --help for the flags; config fields are overridden as '
          f'--config.SECTION.FIELD=VALUE.')
  except (AttributeError, KeyError) as e:
    if '--verbose' in argv:
      raise
    _fail(_unknown_override(argv) or f'bad config override: {e}')


def check_workdir(workdir: str) -> None:
  """Fails early (before any data or model loads) unless ``workdir`` is a writable directory."""
  if not workdir:
    _fail('--workdir is empty')
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    _fail(f'--workdir={workdir} exists and is not a directory')
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    _fail(f'--workdir={workdir} cannot be created: {e.strerror or e}')
  if not os.access(workdir, os.W_OK | os.X_OK):
    _fail(f'--workdir={workdir} is not writable')


def enable_compilation_cache(directory: str) -> None:
  """Turns on JAX's persistent compilation cache in ``directory`` (no-op when empty)."""
  if not directory:
    return
  os.makedirs(directory, exist_ok=True)
  jax.config.update('jax_compilation_cache_dir', directory)
  # Cache every program, however small or quick to compile.
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _CONFIG_HELP.value:
    print(config_help(_CONFIG.value))
    return
  logging.set_verbosity(logging.WARNING)
  enable_compilation_cache(_COMPILATION_CACHE.value)
  check_workdir(_WORKDIR.value)
  sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  try:
    kinds = baselines.check_kinds(_BASELINES.value)
    train.run(_CONFIG.value, _WORKDIR.value)
    if kinds:
      baselines.write_baselines(_CONFIG.value, _WORKDIR.value, kinds)
  except (config_lib.ConfigError, ValueError, OSError) as e:
    # Config and data errors (and OS errors on data files): one message, no traceback.
    if _VERBOSE.value:
      raise
    kind = 'config' if isinstance(e, config_lib.ConfigError) else type(e).__name__
    _fail(f'({kind}) {e}\n(--verbose shows the traceback)')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
