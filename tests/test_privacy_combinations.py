"""Every DP configuration `config.validate` accepts keeps the accountant's bound, through the real round.

The grid: PEFT route (with its LoRA aggregation mode) x uplink compression (every
registered compressor with and without ``compress.error_feedback``, and each
quantizing second stage after ``top_k``) x aggregator x adaptive clipping x
``privacy.mechanism`` (when the config has that field: its allowed values are read
from the registries or the validator, so a new mechanism is enumerated without a
change here). Every cell is validated; a rejection must name a config field.

The accepted cells are built by `train.build_experiment` on tiny models (an MLP on
synthetic features, a one-layer encoder and decoder on a small generated text
file), one compiled round per cell, chosen so that every value of every factor is
built at least once (`test_grid_validation_and_coverage` checks this against the
whole grid). Further DP-relevant fields (per-layer clipping, execution
strategy, downlink compression, mixed precision, attacks, pruning, SLoRA's second
stage) get cells of their own.

What the accountant assumes (`fedjax_fm.privacy.accounting`): fixed-size sampling
of ``m`` clients, the replace-one relation and ``GaussianDpEvent(z / 2)`` for noise
of standard deviation ``z C / m`` on the mean: replacing one client's data moves the
pre-noise mean by at most ``2 C / m`` (for the distributed Skellam mechanism, whose
accountant holds its parameters, ``2 B / (gamma m)`` with ``B`` its rounded-norm
bound; `sensitivity_bound`). For every built cell:

(a) sensitivity: one client's data is replaced (emptied, swapped for another
    client's, made large, made non-finite); everything the server releases (the
    new params, ``ServerState.base_delta``, the adaptive clip norm, the downlink
    view) is compared with the original world under the *same* noise draw: the
    noise is additive and data-independent, so the difference is exactly the
    pre-noise difference (checked against a noise-free build of the same cell in
    `test_same_noise_draw_isolates_the_pre_noise_aggregate`). The params move by at
    most that bound, the log clip norm by at most ``eta / m`` (one centred bit), the
    downlink view not at all (it is sent before the round's aggregate exists).
    Where a client keeps state (error feedback, warm starts) or the clip adapts,
    a second round starts from the same released state in both worlds, each with
    its own client store.
(b) noise: different seeds give different values in every released leaf, and the
    released delta's per-coordinate spread matches ``z C / m`` (``z_delta`` with
    adaptive clipping, Andrew et al. Thm 1) by a chi-square test.

Cells that violate the bound are marked ``xfail(strict=True)`` with the reason.
"""

from __future__ import annotations

import ast
import copy
import itertools
import json
import math
import os
import re

from flax import nnx
import jax
import ml_collections
import numpy as np
import pytest
from scipy import stats

from fedjax_fm import config as config_lib
from fedjax_fm import peft
from fedjax_fm import train
from fedjax_fm.train import registries as reg

CLIP = 0.005          # small against every tiny model's update norm: clipping is active
Z = 8.0               # noise multiplier (large: the chi-square test sees mostly noise)
SIGMA_B = 8.0         # adaptive: count noise std (2 * SIGMA_B > Z)
CLIENTS = 3           # clients per round
CHUNK = 2             # the chunked strategy: 3 clients padded to 4
XLA_FAST = {'xla_backend_optimization_level': 0}   # same program, cheaper CPU codegen


class PrivacyViolation(AssertionError):
  """A released value exceeds the accountant's sensitivity, or is not noised."""


def _require(condition, message):
  if not condition:
    raise PrivacyViolation(message)


# ------------------------------------------------------------------ the grid

_MODEL_OF_METHOD = {'full': 'mlp', 'prompt': 'decoder', 'prefix': 'decoder'}
_LORA_METHODS = ('lora', 'slora')


def _routes():
  routes = []
  for method in reg.PEFT_METHODS.names:
    if method in _LORA_METHODS:
      routes += [(method, mode) for mode in reg.LORA_AGGREGATION.names]
    else:
      routes.append((method, 'fedit'))
  return routes


def _compressions():
  plain = [(name, ef, 'none') for name in reg.COMPRESSORS.names for ef in (False, True)]
  staged = [('top_k', ef, q) for q in reg.QUANTIZERS.names for ef in (False, True)]
  return plain + staged


def _dp_config_like():
  c = config_lib.base_config()
  c.model.kind, c.data.source, c.peft.method = 'mlp', 'synthetic', 'full'
  c.privacy.enabled = True
  return c


def _mechanisms() -> tuple:
  """Allowed ``privacy.mechanism`` values, or ``(None,)`` when the config has none."""
  base = config_lib.base_config()
  if 'mechanism' not in base.privacy:
    return (None,)
  for registry in reg.ALL:
    if registry.family == 'privacy.mechanism':
      return tuple(registry.names)
  c = _dp_config_like()
  c.privacy.mechanism = '<not a mechanism>'
  try:
    config_lib.validate(c, num_devices=1)
  except config_lib.ConfigError as e:
    found = re.search(r'allowed values are (\(.*?\))', str(e))
    if found:
      return tuple(ast.literal_eval(found.group(1)))
  return (base.privacy.mechanism,)


ROUTES = _routes()
COMPRESSIONS = _compressions()
AGGREGATORS = reg.AGGREGATORS.names
ADAPTIVE = (False, True)
MECHANISMS = _mechanisms()

# The fields a cell sets; a rejection must name one of them.
CELL_FIELDS = ('peft.method', 'peft.lora_aggregation', 'compress.uplink',
               'compress.error_feedback', 'compress.then', 'aggregator.name',
               'privacy.adaptive', 'privacy.clipped_count_stddev', 'privacy.mechanism')


def _cell(route, compression=('identity', False, 'none'), aggregator='mean',
          adaptive=False, mechanism=MECHANISMS[0], **extra):
  return dict(route=tuple(route), compression=tuple(compression), aggregator=aggregator,
              adaptive=adaptive, mechanism=mechanism, extra=dict(extra))


def _cell_id(cell):
  (method, mode), (name, ef, then) = cell['route'], cell['compression']
  parts = [method + (f'-{mode}' if method in _LORA_METHODS else ''),
           name + ('+ef' if ef else '') + (f'+{then}' if then != 'none' else ''),
           cell['aggregator']]
  if cell['adaptive']:
    parts.append('adaptive')
  if cell['mechanism'] is not None:
    parts.append(str(cell['mechanism']))
  parts += [f'{k}={v}' for k, v in cell['extra'].items()]
  return '/'.join(parts)


# ----------------------------------------------------------------- configs

_WORDS = ('amber', 'basil', 'cedar', 'delta', 'ember', 'fjord', 'grove', 'heath', 'inlet',
          'jetty', 'knoll', 'larch', 'marsh', 'nexus', 'orbit', 'prism')


def write_text_file(path: str, n: int = 160, seed: int = 0) -> str:
  """A small JSONL of word sequences with 3 labels (each label favours 8 words)."""
  rng = np.random.default_rng(seed)
  with open(path, 'w') as f:
    for _ in range(n):
      label = int(rng.integers(0, 3))
      words = rng.choice(_WORDS[label * 4: label * 4 + 8], size=8)
      f.write(json.dumps({'text': ' '.join(words), 'label': label}) + '\n')
  return path


_DEFAULTS = config_lib.base_config


def base_config(method: str, text_path: str = 'unused.jsonl'):
  """A tiny DP experiment for a PEFT method (MLP, encoder or decoder)."""
  kind = _MODEL_OF_METHOD.get(method, 'encoder')
  c = _DEFAULTS()
  c.num_rounds = 2
  c.progress, c.tensorboard = False, False
  c.model.kind = kind
  c.model.hidden_size, c.model.num_layers, c.model.mlp_dim = 16, 1, 32
  c.model.num_heads, c.model.num_kv_heads, c.model.hidden = 2, 1, (8,)
  if kind == 'mlp':
    c.data.source, c.data.num_features, c.data.num_classes = 'synthetic', 8, 3
    c.data.num_examples = 240
  else:
    c.data.source, c.data.path = 'jsonl', text_path
    c.data.tokenizer, c.data.vocab_size, c.data.max_len = 'sentencepiece', 64, 8
    c.data.task = 'causal_lm' if kind == 'decoder' else 'classification'
  c.data.num_clients, c.data.partition = 12, 'iid'
  c.peft.method, c.peft.rank, c.peft.num_virtual_tokens = method, 2, 2
  c.peft.adapter_bottleneck, c.peft.slora_stage1_rounds = 4, 1
  c.peft.target_modules = ('query', 'value') if kind == 'encoder' else ('q_proj', 'v_proj')
  c.peft.extra_trainable = ('classifier',) if kind == 'encoder' else ()
  c.fl.clients_per_round, c.fl.local_steps, c.fl.batch_size = CLIENTS, 1, 2
  c.fl.strategy, c.fl.chunk_size = 'vmap', CHUNK   # extra cells run 'chunked' (padded)
  c.client_optimizer.name, c.client_optimizer.learning_rate = 'sgd', 0.5
  c.server_optimizer.name, c.server_optimizer.learning_rate = 'fedavg', 1.0  # params += mean
  c.eval.max_examples = 8
  c.privacy.enabled, c.privacy.clip_norm, c.privacy.noise_multiplier = True, CLIP, Z
  c.privacy.clipped_count_stddev = SIGMA_B
  c.compress.min_size, c.compress.fraction = 1, 0.25   # compress every leaf
  return c


def apply_cell(c, cell):
  """Sets a cell's factors on a config (in place) and returns it."""
  method, mode = cell['route']
  name, ef, then = cell['compression']
  c.peft.method, c.peft.lora_aggregation = method, mode
  c.compress.uplink, c.compress.error_feedback, c.compress.then = name, ef, then
  c.aggregator.name = cell['aggregator']
  c.privacy.adaptive = cell['adaptive']
  if cell['mechanism'] is not None:
    c.privacy.mechanism = cell['mechanism']
  for field, value in cell['extra'].items():
    section, key = field.split('.')
    c[section][key] = value
  return c


def validate(c) -> config_lib.ConfigError | None:
  try:
    config_lib.validate(c, num_devices=len(jax.devices()))
  except config_lib.ConfigError as e:
    return e
  return None


def _assert_names_a_field(error, fields=CELL_FIELDS):
  named = re.findall(r'config\.([a-z_]+\.[a-z_]+)', str(error))
  assert named and named[0] in fields, f'rejection does not name a cell field: {error}'


# -------------------------------------------------------------- built cells

_FULL = ('full', 'fedit')
_IDENTITY = ('identity', False, 'none')


def _accepted(cell) -> bool:
  return validate(apply_cell(base_config(cell['route'][0]), cell)) is None


def _first_accepted(candidates):
  return next((c for c in candidates if _accepted(c)), candidates[0])


def _covering_cells():
  """Cells that build every value of every factor (each validated when run).

  Compression variant ``i`` goes with the ``i``-th accepted route (then the MLP),
  adaptive clipping alternating and the mechanisms in turn, moved to the first
  accepted combination when that one is rejected. Then every accepted (mechanism,
  adaptive) pair, every mechanism on the LoRA and prompt routes, and one cell for
  each value DP rejects today (built, and checked, if that changes).
  """
  routes_ok = [r for r in ROUTES if _accepted(_cell(r))]
  cells = []
  for i, compression in enumerate(COMPRESSIONS):
    route = routes_ok[i] if i < len(routes_ok) else _FULL
    adaptive, mechanism = bool(i % 2), MECHANISMS[(i // 2) % len(MECHANISMS)]
    options = [(adaptive, mechanism)] + [(a, m) for m in MECHANISMS
                                         for a in (adaptive, not adaptive)]
    cells.append(_first_accepted([_cell(r, compression, adaptive=a, mechanism=m)
                                  for r in (route, _FULL) for a, m in options]))
  for mechanism in MECHANISMS:
    for adaptive in ADAPTIVE:
      cell = _cell(_FULL, ('top_k', True, 'none'), adaptive=adaptive, mechanism=mechanism)
      cell = _first_accepted([cell, _cell(_FULL, adaptive=adaptive, mechanism=mechanism)])
      if not any(c['mechanism'] == mechanism and c['adaptive'] == adaptive for c in cells):
        cells.append(cell)
    for route in (('lora', 'fedit'), ('lora', 'ffa')):
      if not any(c['mechanism'] == mechanism and c['route'] == route for c in cells):
        cells.append(_cell(route, mechanism=mechanism))
  cells += [_cell(r) for r in ROUTES if r not in routes_ok]
  cells += [_cell(_FULL, aggregator=a) for a in AGGREGATORS if a != 'mean']
  return cells


_PRUNE_REGROW_REASON = (
    'prune.regrow_fraction > 0 under DP: ServerState.prune.scores is the mean of the '
    "clients' dense first-batch gradients, neither clipped nor noised; it decides the "
    'regrown masks that are broadcast with the model')

def _violation(reason, raises=PrivacyViolation, cell=None):
  """A strict xfail; none for a cell `validate` rejects (then nothing is violated)."""
  if cell is not None and not _accepted(cell):
    return []
  return [pytest.mark.xfail(strict=True, raises=raises, reason=reason)]


def _extra(reason=None, **kwargs):
  cell = _cell(**kwargs)
  marks = _violation(reason, cell=cell) if reason else []
  return pytest.param(cell, id=_cell_id(cell), marks=marks)


EXTRA_CELLS = [
    _extra(route=_FULL, compression=('qsgd', True, 'none'), adaptive=True,
           **{'privacy.per_layer': True}),
    _extra(route=_FULL, **{'fl.strategy': 'chunked'}),
    _extra(route=_FULL, compression=('top_k', True, 'none'), adaptive=True,
           **{'fl.strategy': 'chunked'}),
    _extra(route=_FULL, compression=('top_k', True, 'none'), adaptive=True,
           **{'compress.downlink': 'qsgd'}),
    _extra(route=_FULL, compression=('stochastic_uniform', False, 'none'),
           **{'model.dtype': 'bfloat16'}),
    _extra(route=_FULL, **{'prune.enabled': True}),
    _extra(_PRUNE_REGROW_REASON, route=_FULL,
           **{'prune.enabled': True, 'prune.regrow_fraction': 0.5}),
] + [
    _extra(route=_FULL, mechanism=mechanism,
           **{'attack.kind': kind, 'attack.fraction': 0.3})
    for kind in config_lib.ATTACKS if kind != 'none'
    for mechanism in (MECHANISMS if kind in ('scale', 'nan') else MECHANISMS[:1])
]


# ----------------------------------------------------------- round helpers

@pytest.fixture(scope='module')
def workspace(tmp_path_factory):
  """Text file and per-model task data, built once for the module."""
  root = tmp_path_factory.mktemp('dp_grid')
  return {'root': str(root), 'text': write_text_file(str(root / 'text.jsonl')), 'data': {}}


def build(c, workspace, **kwargs):
  kind = c.model.kind
  exp = train.build_experiment(c, workspace['root'], task_data=workspace['data'].get(kind),
                               **kwargs)
  workspace['data'].setdefault(kind, exp.data)
  return exp


def compile_round(exp, state, data):
  return exp.fed_round.apply.lower(state, exp.split.frozen, data).compile(
      compiler_options=XLA_FAST)


def _copy(data):
  return jax.tree.map(np.array, data)


def neighbours(data, kind, slot=0, other=1):
  """Round data where the client in ``slot`` holds other data (replace-one)."""
  out = {}
  empty = _copy(data)
  empty['step_mask'][slot] = False
  empty['example_mask'][slot] = False
  out['empty'] = empty
  swap = _copy(data)
  for k in swap['batch']:
    swap['batch'][k][slot] = data['batch'][k][other]
  swap['example_mask'][slot] = data['example_mask'][other]
  swap['step_mask'][slot] = data['step_mask'][other]
  out['swap'] = swap
  big = _copy(data)
  if kind == 'mlp':
    big['batch']['x'][slot] *= 1e3
    nan = _copy(data)
    nan['batch']['x'][slot] = np.finfo(np.float32).max   # overflows: a non-finite update
    out['nonfinite'] = nan
  else:
    big['batch']['input_ids'][slot] = 5
    big['batch']['attention_mask'][slot] = 1
  if 'label' in big['batch']:
    big['batch']['label'][slot] = (big['batch']['label'][slot] + 1) % 3
  out['large'] = big
  return out


def _flat(tree) -> np.ndarray:
  leaves = [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)]
  return np.concatenate(leaves) if leaves else np.zeros(0)


def released(state) -> np.ndarray:
  """The released vector: trainable params and the merged base update."""
  return np.concatenate([_flat(state.params), _flat(state.base_delta)])


def _clip(state, c):
  return float(state.clip.clip_norm) if c.privacy.adaptive else c.privacy.clip_norm


def sensitivity_bound(exp, state) -> float:
  """What the accountant assumes one replaced client moves the mean by.

  DP-FedAvg (`accounting.dp_event`): ``GaussianDpEvent(z / 2)`` for noise ``z C``
  on the sum, i.e. ``2 C``, and ``2 C / m`` on the mean. A distributed mechanism
  whose accountant holds its parameters (Skellam): twice its rounded-norm bound
  ``B`` (integer units, scale ``gamma``) over its fixed denominator.
  """
  params = getattr(exp.accountant, 'params', None)
  if params is not None and hasattr(params, 'norm_bound'):
    return 2.0 * params.norm_bound / (params.scale * params.expected_clients)
  return 2.0 * _clip(state, exp.config) / exp.config.fl.clients_per_round


def _slack(bound, ref):
  return 1e-4 * bound + 8 * float(np.finfo(np.float32).eps) * float(np.linalg.norm(ref))


def check_sensitivity(exp, run, state, data, variants, report):
  """(a): every neighbour moves the released values within the accountant's bound.

  Returns the largest params difference relative to ``C / m``.
  """
  c = exp.config
  m = c.fl.clients_per_round
  eta = c.privacy.clip_learning_rate
  out_d = run(state, data)
  ref = released(out_d)
  bound = sensitivity_bound(exp, state)
  largest = 0.0
  for name, data_v in variants.items():
    out_v = run(state, data_v)
    diff = float(np.linalg.norm(ref - released(out_v)))
    report.append((name, diff / bound))
    _require(diff <= bound + _slack(bound, ref),
             f'replacing one client ({name}) moved the released params by {diff:.6g} > '
             f'the accountant\'s {bound:.6g}')
    largest = max(largest, diff * m / _clip(state, c))
    if c.privacy.adaptive:
      log_step = abs(math.log(float(out_d.clip.clip_norm) / float(out_v.clip.clip_norm)))
      _require(log_step <= eta / m * (1 + 1e-4) + 1e-6,
               f'{name}: the clip norm moved by a factor exp({log_step:.4g}) > exp(eta / m)')
    if out_d.downlink != ():   # the view is sent before this round's aggregate exists
      np.testing.assert_array_equal(_flat(out_d.downlink.view), _flat(out_v.downlink.view))
    if out_d.prune != () and jax.tree.leaves(out_d.prune.scores):
      score_diff = float(np.linalg.norm(_flat(out_d.prune.scores)
                                        - _flat(out_v.prune.scores)))
      _require(score_diff <= bound + _slack(bound, ref),
               f'{name}: the released regrowth scores moved by {score_diff:.4g} > {bound:.4g}')
  return largest


def check_two_rounds(exp, run, state, data, variants, report):
  """(a) in round 2, from the same released state, each world with its own store."""
  first = run(state, data)
  worlds = {'original': (first, data)}
  for name, data_v in variants.items():
    worlds[name] = (run(state, data_v), data_v)
  second = {name: run(first._replace(client_store=out.client_store), d)
            for name, (out, d) in worlds.items()}
  bound = sensitivity_bound(exp, first)
  ref = released(second['original'])
  for name in variants:
    diff = float(np.linalg.norm(ref - released(second[name])))
    report.append((name + '@2', diff / bound))
    _require(diff <= bound + _slack(bound, ref),
             f'round 2: replacing one client ({name}) moved the released params by {diff:.6g} '
             f'> {bound:.6g}')
    if second[name].downlink != ():
      np.testing.assert_array_equal(_flat(second['original'].downlink.view),
                                    _flat(second[name].downlink.view))


def expected_noise_std(c, clip) -> float:
  """Per-coordinate std of the noise on the mean: z C / m (z_delta when adaptive)."""
  z = c.privacy.noise_multiplier
  if c.privacy.adaptive:   # z^-2 = z_delta^-2 + (2 sigma_b)^-2 (Andrew et al. Thm 1)
    z = 1.0 / math.sqrt(z ** -2 - (2.0 * c.privacy.clipped_count_stddev) ** -2)
  return z * clip / c.fl.clients_per_round


def check_noise(exp, run, data, seeds=(11, 12, 13, 14)):
  """(b): released leaves differ across seeds; their spread is z C / m."""
  c = exp.config
  outs = [run(exp.fed_round.init(exp.split.trainable, jax.random.key(s)), data) for s in seeds]
  for a, b in itertools.combinations(outs, 2):
    for la, lb in zip(jax.tree.leaves((a.params, a.base_delta)),
                      jax.tree.leaves((b.params, b.base_delta))):
      _require(np.any(np.asarray(la) != np.asarray(lb)), 'a released leaf is not noised')
    if c.privacy.adaptive:
      _require(float(a.clip.clip_norm) != float(b.clip.clip_norm), 'the clip norm is not noised')
  sigma = expected_noise_std(c, c.privacy.clip_norm)
  start = jax.tree.leaves(exp.split.trainable)
  per_leaf = [np.stack([np.asarray(x, np.float64) - np.asarray(s, np.float64)
                        for x in xs]) / sigma
              for s, xs in zip(start, zip(*[jax.tree.leaves(o.params) for o in outs]))]
  # Exactly Gaussian noise of that std: the central mechanism without attackers' noise.
  # The distributed one adds its rounding's variance on top (only at least z C / m).
  exact = (c.privacy.get('mechanism', 'gaussian') == 'gaussian'
           and c.attack.kind not in ('noise', 'scale'))
  for z in per_leaf + [np.concatenate([z.ravel() for z in per_leaf])]:
    chi2, dof = float(np.sum(z * z)), z.size
    _require(chi2 >= stats.chi2.ppf(1e-6, dof),
             f'noise std {math.sqrt(chi2 / dof) * sigma:.4g} is below z C / m = {sigma:.4g}')
    if exact:
      assert chi2 <= stats.chi2.ppf(1 - 1e-6, dof), (
          f'noise std {math.sqrt(chi2 / dof) * sigma:.4g} is above z C / m = {sigma:.4g}')


def check_round(exp, data, variants, two_rounds=None, label=''):
  """(a) and (b) through one compiled round of a built experiment."""
  state = exp.fed_round.init(exp.split.trainable, jax.random.key(0))
  compiled = compile_round(exp, state, data)

  def run(s, d):
    return compiled(s, exp.split.frozen, d)[0]

  report = []
  largest = check_sensitivity(exp, run, state, data, variants, report)
  assert largest > 0.05, f'no neighbour moved the params (largest {largest:.3g} C / m)'
  if two_rounds is None:
    two_rounds = bool(jax.tree.leaves(state.client_store)) or exp.config.privacy.adaptive
  if two_rounds:
    check_two_rounds(exp, run, state, data, variants, report)
  check_noise(exp, run, data)
  print(label, ' '.join(f'{n}={r:.3f}' for n, r in report))


def check_cell(cell, workspace, **kwargs):
  """Validates a cell; if accepted, builds its round and checks (a) and (b)."""
  c = apply_cell(base_config(cell['route'][0], workspace['text']), cell)
  error = validate(c)
  if error is not None:
    _assert_names_a_field(error, CELL_FIELDS + tuple(cell['extra']))
    return None
  exp = build(c, workspace)
  data = exp.round_data(0)
  variants = neighbours(data, c.model.kind)
  if 'attacker' in data:   # replace an honest client's data, and an attacker's
    attackers = np.flatnonzero(data['attacker'])
    honest = np.flatnonzero(~data['attacker'] & data['client_mask'])
    assert attackers.size and honest.size
    variants = {f'honest-{k}': v for k, v in
                neighbours(data, c.model.kind, honest[0], attackers[0]).items()}
    variants.update({f'attacker-{k}': v for k, v in
                     neighbours(data, c.model.kind, attackers[0], honest[0]).items()})
  check_round(exp, data, variants, label=_cell_id(cell), **kwargs)
  return exp


# ------------------------------------------------------------------ tests

def _full_grid():
  return [_cell(r, comp, agg, ad, mech) for r in ROUTES for comp in COMPRESSIONS
          for agg in AGGREGATORS for ad in ADAPTIVE for mech in MECHANISMS]


@pytest.mark.slow
def test_grid_validation_and_coverage(monkeypatch):
  """Every cell of the grid is accepted, or rejected naming one of the cell's fields;
  every value of every factor that an accepted cell uses is built by `test_grid_cell`."""
  built = [c for c in _covering_cells() if _accepted(c)]
  # `validate` reads the defaults twice per call, and only reads them: share one frozen
  # copy for the sweep (a write into it would raise).
  frozen_defaults = ml_collections.FrozenConfigDict(config_lib.base_config())
  monkeypatch.setattr(config_lib, 'base_config', lambda: frozen_defaults)
  accepted = []
  templates = {}
  for cell in _full_grid():
    method = cell['route'][0]
    if method not in templates:   # one config per route: a cell sets all its fields
      templates[method] = base_config(method)
    error = validate(apply_cell(templates[method], cell))
    if error is None:
      accepted.append(cell)
    else:
      _assert_names_a_field(error)
  assert accepted
  # DP-FedAvg accounts for the clipped uniform mean only.
  assert {c['aggregator'] for c in accepted} == {'mean'}
  assert not any(c['route'][1] in ('product', 'stack') for c in accepted
                 if c['route'][0] in _LORA_METHODS)
  for factor in ('route', 'compression', 'aggregator', 'adaptive', 'mechanism'):
    wanted = {c[factor] for c in accepted}
    have = {c[factor] for c in built}
    assert wanted <= have, f'{factor}: accepted but never built: {wanted - have}'
  pairs = {(c['mechanism'], c['adaptive']) for c in accepted}
  assert pairs <= {(c['mechanism'], c['adaptive']) for c in built}


def test_validation_fast_subset():
  for agg, comp, adaptive in itertools.product(
      AGGREGATORS, [_IDENTITY, ('top_k', True, 'qsgd')], ADAPTIVE):
    cell = _cell(_FULL, comp, agg, adaptive)
    error = validate(apply_cell(base_config('full'), cell))
    assert (error is None) == (agg == 'mean'), (cell, error)
    if error is not None:
      _assert_names_a_field(error)


def test_fast_cell_through_the_round(workspace):
  """The fast lane's representative: the MLP with clients vmapped, one round."""
  assert check_cell(_cell(_FULL), workspace) is not None


@pytest.mark.slow
@pytest.mark.parametrize('cell', [pytest.param(c, id=_cell_id(c))
                                  for c in _covering_cells()])
def test_grid_cell(cell, workspace):
  exp = check_cell(cell, workspace)
  if exp is not None and cell['route'][0] == 'slora':
    check_slora_second_stage(cell, exp, workspace)


def check_slora_second_stage(cell, exp, workspace):
  """SLoRA's LoRA stage, built the way `train.run` builds it."""
  c = exp.config
  state = exp.fed_round.init(exp.split.trainable, jax.random.key(0))
  state, _ = exp.fed_round.apply(state, exp.split.frozen, exp.round_data(0))
  p = c.peft
  deltas = jax.tree.map(lambda a, b: a - b, jax.device_get(state.params), exp.split.trainable)
  model = peft.merge(exp.split.graphdef, exp.split.trainable, exp.split.frozen)
  peft.slora.slora_stage2(model, deltas, p.rank, p.alpha,
                          target_modules=tuple(p.target_modules), dropout=p.dropout,
                          rngs=nnx.Rngs(c.seed + 2))
  stage2 = build(c, workspace, model=model, validate=False)
  data = stage2.round_data(1)
  check_round(stage2, data, neighbours(data, c.model.kind), two_rounds=False,
              label=_cell_id(cell) + ' stage 2')


@pytest.mark.slow
@pytest.mark.parametrize('cell', EXTRA_CELLS)
def test_extra_cell(cell, workspace):
  check_cell(cell, workspace)


@pytest.mark.slow
@pytest.mark.parametrize('mechanism', MECHANISMS)
def test_a_dropped_client_does_not_amplify_the_others(mechanism, workspace):
  """Both worlds hold a client whose own data overflows (its update is not finite);
  replacing another client's data must still move the mean by at most the bound."""
  cell = _cell(_FULL, mechanism=mechanism)
  exp = build(apply_cell(base_config('full'), cell), workspace)
  data = neighbours(exp.round_data(0), 'mlp', slot=2, other=0)['nonfinite']
  state = exp.fed_round.init(exp.split.trainable, jax.random.key(0))
  assert int(exp.fed_round.apply(state, exp.split.frozen, data)[1]['nonfinite_clients']) == 1
  variants = {k: v for k, v in neighbours(data, 'mlp', slot=0, other=1).items()
              if k != 'nonfinite'}
  check_round(exp, data, variants, two_rounds=False, label=_cell_id(cell) + ' dropped')


@pytest.mark.slow
def test_same_noise_draw_isolates_the_pre_noise_aggregate(workspace):
  """The hook of (a): with the same seed, the difference of two worlds' released params
  at z > 0 equals their difference in a noise-free build of the same cell."""
  cell = _cell(_FULL, ('stochastic_uniform', True, 'none'))
  diffs = []
  for z in (Z, 0.0):
    c = apply_cell(base_config('full'), cell)
    c.privacy.noise_multiplier = z
    exp = build(c, workspace)
    data = exp.round_data(0)
    state = exp.fed_round.init(exp.split.trainable, jax.random.key(3))
    compiled = compile_round(exp, state, data)
    a = compiled(state, exp.split.frozen, data)[0]
    b = compiled(state, exp.split.frozen, neighbours(data, 'mlp')['large'])[0]
    diffs.append(released(a) - released(b))
  assert np.linalg.norm(diffs[1]) > 0.5 * CLIP / CLIENTS
  np.testing.assert_allclose(diffs[0], diffs[1], atol=1e-6)


# Logged keys that are public (config, sampling, timing, accounting) or computed by
# the server from released params on its own held-out data.
_PUBLIC_KEYS = {'round', 'num_clients', 'uplink_bytes', 'downlink_bytes', 'cum_uplink_bytes',
                'round_time_s', 'compile_time_s', 'epsilon', 'eval', 'sparsity'}
# Logged keys taken from the round's metrics (by the same name).
_ROUND_KEYS = {'train_loss', 'examples', 'update_norm', 'param_norm', 'clip_norm',
               'nonfinite_clients', 'dp_rounding_fallbacks'}


@pytest.mark.slow
def test_logged_metrics_are_noised_or_public(tmp_path, workspace):
  """Every value `train.run` writes to metrics.jsonl under DP is public, or depends on
  the clients' data only through the noise (it changes with the seed)."""
  c = apply_cell(base_config('full'), _cell(_FULL, adaptive=True))
  c.num_rounds = 1
  train.run(copy.deepcopy(c), str(tmp_path))
  with open(os.path.join(tmp_path, 'metrics.jsonl')) as f:
    logged = set(json.loads(f.readline()))
  unknown = logged - _PUBLIC_KEYS - _ROUND_KEYS
  assert not unknown, f'classify these logged keys as public or noised: {unknown}'
  exp = build(c, workspace)
  data = exp.round_data(0)
  state = exp.fed_round.init(exp.split.trainable, jax.random.key(0))
  apply = exp.fed_round.apply
  base = apply(state, exp.split.frozen, data)[1]
  reseeded = apply(exp.fed_round.init(exp.split.trainable, jax.random.key(1)),
                   exp.split.frozen, data)[1]
  leaks = set()
  for data_v in neighbours(data, 'mlp').values():
    other = apply(state, exp.split.frozen, data_v)[1]
    for key in logged & _ROUND_KEYS & set(base):
      data_dependent = not np.array_equal(np.asarray(base[key]), np.asarray(other[key]))
      noised = not np.array_equal(np.asarray(base[key]), np.asarray(reseeded[key]))
      if data_dependent and not noised:
        leaks.add(key)
  _require(not leaks, f'logged under DP without noise: {sorted(leaks)}')
