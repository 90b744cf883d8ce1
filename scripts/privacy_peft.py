"""Privacy x PEFT: utility, membership inference and canary exposure per route, with and without DP.

For each PEFT route of the default task (all-MiniLM-L6-v2 classifying standard-library
docstrings by package, ``experiments/configs/default.py`` with the route's learning rate
from ``experiments/configs/peft_routes.py``, shortened by the size flags: ``--population``
of the default partition's clients take part) and each privacy setting (no DP; client-level
DP-FedAvg at one common ``--epsilon`` / ``--delta`` over the run's rounds), the script
trains the federated model and measures, on the final global model:

* utility: held-out accuracy (and once before training);
* membership inference on examples (loss threshold, Yeom et al. 2018): members are
  training rows some round actually trained on (read off the round batches),
  non-members held-out rows, drawn in equal numbers per label (so a label prior learnt
  from non-IID clients is not mistaken for membership); AUC with a bootstrap interval,
  and the advantage ``TPR - FPR`` with the threshold picked on half of the pairs and
  measured on the other half (Clopper-Pearson interval);
* canary exposure (Carlini et al. 2019): ``--canary_clients`` extra clients each hold
  ``--canaries_per_client`` canaries (random words with a random label) and are sampled
  like any client; after training each canary's label is ranked by loss among all
  labels, ``exposure = log2(#labels) - log2(rank)``, averaged over canaries (bootstrap
  interval). As many reference canaries, drawn alike but never trained on, give the
  same model's chance level. Client-level membership (the model trained with and
  without a client) would double the runs and is not measured.

Clip norm rule under DP (documented, not tuned on the test metric): the median of the
client update norms of the first round of the same route's run without DP (the
quantile-0.5 target of adaptive clipping, Andrew et al. 2021). The noise multiplier is
calibrated by the accountant for ``--epsilon`` over all rounds at the round's sampling rate.

``prompt`` tuning is not a route of the default task: the engine implements it for the
decoder only (``config.validate`` rejects it for ``model.kind="minilm"``), so asking for
it fails with that reason.

  python scripts/privacy_peft.py --out=/tmp/privacy_peft --png=docs/results/privacy_peft.png
  python scripts/privacy_peft.py --tiny --out=/tmp/privacy_peft_tiny

Writes ``--out/privacy_peft.json`` (every measurement) and ``--out/privacy_peft_table.md``;
the last line printed is ``{"bench": "privacy_peft", ...}``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import io
import json
import math
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from experiments.configs import peft_routes  # noqa: E402
from fedjax_fm import config as config_lib  # noqa: E402
from fedjax_fm import data as data_lib  # noqa: E402
from fedjax_fm import train  # noqa: E402
from fedjax_fm import tree_util  # noqa: E402
from fedjax_fm.privacy import membership  # noqa: E402
from fedjax_fm.train import task_data as task_data_lib  # noqa: E402

# Route names of this study -> the argument of experiments/configs/peft_routes.py.
ROUTES = {'full': 'full', 'lora': 'lora_fedit', 'bitfit': 'bitfit', 'adapters': 'adapter',
          'prompt': 'prompt'}
DEFAULT_ROUTES = ('full', 'lora', 'bitfit', 'adapters')


@dataclasses.dataclass(frozen=True)
class Sizes:
  """Every size of the shortened task (flags of the same names).

  ``num_clients`` is the default task's Dirichlet partition; ``population`` of
  its clients (a seeded subset, 0: all) take part, plus ``canary_clients``.
  """
  rounds: int = 16
  num_clients: int = 100
  population: int = 24
  clients_per_round: int = 12
  local_steps: int = 2
  batch_size: int = 8
  max_epochs: int = 2
  max_len: int = 32
  chunk_size: int = 6
  canary_clients: int = 4
  canaries_per_client: int = 8
  canary_words: int = 12
  bootstrap: int = 1000
  seed: int = 0
  pretrained_layers: int = 0   # 0: all of MiniLM's layers; N: its first N (smoke runs)


TINY = Sizes(rounds=2, num_clients=100, population=12, clients_per_round=4, local_steps=1,
             batch_size=4, max_epochs=1, max_len=16, chunk_size=2, canary_clients=1,
             canaries_per_client=4, canary_words=6, bootstrap=50, pretrained_layers=2)


# ------------------------------------------------------------------- config

def make_config(route: str, sizes: Sizes, *, dp: bool = False, epsilon: float = 8.0,
                delta: float = 1e-5, clip_norm: float = 1.0):
  """The default task's config for one route, shortened to ``sizes``."""
  if route not in ROUTES:
    raise ValueError(f'route {route!r} is unknown; allowed: {tuple(ROUTES)}')
  c = peft_routes.get_config(ROUTES[route])
  if c.model.kind != 'minilm':
    raise ValueError(
        f'route {route!r} is not available on the default task (all-MiniLM-L6-v2): the '
        f'engine implements it for model.kind={c.model.kind!r} only; allowed here: '
        f'{DEFAULT_ROUTES}')
  c.seed = sizes.seed
  c.model.pretrained_layers = sizes.pretrained_layers
  c.num_rounds = sizes.rounds
  c.progress, c.tensorboard = False, False
  c.checkpoint.every = 0
  c.data.max_len = sizes.max_len
  c.data.num_clients = sizes.num_clients
  c.fl.clients_per_round = sizes.clients_per_round
  c.fl.local_steps = sizes.local_steps
  c.fl.batch_size = sizes.batch_size
  c.fl.max_epochs = sizes.max_epochs
  c.fl.chunk_size = sizes.chunk_size
  c.eval.max_examples = 0
  c.eval.every = sizes.rounds
  if dp:
    c.privacy.enabled = True
    c.privacy.target_epsilon = epsilon
    c.privacy.delta = delta
    c.privacy.clip_norm = clip_norm
  config_lib.validate(c, num_devices=1)
  return c


# --------------------------------------------------------------- task data

@dataclasses.dataclass
class Task:
  """The task data (with canary clients) and what the measurements need."""
  data: train.TaskData
  num_train: int               # training examples of the real clients (rows 0..num_train-1)
  canaries: dict               # inserted canaries (input_ids, attention_mask, label)
  references: dict             # reference canaries, drawn alike, never trained on
  num_real_clients: int


def _canary_set(rng, words, tokenizer, count, num_words, num_labels, max_len):
  texts = [' '.join(rng.choice(words, num_words)) for _ in range(count)]
  enc = tokenizer.encode(texts, max_len)
  return {'input_ids': enc['input_ids'].astype(np.int32),
          'attention_mask': enc['attention_mask'].astype(np.int32),
          'label': rng.integers(0, num_labels, count).astype(np.int32)}


def build_task(config, sizes: Sizes, workdir: str) -> Task:
  """The default task's data: ``population`` of its clients plus canary clients.

  Every training row carries its index in ``row`` (rows ``num_train..`` are the
  canaries), so the rows a round trains on can be read off its batch.
  """
  for name in ('canary_clients', 'canaries_per_client', 'canary_words'):
    if getattr(sizes, name) < 1:
      raise ValueError(f'--{name}={getattr(sizes, name)} is invalid: must be >= 1')
  td = train.build_task_data(config, workdir)
  base = td.train
  if 0 < sizes.population < base.num_clients:
    keep = np.random.default_rng(sizes.seed + 3).choice(base.num_clients, sizes.population,
                                                        replace=False)
    base = base.subset(np.sort(keep))
  n = base.num_examples
  rng = np.random.default_rng(sizes.seed + 7)
  raw, _, _ = task_data_lib.load_raw(config)
  words = np.unique(np.concatenate([np.asarray(str(t).split()) for t in raw['text']]))
  words = words[np.char.isalpha(words.astype(str))]
  count = sizes.canary_clients * sizes.canaries_per_client
  canaries = _canary_set(rng, words, td.tokenizer, count, sizes.canary_words, td.num_labels,
                         config.data.max_len)
  references = _canary_set(rng, words, td.tokenizer, count, sizes.canary_words,
                           td.num_labels, config.data.max_len)
  arrays = {k: np.concatenate([v, canaries[k]]) for k, v in base.arrays.items()}
  arrays['row'] = np.arange(n + count, dtype=np.int32)
  sizes_c = np.full(sizes.canary_clients, sizes.canaries_per_client)
  offsets = np.concatenate([base.offsets, n + np.cumsum(sizes_c)])
  fed = data_lib.FederatedDataset(arrays, offsets)
  return Task(data=dataclasses.replace(td, train=fed), num_train=n, canaries=canaries,
              references=references, num_real_clients=base.num_clients)


def draw_members(task: Task, seen: np.ndarray, seed: int):
  """Members (trained-on rows) and non-members (held-out rows), equal counts per label.

  Matching the label histograms keeps a label prior learnt from the participating
  clients' (non-IID) data from passing for membership: per label, ``min(#members,
  #held out)`` rows are drawn from each side.
  """
  train_arrays = task.data.train.arrays
  members = np.flatnonzero(seen[:task.num_train])
  m_label, n_label = train_arrays['label'][members], task.data.eval['label']
  rng = np.random.default_rng(seed + 11)
  m_rows, n_rows = [], []
  for label in np.unique(n_label):
    m_l, n_l = members[m_label == label], np.flatnonzero(n_label == label)
    k = min(len(m_l), len(n_l))
    m_rows.append(rng.choice(m_l, k, replace=False))
    n_rows.append(rng.choice(n_l, k, replace=False))
  m_rows, n_rows = np.sort(np.concatenate(m_rows)), np.sort(np.concatenate(n_rows))
  if len(m_rows) < 2:
    raise ValueError(f'membership inference needs at least 2 members and 2 held-out '
                     f'examples of common labels; got {len(m_rows)} of {len(members)} '
                     f'trained-on rows and {len(n_label)} held out')
  keys = ('input_ids', 'attention_mask', 'label')
  return ({key: train_arrays[key][m_rows] for key in keys},
          {key: task.data.eval[key][n_rows] for key in keys})


# ------------------------------------------------------------------ losses

@functools.partial(jax.jit, static_argnums=0)
def _label_losses(graphdef, trainable, frozen, input_ids, attention_mask):
  logits = nnx.merge(graphdef, trainable, frozen)(input_ids, attention_mask)
  return jax.nn.logsumexp(logits, axis=-1, keepdims=True) - logits


def make_label_losses(exp, batch_size: int = 64):
  """``label_losses(trainable, frozen, arrays) -> [n, num_labels]``.

  The cross-entropy of every example under every label, ``logsumexp(z) - z_k``,
  from one deterministic forward pass of the classifier (its per-example loss is
  the column of the example's own label). Compiled once per model structure.
  """
  graphdef = exp.split.graphdef

  def label_losses(trainable, frozen, arrays):
    ids, mask = arrays['input_ids'], arrays['attention_mask']
    out = []
    for i in range(0, len(ids), batch_size):
      b_ids, b_mask = ids[i:i + batch_size], mask[i:i + batch_size]
      pad = batch_size - len(b_ids)
      if pad:   # one compiled shape
        b_ids = np.concatenate([b_ids, np.zeros((pad,) + b_ids.shape[1:], b_ids.dtype)])
        b_mask = np.concatenate([b_mask, np.zeros((pad,) + b_mask.shape[1:], b_mask.dtype)])
      out.append(np.asarray(_label_losses(graphdef, trainable, frozen, b_ids, b_mask))
                 [:batch_size - pad])
    return np.concatenate(out).astype(np.float64)

  return label_losses


def own_loss(label_loss, labels) -> np.ndarray:
  """Each example's loss under its own label."""
  return label_loss[np.arange(len(labels)), labels]


def accuracy(label_loss, labels) -> float:
  """Share of examples whose own label has the lowest loss (the argmax logit)."""
  return float(np.mean(np.argmin(label_loss, axis=1) == labels))


# ------------------------------------------------------------ measurements

def mi_metrics(member_loss, nonmember_loss, *, bootstrap: int, seed: int) -> dict:
  """Loss-threshold attack: scores are ``-loss``."""
  sm, sn = -np.asarray(member_loss), -np.asarray(nonmember_loss)
  auc = membership.roc_auc(sm, sn)
  lo, hi = membership.bootstrap_interval(membership.roc_auc, sm, sn,
                                         num_resamples=bootstrap, seed=seed)
  adv = membership.holdout_advantage(sm, sn, seed=seed)
  return {'mi_auc': auc, 'mi_auc_lo': lo, 'mi_auc_hi': hi,
          'mi_advantage': adv.advantage, 'mi_advantage_lo': adv.lower,
          'mi_advantage_hi': adv.upper,
          'mi_best_advantage_in_sample': membership.best_advantage(sm, sn)[0],
          'mi_pairs': int(len(sm)),
          'member_loss_mean': float(np.mean(member_loss)),
          'nonmember_loss_mean': float(np.mean(nonmember_loss))}


def exposure_metrics(label_loss, labels, *, bootstrap: int, seed: int,
                     prefix: str = 'canary') -> dict:
  """Mean exposure of canaries whose secret is their label, with a bootstrap interval."""
  num_labels = label_loss.shape[1]
  e = membership.exposure(membership.loss_ranks(label_loss, labels), num_labels)
  rng = np.random.default_rng(seed)
  means = [float(np.mean(e[rng.integers(0, len(e), len(e))])) for _ in range(bootstrap)]
  lo, hi = np.quantile(means, [0.025, 0.975])
  return {f'{prefix}_exposure': float(np.mean(e)), f'{prefix}_exposure_lo': float(lo),
          f'{prefix}_exposure_hi': float(hi),
          f'{prefix}_top1': float(np.mean(e == math.log2(num_labels)))}


# ---------------------------------------------------------------- one run

def train_and_measure(config, task: Task, sizes: Sizes, workdir: str, *,
                      measure_before: bool = False) -> dict:
  """Trains one configuration and measures utility, membership and exposure."""
  t0 = time.time()
  with contextlib.redirect_stdout(io.StringIO()):
    exp = train.build_experiment(config, workdir, task_data=task.data)
  fed, split = exp.fed_round, exp.split
  losses_of = make_label_losses(exp)
  held = task.data.eval
  out = {'trainable_params': tree_util.tree_size(split.trainable)}
  state = fed.init(split.trainable, jax.random.key(config.seed))
  seen = np.zeros(task.data.train.num_examples, bool)
  first_norms, canary_rounds, round_s = None, 0, []
  for r in range(config.num_rounds):
    t_round = time.time()
    data = exp.round_data(r)
    batch = dict(data['batch'])
    seen[batch.pop('row')[data['example_mask']]] = True
    canary_rounds += int(np.sum((data['client_id'] >= task.num_real_clients)
                                & data['client_mask']))
    state, m = fed.apply(state, split.frozen, {**data, 'batch': batch})
    if r == 0:
      m = jax.device_get(m)
      first_norms = np.asarray(m['client_update_norm'])[np.asarray(m['client_mask'])]
    if exp.accountant is not None:
      out['epsilon'] = float(exp.accountant.step())
    jax.block_until_ready(state.params)
    round_s.append(time.time() - t_round)
  out['first_round_s'] = round_s[0]
  out['round_s'] = float(np.median(round_s[1:])) if len(round_s) > 1 else round_s[0]
  out['train_s'] = time.time() - t0
  out['first_round_median_update_norm'] = float(np.median(first_norms))
  out['canary_participations'] = canary_rounds
  out['trained_rows'] = int(seen[:task.num_train].sum())
  if exp.accountant is not None:
    out['noise_multiplier'] = float(exp.accountant.noise_multiplier)
    out['clip_norm'] = float(config.privacy.clip_norm)
    out['delta'] = float(config.privacy.delta)
    # norm of the noise on the aggregate over the clip norm (the largest mean update)
    out['noise_to_clip'] = (out['noise_multiplier'] * math.sqrt(out['trainable_params'])
                            / config.fl.clients_per_round)
  members, nonmembers = draw_members(task, seen, sizes.seed)
  frozen = fed.frozen_view(state, split.frozen)
  models_to_measure = [('', state.params, frozen)]
  if measure_before:
    models_to_measure.append(('before_', split.trainable, split.frozen))
    out['before_evaluator'] = exp.evaluate(split.trainable)   # the run's own evaluator
  for prefix, trainable, frozen_part in models_to_measure:
    res = {}
    held_loss = losses_of(trainable, frozen_part, held)
    res['accuracy'] = accuracy(held_loss, held['label'])
    res['loss'] = float(np.mean(own_loss(held_loss, held['label'])))
    # membership inference on examples
    res.update(mi_metrics(own_loss(losses_of(trainable, frozen_part, members),
                                   members['label']),
                          own_loss(losses_of(trainable, frozen_part, nonmembers),
                                   nonmembers['label']),
                          bootstrap=sizes.bootstrap, seed=sizes.seed))
    # canary exposure: inserted canaries and never-seen references
    for name, canary in (('canary', task.canaries), ('reference', task.references)):
      res.update(exposure_metrics(losses_of(trainable, frozen_part, canary), canary['label'],
                                  bootstrap=sizes.bootstrap, seed=sizes.seed, prefix=name))
    if prefix:
      out['before'] = res
    else:
      out.update(res)
  out['chance_exposure'] = membership.chance_exposure(task.data.num_labels)
  out['total_s'] = time.time() - t0
  return out


def run_grid(routes, sizes: Sizes, out_dir: str, *, epsilon: float = 8.0,
             delta: float = 1e-5, dp_settings=('none', 'dp'), log=print) -> list[dict]:
  """Every route with and without DP; the DP clip norm follows the documented rule."""
  for route in routes:   # fail before any training on an unavailable route
    make_config(route, sizes)
  os.makedirs(out_dir, exist_ok=True)
  task = build_task(make_config(routes[0], sizes), sizes, out_dir)
  rows = []
  before_done = False
  for route in routes:
    clip = None
    for setting in dp_settings:
      dp = setting == 'dp'
      if dp and clip is None:   # DP without its no-DP run: probe one round for the rule
        probe = train_and_measure(make_config(route, dataclasses.replace(sizes, rounds=1)),
                                  task, sizes, os.path.join(out_dir, f'{route}_probe'))
        clip = probe['first_round_median_update_norm']
      config = make_config(route, sizes, dp=dp, epsilon=epsilon, delta=delta,
                           clip_norm=clip or 1.0)
      res = train_and_measure(config, task, sizes, os.path.join(out_dir, f'{route}_{setting}'),
                              measure_before=not before_done)
      before_done = True
      if not dp:
        clip = res['first_round_median_update_norm']
      res.update(route=route, dp=dp)
      rows.append(res)
      log(f'{route:>9} dp={"yes" if dp else "no ":3} acc={res["accuracy"]:.4f} '
          f'auc={res["mi_auc"]:.3f} [{res["mi_auc_lo"]:.3f}, {res["mi_auc_hi"]:.3f}] '
          f'adv={res["mi_advantage"]:+.3f} exposure={res["canary_exposure"]:.2f} '
          f'(ref {res["reference_exposure"]:.2f})'
          + (f' eps={res["epsilon"]:.2f} z={res["noise_multiplier"]:.3f} '
             f'C={res["clip_norm"]:.3g}' if dp else '')
          + f' round {res["round_s"]:.1f}s (first {res["first_round_s"]:.0f}s), '
          f'total {res["total_s"]:.0f}s')
  return rows


# ---------------------------------------------------------------- reports

def table(rows) -> str:
  lines = ['| route | trainable params | DP | epsilon (delta) | z / C / noise÷C | accuracy '
           '| MI AUC [95%] | MI advantage [95%] | canary exposure [95%] | reference '
           'exposure |', '|---|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    eps = f'{r["epsilon"]:.2f} ({r["delta"]:g})' if r['dp'] else 'inf'
    zc = (f'{r["noise_multiplier"]:.2f} / {r["clip_norm"]:.3g} / {r["noise_to_clip"]:.3g}'
          if r['dp'] else '-')
    lines.append(
        f'| {r["route"]} | {r["trainable_params"]:,} | {"yes" if r["dp"] else "no"} | {eps} '
        f'| {zc} | {r["accuracy"]:.3f} | {r["mi_auc"]:.3f} [{r["mi_auc_lo"]:.3f}, '
        f'{r["mi_auc_hi"]:.3f}] | {r["mi_advantage"]:+.3f} [{r["mi_advantage_lo"]:+.3f}, '
        f'{r["mi_advantage_hi"]:+.3f}] | {r["canary_exposure"]:.2f} '
        f'[{r["canary_exposure_lo"]:.2f}, {r["canary_exposure_hi"]:.2f}] '
        f'| {r["reference_exposure"]:.2f} |')
  return '\n'.join(lines)


def plot(rows, path: str) -> None:
  """Accuracy, MI AUC and canary exposure per route, without and with DP."""
  try:  # optional, as in scripts/plot_*.py
    import matplotlib  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('the plot of scripts/privacy_peft.py needs matplotlib: '
                      'pip install "fedjax_fm[plot]"') from e
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  routes = list(dict.fromkeys(r['route'] for r in rows))
  panels = (('accuracy', None, 'held-out accuracy'),
            ('mi_auc', 0.5, 'membership inference AUC'),
            ('canary_exposure', rows[0]['chance_exposure'], 'canary exposure (bits)'))
  fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
  x = np.arange(len(routes))
  for ax, (key, chance, title) in zip(axes, panels):
    for j, (dp, label) in enumerate(((False, 'no DP'), (True, 'DP'))):
      sel = {r['route']: r for r in rows if r['dp'] == dp}
      if not sel:
        continue
      vals = np.array([sel[k][key] if k in sel else np.nan for k in routes])
      err = None
      if f'{key}_lo' in rows[0]:
        lo = np.array([sel[k][f'{key}_lo'] if k in sel else np.nan for k in routes])
        hi = np.array([sel[k][f'{key}_hi'] if k in sel else np.nan for k in routes])
        err = np.stack([vals - lo, hi - vals])
      ax.bar(x + (j - 0.5) * 0.38, vals, 0.38, yerr=err, capsize=3, label=label)
    if chance is not None:
      ax.axhline(chance, color='grey', ls='--', lw=1, label='chance')
    ax.set_xticks(x, routes)
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis='y', alpha=0.3)
  axes[0].legend(fontsize=8)
  eps = next((r['epsilon'] for r in rows if r['dp']), None)
  fig.suptitle('Federated all-MiniLM-L6-v2 on stdlib docstrings: privacy x PEFT'
               + (f' (DP: epsilon {eps:.1f})' if eps is not None else ''), fontsize=11)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--out', default='/tmp/fedjax_fm_privacy_peft')
  p.add_argument('--routes', nargs='+', default=list(DEFAULT_ROUTES), choices=list(ROUTES))
  p.add_argument('--dp', nargs='+', default=['none', 'dp'], choices=['none', 'dp'])
  p.add_argument('--epsilon', type=float, default=8.0)
  p.add_argument('--delta', type=float, default=1e-5)
  p.add_argument('--tiny', action='store_true', help='the tiny sizes (seconds per run)')
  p.add_argument('--png', default='', help='also draw the figure here (needs matplotlib)')
  base = TINY if '--tiny' in sys.argv else Sizes()
  for f in dataclasses.fields(Sizes):
    p.add_argument(f'--{f.name}', type=int, default=getattr(base, f.name))
  args = p.parse_args()
  sizes = Sizes(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Sizes)})
  t0 = time.time()
  rows = run_grid(args.routes, sizes, args.out, epsilon=args.epsilon, delta=args.delta,
                  dp_settings=tuple(args.dp), log=lambda s: print(s, flush=True))
  md = table(rows)
  before = next(r for r in rows if 'before' in r)
  machine = f'{platform.machine()}, {os.cpu_count()} CPU cores, jax {jax.__version__} ' \
            f'({jax.default_backend()})'
  with open(os.path.join(args.out, 'privacy_peft_table.md'), 'w') as fh:
    fh.write(f'{md}\n\nBefore training: accuracy {before["before"]["accuracy"]:.3f}, MI AUC '
             f'{before["before"]["mi_auc"]:.3f}, canary exposure '
             f'{before["before"]["canary_exposure"]:.2f}. Sizes: {dataclasses.asdict(sizes)}. '
             f'Machine: {machine}. Total {time.time() - t0:.0f}s.\n')
  with open(os.path.join(args.out, 'privacy_peft.json'), 'w') as fh:
    json.dump({'sizes': dataclasses.asdict(sizes), 'epsilon': args.epsilon,
               'delta': args.delta, 'machine': machine, 'rows': rows,
               'total_s': time.time() - t0}, fh, indent=1)
  if args.png:
    plot(rows, args.png)
  print(md)
  result = {'bench': 'privacy_peft', 'before_accuracy': round(before['before']['accuracy'], 4),
            'before_mi_auc': round(before['before']['mi_auc'], 4),
            'total_s': round(time.time() - t0, 1)}
  for r in rows:
    k = f'{r["route"]}_{"dp" if r["dp"] else "nodp"}'
    result.update({f'{k}_accuracy': round(r['accuracy'], 4),
                   f'{k}_mi_auc': round(r['mi_auc'], 4),
                   f'{k}_mi_advantage': round(r['mi_advantage'], 4),
                   f'{k}_canary_exposure': round(r['canary_exposure'], 3),
                   f'{k}_trainable_params': r['trainable_params']})
    if r['dp']:
      result[f'{k}_epsilon'] = round(r['epsilon'], 3)
  print(json.dumps(result))


if __name__ == '__main__':
  main()
