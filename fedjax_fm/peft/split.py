"""Splitting a model into trainable and frozen pure-dict pytrees.

The federated engine is purely functional: it keeps a ``graphdef`` (static)
plus two pytrees of arrays, ``trainable`` (what clients update and the server
aggregates) and ``frozen`` (broadcast once, never communicated back)::

  split = split_model(model, method='lora', extra_trainable=('classifier',))
  model = merge(split)                       # or nnx.merge(graphdef, t, f)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import nnx

from fedjax_fm.peft.adapters import AdapterParam
from fedjax_fm.peft.ia3 import IA3Param
from fedjax_fm.peft.prompt import PrefixParam
from fedjax_fm.peft.prompt import PromptParam
from fedjax_fm.peft.surgery import path_matches

__all__ = [
    'METHODS',
    'Split',
    'count_params',
    'merge',
    'split_model',
    'tree_bytes',
]

METHODS = ('full', 'lora')
# Bias-only and wrapper-param routes (see _split_peft_params below).
METHODS = METHODS + ('adapter', 'bitfit', 'ia3')
# Prompt tuning (PromptParam) and prefix tuning (PrefixParam), peft/prompt.py.
METHODS = METHODS + ('prompt', 'prefix')


class Split(NamedTuple):
  """A model split into a static graph and two pure-dict state trees.

  Attributes:
    graphdef: the static ``nnx.GraphDef``.
    trainable: pure dict (nested ``dict`` of arrays) of trainable state.
    frozen: pure dict of everything else (frozen params, non-param state).
  """

  graphdef: Any
  trainable: dict
  frozen: dict


def extra_filter(patterns: Sequence[str]):
  """An nnx filter matching params whose dotted path matches one of ``patterns``."""
  def predicate(path, value):
    del value
    return any(
        path_matches(path, p, any_component=True)
        or path_matches(path[:-1], p, any_component=True)
        for p in patterns
    )

  return predicate


def split_model(
    model: nnx.Module,
    method: str = 'full',
    extra_trainable: Sequence[str] = (),
) -> Split:
  """Splits ``model`` into trainable and frozen pure dicts.

  Args:
    model: an NNX model.
    method: ``'full'`` (every ``nnx.Param``, LoRA factors included, is
      trainable) or ``'lora'`` (only ``nnx.LoRAParam`` plus the params matched
      by ``extra_trainable``).
      ``'adapter'`` (:class:`~fedjax_fm.peft.adapters.AdapterParam`, from
      ``apply_adapters``), ``'ia3'`` (:class:`~fedjax_fm.peft.ia3.IA3Param`,
      from ``apply_ia3``) and ``'bitfit'`` (every ``nnx.Param`` named
      ``bias``, Ben Zaken et al. 2021, https://arxiv.org/abs/2106.10199)
      likewise train only their own params plus ``extra_trainable``, as do
      ``'prompt'`` (:class:`~fedjax_fm.peft.prompt.PromptParam`, from
      ``apply_prompt_tuning``) and ``'prefix'``
      (:class:`~fedjax_fm.peft.prompt.PrefixParam`, from
      ``apply_prefix_tuning``).
    extra_trainable: for ``'lora'``, names or regexes of extra params to
      train (e.g. ``('classifier',)``). A pattern matches a variable if it
      equals any component of its path, or ``re.fullmatch``-es its dotted path
      (``classifier.kernel``) or the dotted path of its module (``classifier``).

  Returns:
    A :class:`Split`. Everything that is not trainable (including non-param
    state) lands in ``frozen``.

  Raises:
    ValueError: for an unknown method, if ``'lora'`` finds no ``LoRAParam``
      (likewise ``'adapter'``, ``'ia3'``, ``'bitfit'``: no adapter params, IA3
      vectors, biases), or if an ``extra_trainable`` pattern matches no param.
  """
  if method not in METHODS:
    raise ValueError(f'method must be one of {METHODS}, got {method!r}')
  if isinstance(extra_trainable, str):
    extra_trainable = (extra_trainable,)
  extra_trainable = tuple(extra_trainable)

  if method == 'full':
    graphdef, trainable, frozen = nnx.split(model, nnx.Param, ...)
  elif method in _PEFT_PARAM_ROUTES:
    graphdef, trainable, frozen = _split_peft_params(
        model, method, extra_trainable)
  else:
    lora_state = nnx.state(model, nnx.LoRAParam)
    if not jax.tree_util.tree_leaves(lora_state):
      raise ValueError(
          "method='lora' found no nnx.LoRAParam in the model; call "
          'fedjax_fm.peft.apply_lora(model, ...) first.'
      )
    for pattern in extra_trainable:
      found = nnx.state(model, nnx.All(nnx.Param, extra_filter([pattern])))
      if not jax.tree_util.tree_leaves(found):
        raise ValueError(
            f'extra_trainable pattern {pattern!r} matched no nnx.Param'
        )
    # LoRAParam is a subclass of Param: it goes first so it is not caught by
    # any later Param filter.
    trainable_filter = nnx.Any(
        nnx.LoRAParam, nnx.All(nnx.Param, extra_filter(extra_trainable))
    )
    graphdef, trainable, frozen = nnx.split(model, trainable_filter, ...)
  return Split(
      graphdef, nnx.to_pure_dict(trainable), nnx.to_pure_dict(frozen)
  )


def merge(
    split_or_graphdef: Split | Any,
    trainable: dict | None = None,
    frozen: dict | None = None,
) -> nnx.Module:
  """Rebuilds a model from a graphdef (or :class:`Split`) and pure dicts.

  Args:
    split_or_graphdef: a :class:`Split` or an ``nnx.GraphDef``.
    trainable: trainable pure dict; defaults to the split's.
    frozen: frozen pure dict; defaults to the split's.

  Returns:
    A new model instance holding the given arrays.
  """
  if isinstance(split_or_graphdef, Split):
    graphdef = split_or_graphdef.graphdef
    trainable = split_or_graphdef.trainable if trainable is None else trainable
    frozen = split_or_graphdef.frozen if frozen is None else frozen
  else:
    graphdef = split_or_graphdef
    if trainable is None or frozen is None:
      raise ValueError('trainable and frozen are required with a graphdef')
  return nnx.merge(graphdef, trainable, frozen)


def _leaves(tree: Any) -> list[Any]:
  if isinstance(tree, nnx.Module):
    tree = nnx.state(tree, nnx.Param)
  return jax.tree_util.tree_leaves(tree)


def count_params(tree: Any) -> int:
  """Total number of array elements in a pytree (or a module's params)."""
  return int(sum(np.size(x) for x in _leaves(tree)))


def tree_bytes(tree: Any) -> int:
  """Total ``nbytes`` of the leaves of a pytree (or a module's params)."""
  return int(
      sum(
          x.nbytes if hasattr(x, 'nbytes') else np.asarray(x).nbytes
          for x in _leaves(tree)
      )
  )


def _is_bias(path, value):
  del value
  return bool(path) and str(path[-1]) == 'bias'


# method -> (filter of the method's own params, what to call if none exist).
_PEFT_PARAM_ROUTES = {
    'adapter': (AdapterParam, 'call fedjax_fm.peft.apply_adapters(model, ...) '
                'first.'),
    'ia3': (IA3Param, 'call fedjax_fm.peft.apply_ia3(model, ...) first.'),
    'prompt': (PromptParam, 'call fedjax_fm.peft.apply_prompt_tuning(model, '
               '...) first.'),
    'prefix': (PrefixParam, 'call fedjax_fm.peft.apply_prefix_tuning(model, '
               '...) first.'),
    'bitfit': (nnx.All(nnx.Param, _is_bias),
               'BitFit needs a model with bias terms (e.g. the BERT-style '
               'Encoder; the Llama-style Decoder has none): use '
               "method='lora', 'ia3' or 'adapter' instead."),
}


def _split_peft_params(model, method, extra_trainable):
  """``nnx.split`` for the 'adapter', 'ia3' and 'bitfit' routes."""
  own, hint = _PEFT_PARAM_ROUTES[method]
  if not jax.tree_util.tree_leaves(nnx.state(model, own)):
    what = 'bias parameters' if method == 'bitfit' else (
        f'{own.__name__} variables')
    raise ValueError(f'method={method!r} found no {what} in the model; {hint}')
  for pattern in extra_trainable:
    found = nnx.state(model, nnx.All(nnx.Param, extra_filter([pattern])))
    if not jax.tree_util.tree_leaves(found):
      raise ValueError(
          f'extra_trainable pattern {pattern!r} matched no nnx.Param'
      )
  # The method's own filter goes first: AdapterParam/IA3Param subclass Param.
  trainable_filter = nnx.Any(
      own, nnx.All(nnx.Param, extra_filter(extra_trainable))
  )
  return nnx.split(model, trainable_filter, ...)
