"""Experiments from configs: ``run(config, workdir)`` and the parts it is built from.

* `build`: the only code that reads the config (with `registries`);
* `task_data`: load, featurize, hold out, partition;
* `loop`: the linear training loop (SLoRA as a stage);
* `evaluate`: held-out, per-client and generative evaluation;
* `logs`: console, progress bar, metrics.jsonl, TensorBoard.
"""

from fedjax_fm.train import registries
from fedjax_fm.train.build import Experiment
from fedjax_fm.train.build import build_compressors
from fedjax_fm.train.build import build_experiment
from fedjax_fm.train.build import build_model
from fedjax_fm.train.build import build_split
from fedjax_fm.train.evaluate import evaluate_clients
from fedjax_fm.train.evaluate import evaluate_generation
from fedjax_fm.train.evaluate import make_evaluator
from fedjax_fm.train.loop import run
from fedjax_fm.train.task_data import TaskData
from fedjax_fm.train.task_data import build_task_data
