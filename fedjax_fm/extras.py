"""Optional dependencies: imported on first use, with an install hint.

The core install (``pip install fedjax_fm``) leaves out packages that only one
feature needs. Those features import them through :func:`require`, which turns
a missing package into an ``ImportError`` naming the extra that provides it::

  tfds = require('tensorflow_datasets', 'tfds', 'data.source="tfds"')
  # ImportError: data.source="tfds" needs TensorFlow Datasets:
  #   pip install "fedjax_fm[tfds]"

The extras are declared in ``pyproject.toml`` (``[project.optional-dependencies]``).
"""

from __future__ import annotations

import importlib
import types

__all__ = ['EXTRAS', 'require']

# Top-level module -> (readable package name, the extra that installs it).
EXTRAS: dict[str, tuple[str, str]] = {
    'tensorflow_datasets': ('TensorFlow Datasets', 'tfds'),
    'matplotlib': ('matplotlib', 'plot'),
    'tensorboardX': ('tensorboardX', 'tensorboard'),
    'huggingface_hub': ('huggingface_hub', 'hf'),
    'gguf': ('gguf', 'gguf'),
    'jinja2': ('jinja2', 'gguf'),
}


def require(module_name: str, extra: str, what: str) -> types.ModuleType:
  """Imports ``module_name`` or says which extra to install.

  Args:
    module_name: Module to import, e.g. ``'tensorflow_datasets'`` or
      ``'matplotlib.pyplot'``.
    extra: The ``fedjax_fm`` extra that installs it, e.g. ``'tfds'``.
    what: The feature that needs it, as the user sees it, e.g.
      ``'data.source="tfds"'`` or ``'--config.tensorboard=True'``.

  Returns:
    The imported module.

  Raises:
    ImportError: When the import fails; the message reads
      ``{what} needs {package}: pip install "fedjax_fm[{extra}]"`` followed by
      the original error, which is chained as the cause.
  """
  try:
    return importlib.import_module(module_name)
  except ImportError as e:
    top = module_name.split('.')[0]
    package = EXTRAS.get(top, (top, extra))[0]
    raise ImportError(
        f'{what} needs {package}: pip install "fedjax_fm[{extra}]" '
        f'({type(e).__name__}: {e})'
    ) from e
