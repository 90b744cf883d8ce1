"""Evaluation in a run: held-out metrics, per-client distributions, generation, predictions.

Besides the held-out metrics (`make_evaluator`) and the per-client ones on
local test data (`evaluate_clients`), a run saves what its model answered:

* `record_predictions(exp, trainable, frozen, workdir, round_idx)` appends one
  line per held-out example to ``workdir/predictions.jsonl``: ``{'round',
  'client', 'group' (with data.eval_group_key), 'input', 'reference',
  'prediction'}``; generated responses for instruction data, predicted labels
  (by name) for classification. It returns the metrics of those predictions
  overall, per client (the distribution over clients: mean, p10, worst, ...)
  and per group. The run calls it at every evaluation of a generative run and
  at the final evaluation of a classification run.
* `generation_before_after` scores the untrained and the trained model's
  responses and keeps ``workdir/generations.jsonl``.

Generation metrics: ROUGE-L, exact match (normalised as ``eval.em_normalize``
says; the summary names it), token F1, character and token error rates.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedjax_fm import config as config_lib
from fedjax_fm import data as data_lib
from fedjax_fm import engine
from fedjax_fm import evaluation
from fedjax_fm import models
from fedjax_fm import peft
from fedjax_fm import sharding
from fedjax_fm.train import logs


def make_evaluator(split: peft.Split, task: models.Task, eval_arrays, batch_size: int,
                   max_examples: int = 0):
  """``evaluate(trainable) -> {metric: value}`` over the held-out split."""
  eval_fn = models.make_eval_fn(split.graphdef, task)
  n = len(next(iter(eval_arrays.values())))
  if max_examples:
    n = min(n, max_examples)
  batch_size = min(batch_size, n)
  num_batches = -(-n // batch_size)
  padded = num_batches * batch_size
  stacked = {k: np.concatenate([v[:n], np.zeros((padded - n,) + v.shape[1:], v.dtype)])
             .reshape((num_batches, batch_size) + v.shape[1:]) for k, v in eval_arrays.items()}
  mask = (np.arange(padded) < n).reshape(num_batches, batch_size).astype(np.float32)

  @jax.jit
  def run_eval(trainable, frozen, stacked, mask):
    def body(sums, xs):
      batch, m = xs
      out = eval_fn(trainable, frozen, batch)
      return jax.tree.map(lambda s, v: s + jnp.sum(v * m), sums, out), None
    zeros = jax.tree.map(lambda s: jnp.zeros((), jnp.float32),
                         jax.eval_shape(eval_fn, trainable, frozen,
                                        jax.tree.map(lambda v: v[0], stacked)))
    sums, _ = jax.lax.scan(body, zeros, (stacked, mask))
    return sums

  def evaluate(trainable, frozen=None):
    frozen = split.frozen if frozen is None else frozen
    sums = jax.device_get(run_eval(trainable, frozen, stacked, mask))
    out = {}
    if 'num_tokens' in sums:   # causal LM: token-weighted loss and perplexity
      tokens = max(float(sums['num_tokens']), 1.0)
      out['loss'] = float(sums['nll_sum']) / tokens
      out['perplexity'] = float(np.exp(min(out['loss'], 50.0)))
      out['token_accuracy'] = float(sums['correct_tokens']) / tokens
    else:
      out['loss'] = float(sums['loss']) / n
      out['accuracy'] = float(sums['correct']) / n
    return out

  return evaluate



def evaluate_clients(exp, trainable, frozen=None):
  """Per-client evaluation on local test data, and the personalisation baseline."""
  cfg = exp.config
  frozen = exp.split.frozen if frozen is None else frozen
  eval_fn = models.make_eval_fn(exp.split.graphdef, exp.task)
  per_client = evaluation.per_client_eval(eval_fn, trainable, frozen, exp.data.client_test,
                                          batch_size=cfg.fl.batch_size)
  federated = {'per_client': {k: np.asarray(v).tolist() for k, v in per_client.items()},
               'distribution': evaluation.summarize(per_client)}
  personal = None
  if cfg.eval.personalize_steps:
    co = cfg.client_optimizer
    out = evaluation.personalize(
        models.make_loss_fn(exp.split.graphdef, exp.task), eval_fn, trainable, frozen,
        exp.data.train, exp.data.client_test, steps=cfg.eval.personalize_steps,
        batch_size=cfg.fl.batch_size,
        optimizer=engine.client_optimizer(co.name, co.learning_rate, momentum=co.momentum),
        seed=cfg.seed)
    personal = {'after_distribution': out['after_distribution'],
                'after': {k: np.asarray(v).tolist() for k, v in out['after'].items()}}
  return federated, personal


PREDICTIONS_FILE = 'predictions.jsonl'
GENERATIONS_FILE = 'generations.jsonl'
# Per-client generation metrics and their direction (False: lower is better).
GENERATION_CLIENT_METRICS = {'rouge_l': True, 'exact_match': True, 'token_f1': True,
                             'cer': False, 'ter': False}


def em_normalize(config) -> str:
  """``config.eval.em_normalize`` (``'squad'`` for configs from before the field)."""
  return str(config.eval.get('em_normalize', 'squad'))


def _str_or_none(values, n: int) -> list:
  if values is None:
    return [None] * n
  return [None if v is None else str(v) for v in list(values)[:n]]


def _eval_field(exp, name: str, n: int) -> list | None:
  """Per-held-out-example values the task data carries (``eval_clients``, ...), or None."""
  values = getattr(exp.data, name, None)
  if values is None:
    return None
  values = list(values)
  if len(values) < n:
    raise ValueError(f'TaskData.{name} has {len(values)} values for {n} held-out examples')
  return [str(v) for v in values[:n]]


def _generate(exp, trainable, frozen=None) -> dict:
  """Greedy responses to the leading ``data.generate_examples`` held-out instructions.

  Returns:
    ``{'prompts', 'references', 'predictions', 'clients', 'groups'}``: lists of
    one entry per example (``groups`` None without group values).
  """
  d = exp.config.data
  held = {k: v[:d.generate_examples] for k, v in exp.data.instructions.items()}
  tok = exp.data.tokenizer
  # A pretrained decoder has room for data.max_len prompt tokens and the generated
  # ones (registries.load_pretrained_decoder); a decoder built for the data, for
  # data.max_len tokens in all.
  room = d.max_len if exp.config.model.kind == 'gguf' else d.max_len - d.generate_max_tokens
  if room < 2:
    raise config_lib.ConfigError(
        f'config.data.generate_max_tokens={d.generate_max_tokens} leaves no room for the '
        f'prompt within config.data.max_len={d.max_len}')
  template = exp.data.prompt_template or d.instruction_template
  enc = data_lib.instructions.tokenize_prompts(held, tok, room, template=template)
  frozen = exp.split.frozen if frozen is None else frozen
  eos = exp.data.eos_id
  if eos is None:
    eos = getattr(getattr(tok, 'processor', None), 'eos_id', lambda: None)()
  out = models.generate((exp.split.graphdef, trainable, frozen), enc['input_ids'],
                        d.generate_max_tokens, prompt_mask=enc['attention_mask'],
                        eos_id=eos if eos is not None and eos >= 0 else None)
  ids, lengths = np.asarray(out.ids), np.asarray(out.lengths)
  preds = [tok.decode([int(t) for t in row[:n]]).strip() for row, n in zip(ids, lengths)]
  n = len(preds)
  groups = held.get('group')
  if groups is None:
    groups = _eval_field(exp, 'eval_groups', n)
  return {'prompts': data_lib.format_prompts(held, template),
          'references': [str(r) for r in held['output']],
          'predictions': preds,
          'clients': [str(c) for c in held.get('category', [''] * n)],
          'groups': None if groups is None else [str(g) for g in list(groups)[:n]]}


def generate_responses(exp, trainable, frozen=None) -> tuple[list[dict], dict]:
  """Greedy responses to the leading ``data.generate_examples`` held-out instructions.

  Returns:
    ``(records, metrics)``: one ``{'prompt', 'reference', 'prediction',
    'category'}`` record per example (the prompt as rendered by the template),
    and the ROUGE-L, exact match, token F1, CER and TER of the predictions.
  """
  gen = _generate(exp, trainable, frozen)
  m = evaluation.generative_metrics(gen['predictions'], gen['references'],
                                    em_normalize=em_normalize(exp.config))
  records = [{'prompt': p, 'reference': r, 'prediction': x, 'category': c}
             for p, r, x, c in zip(gen['prompts'], gen['references'], gen['predictions'],
                                   gen['clients'])]
  return records, {k: float(v) for k, v in m.items() if k != 'num_examples'}


def evaluate_generation(exp, trainable, frozen=None) -> dict:
  """Greedy responses to held-out instructions: ROUGE-L, EM, token F1, CER and TER."""
  return generate_responses(exp, trainable, frozen)[1]


# ------------------------------------------------------------ breakdowns


def breakdown_generation(scores: dict, keys: list | None) -> dict[str, dict]:
  """Generation metrics of each distinct key (client or group) of the examples.

  Args:
    scores: per-example scores (`evaluation.generative_scores`).
    keys: the key of each example, or None.

  Returns:
    ``{key: {'rouge_l', 'exact_match', 'token_f1', 'cer', 'ter',
    'num_examples'}}`` in sorted key order (empty without keys).
  """
  if keys is None:
    return {}
  keys = np.asarray(keys).astype(str)
  return {str(k): evaluation.aggregate_generative(scores, keys == k)
          for k in np.unique(keys)}


def client_distribution(per_key: dict[str, dict], directions: dict[str, bool]) -> dict:
  """The distribution over clients (`evaluation.distribution`) of each metric.

  Args:
    per_key: ``{client: {metric: value, 'num_examples': n}}``.
    directions: ``{metric: higher is better}`` of the metrics to summarise.

  Returns:
    ``{metric: {'mean', 'weighted_mean', 'p10', 'median', 'p90', 'worst',
    'best', 'std', 'num_clients'}}`` (weights: the clients' examples).
  """
  if not per_key:
    return {}
  weights = np.asarray([m['num_examples'] for m in per_key.values()], np.float64)
  return {name: evaluation.distribution(
      np.asarray([m[name] for m in per_key.values()], np.float64), weights,
      higher_is_better=better) for name, better in directions.items()}


def _log_distribution(what: str, dist: dict, names) -> None:
  for name in names:
    if name in dist and dist[name]['num_clients'] > 1:
      logs.log(f'{what} {name}: ' + logs.fmt_metrics(
          {k: v for k, v in dist[name].items() if k in ('mean', 'p10', 'worst')}))


# ----------------------------------------------------------- predictions


def write_predictions(workdir: str, records: list[dict]) -> None:
  """Appends records to ``workdir/predictions.jsonl`` (process 0 only)."""
  if not records or not sharding.is_main_process():
    return
  with open(os.path.join(workdir, PREDICTIONS_FILE), 'a', encoding='utf-8') as fh:
    for record in records:
      fh.write(json.dumps(record, ensure_ascii=False) + '\n')


def _records(round_idx: int, clients, groups, inputs, refs, preds, **extra) -> list[dict]:
  out = []
  for i, (ref, pred) in enumerate(zip(refs, preds)):
    record = {'round': int(round_idx), 'client': clients[i]}
    if groups is not None:
      record['group'] = groups[i]
    record.update(input=inputs[i], reference=ref, prediction=pred)
    for k, v in extra.items():
      record[k] = v[i]
    out.append(record)
  return out


def record_generation(exp, trainable, frozen, workdir: str, round_idx: int) -> dict:
  """Generates for the held-out instructions, saves the predictions, scores them.

  Appends one ``{'round', 'client', 'group'?, 'input', 'reference',
  'prediction'}`` line per example to ``workdir/predictions.jsonl`` (``input``:
  the rendered prompt; ``client``: the example's client field value).

  Returns:
    ``{'generation': metrics, 'em_normalize': name, 'generation_clients':
    {metric: distribution over clients}, 'generation_groups': {group:
    metrics}}`` (the last two only when clients, resp. groups, are known).
  """
  gen = _generate(exp, trainable, frozen)
  em = em_normalize(exp.config)
  scores = evaluation.generative_scores(gen['predictions'], gen['references'],
                                        em_normalize=em)
  write_predictions(workdir, _records(round_idx, gen['clients'], gen['groups'],
                                      gen['prompts'], gen['references'],
                                      gen['predictions']))
  overall = evaluation.aggregate_generative(scores)
  out = {'generation': {k: float(v) for k, v in overall.items() if k != 'num_examples'},
         'em_normalize': em}
  per_client = breakdown_generation(scores, gen['clients'])
  if per_client:
    out['generation_clients'] = client_distribution(per_client, GENERATION_CLIENT_METRICS)
  if gen['groups'] is not None:
    out['generation_groups'] = breakdown_generation(scores, gen['groups'])
  return out


def predict_labels(exp, trainable, frozen=None, arrays=None, batch_size: int | None = None,
                   max_examples: int = 0) -> np.ndarray:
  """Predicted class (argmax of the logits) of every held-out example.

  Args:
    exp: the experiment (a classification task: features ``x`` for the MLP,
      ``input_ids`` / ``attention_mask`` for the encoder).
    trainable: trainable params.
    frozen: frozen params (default the experiment's).
    arrays: the examples (default the held-out ``exp.data.eval``).
    batch_size: examples per batch (default ``eval.batch_size``).
    max_examples: only the leading N examples (0: all).

  Returns:
    int64 ``[N]`` predicted labels.
  """
  arrays = exp.data.eval if arrays is None else arrays
  frozen = exp.split.frozen if frozen is None else frozen
  graphdef = exp.split.graphdef
  n = len(next(iter(arrays.values())))
  if max_examples:
    n = min(n, max_examples)
  if n == 0:
    return np.zeros((0,), np.int64)
  batch_size = min(batch_size or exp.config.eval.batch_size, n)
  num_batches = -(-n // batch_size)
  padded = num_batches * batch_size
  keys = ('x',) if 'x' in arrays else ('input_ids', 'attention_mask')
  stacked = {k: np.concatenate([arrays[k][:n], np.zeros((padded - n,) + arrays[k].shape[1:],
                                                        arrays[k].dtype)])
             .reshape((num_batches, batch_size) + arrays[k].shape[1:]) for k in keys}

  @jax.jit
  def run(trainable, frozen, stacked):
    model = nnx.merge(graphdef, trainable, frozen)

    def body(carry, batch):
      if 'x' in batch:
        logits = model(batch['x'])
      else:   # as models.classification_task calls the encoder
        logits = model(batch['input_ids'], batch['attention_mask'], None)
      return carry, jnp.argmax(logits, -1)

    return jax.lax.scan(body, None, stacked)[1]

  preds = np.asarray(jax.device_get(run(trainable, frozen, stacked)))
  return preds.reshape(-1)[:n].astype(np.int64)


def _label_name(names, i: int):
  return names[i] if 0 <= i < len(names) else str(i)


def record_classification(exp, trainable, frozen, workdir: str, round_idx: int) -> dict:
  """Predicts the held-out labels, saves the predictions, breaks the accuracy down.

  The examples are those the held-out metrics score (the leading
  ``eval.max_examples``). Appends one ``{'round', 'client', 'group'?, 'input',
  'reference', 'prediction', 'reference_id', 'prediction_id'}`` line per
  example to ``workdir/predictions.jsonl``: labels by name (the task's
  ``label_names``) and by index; ``client`` and ``input`` are None where the
  task data does not carry them (``TaskData.eval_clients``, ``eval_inputs``).

  Returns:
    ``{'heldout_clients': {'accuracy': distribution over clients},
    'heldout_groups': {group: {'accuracy', 'num_examples'}}}``, each only when
    the held-out examples' clients, resp. groups, are known.
  """
  cfg = exp.config
  labels = np.asarray(exp.data.eval['label']).astype(np.int64)
  n = min(len(labels), cfg.eval.max_examples) if cfg.eval.max_examples else len(labels)
  labels = labels[:n]
  preds = predict_labels(exp, trainable, frozen, max_examples=n)
  names = tuple(exp.data.label_names or ())
  clients = _eval_field(exp, 'eval_clients', n)
  groups = _eval_field(exp, 'eval_groups', n)
  inputs = _str_or_none(getattr(exp.data, 'eval_inputs', None), n)
  write_predictions(workdir, _records(
      round_idx, clients or [None] * n, groups, inputs,
      [_label_name(names, int(i)) for i in labels], [_label_name(names, int(i)) for i in preds],
      reference_id=[int(i) for i in labels], prediction_id=[int(i) for i in preds]))
  correct = (preds == labels).astype(np.float64)
  out = {}

  def per_key(keys):
    keys = np.asarray(keys)
    return {str(k): {'accuracy': float(correct[keys == k].mean()),
                     'num_examples': int((keys == k).sum())} for k in np.unique(keys)}

  if clients is not None:
    out['heldout_clients'] = client_distribution(per_key(clients), {'accuracy': True})
    _log_distribution('held-out per-client', out['heldout_clients'], ('accuracy',))
  if groups is not None:
    out['heldout_groups'] = per_key(groups)
    logs.log('held-out accuracy per group: ' + ' '.join(
        f'{g}={m["accuracy"]:.4f}' for g, m in out['heldout_groups'].items()))
  return out


def record_predictions(exp, trainable, frozen, workdir: str, round_idx: int) -> dict | None:
  """`record_generation` (instruction data) or `record_classification`; None otherwise.

  ``round_idx`` is the round of the evaluation (0: before training).
  """
  if exp.data.instructions is not None and exp.config.data.generate_examples:
    return record_generation(exp, trainable, frozen, workdir, round_idx)
  if exp.config.data.task == 'classification' and 'label' in exp.data.eval:
    return record_classification(exp, trainable, frozen, workdir, round_idx)
  return None


def generation_before_after(exp, trainable, frozen, workdir: str) -> dict:
  """Generation quality of the pretrained model (before) and the trained one (after).

  "Before" generates with the untrained trainable part and the original frozen
  base (``exp.split``; for SLoRA, the start of its LoRA stage), "after" with
  ``trainable`` and ``frozen``. Writes one JSON line per held-out example and
  model into ``workdir/generations.jsonl``: ``{'model': 'before' | 'after',
  'prompt', 'reference', 'prediction', 'category'}`` (process 0 only).

  Returns:
    ``{'generation': after metrics, 'generation_before': before metrics,
    'em_normalize': the exact match normalisation}``, plus the after model's
    ``'generation_clients'`` (the distribution over clients of each metric)
    and ``'generation_groups'`` when known.
  """
  em = em_normalize(exp.config)
  results = {}
  for name, tr, fr in (('before', exp.split.trainable, exp.split.frozen),
                       ('after', trainable, frozen)):
    gen = _generate(exp, tr, fr)
    scores = evaluation.generative_scores(gen['predictions'], gen['references'],
                                          em_normalize=em)
    metrics = evaluation.aggregate_generative(scores)
    records = [{'prompt': p, 'reference': r, 'prediction': x, 'category': c}
               for p, r, x, c in zip(gen['prompts'], gen['references'], gen['predictions'],
                                     gen['clients'])]
    results[name] = (gen, scores, records,
                     {k: float(v) for k, v in metrics.items() if k != 'num_examples'})
  if sharding.is_main_process():
    with open(os.path.join(workdir, GENERATIONS_FILE), 'w', encoding='utf-8') as fh:
      for name in ('before', 'after'):
        for record in results[name][2]:
          fh.write(json.dumps({'model': name, **record}, ensure_ascii=False) + '\n')
  gen, scores, records, after = results['after']
  before = results['before'][3]
  logs.log(f'generation on {len(records)} held-out instructions (exact match: '
           f'{em}): {logs.fmt_metrics(after)} (before: {logs.fmt_metrics(before)})')
  out = {'generation': after, 'generation_before': before, 'em_normalize': em}
  per_client = breakdown_generation(scores, gen['clients'])
  if per_client:
    out['generation_clients'] = client_distribution(per_client, GENERATION_CLIENT_METRICS)
    _log_distribution('generation per-client', out['generation_clients'],
                      ('rouge_l', 'cer'))
  if gen['groups'] is not None:
    out['generation_groups'] = breakdown_generation(scores, gen['groups'])
  return out
