"""Compressors by name, for configs: ``get_compressor('top_k', fraction_or_k=0.01)``."""

from __future__ import annotations

from fedjax_fm.compress import base
from fedjax_fm.compress import lowrank
from fedjax_fm.compress import quantize
from fedjax_fm.compress import sparsify
from fedjax_fm.compress.base import Compressor

COMPRESSORS = {
    'identity': base.identity,
    'top_k': sparsify.top_k,
    'random_k': sparsify.random_k,
    'threshold': sparsify.threshold,
    'stochastic_uniform': quantize.stochastic_uniform,
    'qsgd': quantize.qsgd,
    'deterministic': quantize.deterministic,
    'sign': quantize.sign,
    'ternary': quantize.ternary,
    'svd': lowrank.svd,
    'powersgd': lowrank.powersgd,
}


def get_compressor(name: str, **kwargs) -> Compressor:
  """Builds the compressor ``name`` with the factory's keyword arguments.

  Combinators take compressors, not names: wrap the result with
  ``error_feedback(...)`` or ``chain(...)``.

  Args:
    name: one of ``COMPRESSORS``.
    **kwargs: the factory's arguments (e.g. ``fraction_or_k=0.01``, ``bits=4``).

  Returns:
    A :class:`Compressor`.
  """
  if name not in COMPRESSORS:
    raise ValueError(f'unknown compressor {name!r}; allowed: {sorted(COMPRESSORS)} '
                     f'(combinators: error_feedback, chain)')
  try:
    return COMPRESSORS[name](**kwargs)
  except TypeError as e:
    raise ValueError(f'bad arguments for compressor {name!r}: {e}') from e
