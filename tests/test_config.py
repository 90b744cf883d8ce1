"""Bad configs fail before anything compiles, with a message naming the field."""

import pytest

from fedjax_fm import config as config_lib


def _set(c, dotted, value):
  node = c
  parts = dotted.split('.')
  for p in parts[:-1]:
    node = node[p]
  node[parts[-1]] = value


BAD_CASES = [
    # (field, value, expected text in message)
    ('model.kind', 'gpt5', "allowed values are ('minilm'"),
    ('peft.method', 'qlora', "allowed values are ('full', 'lora', 'slora'"),
    ('peft.rank', 0, 'config.peft.rank=0 is invalid: must be >= 1'),
    ('peft.alpha', -1.0, 'config.peft.alpha=-1.0 is invalid: must be > 0'),
    ('peft.dropout', 1.0, 'config.peft.dropout=1.0 is invalid: must be < 1'),
    ('peft.target_modules', (), 'config.peft.target_modules'),
    ('peft.target_modules', ('query[',), 'not a valid regex'),
    ('data.source', 'hub', "config.data.source='hub' is invalid: allowed values"),
    ('data.partition', 'random', "allowed values are ('iid', 'dirichlet'"),
    ('data.alpha', 0.0, 'config.data.alpha=0.0 is invalid: must be > 0'),
    ('data.eval_fraction', 1.5, 'config.data.eval_fraction=1.5 is invalid: must be < 1'),
    ('data.max_len', 1000, 'config.data.max_len=1000 is invalid: must be <= 512'),
    ('data.num_clients', 0, 'config.data.num_clients=0 is invalid: must be >= 1'),
    ('fl.clients_per_round', 101, 'cannot sample more clients than exist'),
    ('fl.clients_per_round', 0, 'config.fl.clients_per_round=0 is invalid: must be >= 1'),
    ('fl.local_steps', 0, 'config.fl.local_steps=0'),
    ('fl.max_epochs', 0, 'config.fl.max_epochs=0 is invalid: must be >= 1'),
    ('fl.strategy', 'pmap', "allowed values are ('vmap', 'chunked', 'sharded')"),
    ('fl.chunk_size', 11, 'config.fl.chunk_size=11 is invalid: must be <= 10'),
    ('fl.chunk_size', -1, 'config.fl.chunk_size=-1 is invalid: must be >= 0'),
    ('fl.memory_budget_mb', -5, 'config.fl.memory_budget_mb=-5 is invalid: must be >= 0'),
    ('model.dtype', 'float16', "allowed values are ('float32', 'bfloat16')"),
    ('fl.prox_mu', -0.1, 'config.fl.prox_mu=-0.1'),
    ('client_optimizer.name', 'lamb', "allowed values are ('sgd', 'momentum', 'adam')"),
    ('client_optimizer.learning_rate', 0.0, 'must be > 0'),
    ('server_optimizer.name', 'fedsgd', "('fedavg', 'fedavgm', 'fedadam', 'fedyogi', "
     "'fedadagrad', 'fedadam_optax', 'fedyogi_optax', 'fedadagrad_optax')"),
    ('server_optimizer.b2', 1.0, 'config.server_optimizer.b2=1.0 is invalid: must be < 1'),
    ('num_rounds', 0, 'config.num_rounds=0 is invalid: must be >= 1'),
    ('eval.every', 0, 'config.eval.every=0'),
    ('model.num_heads', 5, 'must be divisible by config.model.num_heads=5'),
    ('compress.uplink', 'zip', "config.compress.uplink='zip' is invalid: allowed values"),
    ('compress.bits', 3, 'config.compress.bits=3 is invalid: allowed values are (1, 2, 4, 8)'),
    ('compress.fraction', 0.0, 'config.compress.fraction=0.0 is invalid: must be > 0'),
    ('compress.min_size', 0, 'config.compress.min_size=0 is invalid: must be >= 1'),
    ('compress.then', 'stochastic_uniform', 'quantizes the values of a sparse or low-rank'),
]


@pytest.mark.parametrize('field,value,message', BAD_CASES)
def test_bad_value_names_field(field, value, message):
  c = config_lib.base_config()
  _set(c, field, value)
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.validate(c, num_devices=1)
  assert message in str(info.value)


def test_default_is_valid():
  config_lib.validate(config_lib.base_config(), num_devices=1)


def test_unknown_field():
  c = config_lib.base_config()
  with c.fl.unlocked():
    c.fl.clients_per_rnd = 3
  with pytest.raises(config_lib.ConfigError, match=r'config.fl.clients_per_rnd is unknown'):
    config_lib.validate(c, num_devices=1)


def test_unknown_top_level_field():
  c = config_lib.base_config()
  c.rounds = 3
  with pytest.raises(config_lib.ConfigError, match=r'config.rounds is unknown'):
    config_lib.validate(c, num_devices=1)


def test_decoder_requires_causal_lm_and_kv_heads():
  c = config_lib.base_config()
  c.model.kind = 'decoder'
  with pytest.raises(config_lib.ConfigError, match='data.task="causal_lm"'):
    config_lib.validate(c, num_devices=1)
  c.data.task = 'causal_lm'
  c.model.num_kv_heads = 3
  with pytest.raises(config_lib.ConfigError, match='config.model.num_kv_heads=3'):
    config_lib.validate(c, num_devices=1)


def test_sources_need_their_fields():
  c = config_lib.base_config()
  c.data.source = 'tfds'
  with pytest.raises(config_lib.ConfigError, match='config.data.name'):
    config_lib.validate(c, num_devices=1)
  c = config_lib.base_config()
  c.data.source = 'jsonl'
  with pytest.raises(config_lib.ConfigError, match='config.data.path'):
    config_lib.validate(c, num_devices=1)


def test_sharded_needs_a_client_per_device():
  c = config_lib.base_config()
  c.fl.strategy = 'sharded'
  c.fl.clients_per_round = 4
  c.fl.chunk_size = 1
  with pytest.raises(config_lib.ConfigError, match='at least one client per device'):
    config_lib.validate(c, num_devices=8)


def test_mlp_needs_numeric_features():
  c = config_lib.base_config()
  c.model.kind = 'mlp'
  with pytest.raises(config_lib.ConfigError, match='config.model.kind'):
    config_lib.validate(c, num_devices=1)


def test_privacy_and_aggregator_fields():
  c = config_lib.base_config()
  c.privacy.enabled = True
  c.privacy.noise_multiplier = 1.0
  c.privacy.target_epsilon = 3.0
  with pytest.raises(config_lib.ConfigError, match='not both'):
    config_lib.validate(c, num_devices=1)
  c.privacy.target_epsilon = 0.0
  c.privacy.accountant = 'pld'
  with pytest.raises(config_lib.ConfigError, match='config.privacy.accountant'):
    config_lib.validate(c, num_devices=1)
  c.privacy.accountant = 'rdp'
  c.aggregator.name = 'median'
  with pytest.raises(config_lib.ConfigError, match='DP-FedAvg defines its own'):
    config_lib.validate(c, num_devices=1)
  c = config_lib.base_config()
  c.aggregator.name = 'krum'
  c.aggregator.num_byzantine = 4
  with pytest.raises(config_lib.ConfigError, match='clients_per_round > 2'):
    config_lib.validate(c, num_devices=1)
  c = config_lib.base_config()
  c.attack.kind = 'nan'
  with pytest.raises(config_lib.ConfigError, match='config.attack.fraction'):
    config_lib.validate(c, num_devices=1)
  c.attack.kind = 'poison'
  with pytest.raises(config_lib.ConfigError, match=r"allowed values are \('none'"):
    config_lib.validate(c, num_devices=1)


def _skellam_config():
  c = config_lib.base_config()
  c.privacy.enabled, c.privacy.mechanism, c.privacy.noise_multiplier = True, 'skellam', 1.0
  return c


@pytest.mark.parametrize('field,value,message', [
    ('privacy.mechanism', 'laplace', "config.privacy.mechanism='laplace' is invalid: "
     "allowed values are ('gaussian', 'skellam')"),
    ('privacy.bits', 32, 'config.privacy.bits=32 is invalid: allowed values are the '
     'integers 8 to 24'),
    ('privacy.beta', 1.0, 'config.privacy.beta=1.0 is invalid: must be < 1'),
    ('compress.uplink', 'top_k', "config.compress.uplink='top_k' is invalid: with "
     'privacy.mechanism="skellam" the privacy.bits-bit integers'),
    ('privacy.adaptive', True, 'config.privacy.adaptive=True is invalid: adaptive clipping '
     'is not implemented for privacy.mechanism="skellam"'),
    ('peft.method', 'slora', "config.peft.method='slora' is invalid: "
     'privacy.mechanism="skellam"'),
    ('aggregator.name', 'secure_mean', 'DP-FedAvg defines its own'),
])
def test_skellam_rejects_what_it_cannot_account(field, value, message):
  c = _skellam_config()
  config_lib.validate(c, num_devices=1)
  _set(c, field, value)
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.validate(c, num_devices=1)
  assert message in str(info.value)


def test_skellam_bits_must_fit_the_clients_and_gaussian_ignores_them():
  c = _skellam_config()
  c.data.num_clients, c.fl.clients_per_round, c.fl.chunk_size = 10_000, 5_000, 1
  c.privacy.bits = 8
  with pytest.raises(config_lib.ConfigError,
                     match=r'config.privacy.bits=8 is invalid: too few for '
                           r'config.fl.clients_per_round=5000.*privacy.bits >= 9'):
    config_lib.validate(c, num_devices=1)
  c.privacy.bits = 9
  config_lib.validate(c, num_devices=1)
  c.prune.enabled, c.prune.regrow_fraction = True, 0.1
  with pytest.raises(config_lib.ConfigError, match='config.prune.regrow_fraction'):
    config_lib.validate(c, num_devices=1)
  # The Gaussian mechanism does not read the Skellam fields.
  g = config_lib.base_config()
  g.privacy.enabled, g.privacy.noise_multiplier, g.privacy.bits = True, 1.0, 3
  g.compress.uplink = 'top_k'
  config_lib.validate(g, num_devices=1)


def test_dp_rejects_pruning_regrowth_for_every_mechanism():
  """Regrowth sends dense, unclipped gradient scores: never private."""
  c = config_lib.base_config()
  c.privacy.enabled, c.privacy.noise_multiplier = True, 1.0
  c.prune.enabled, c.prune.regrow_fraction = True, 0.1
  with pytest.raises(config_lib.ConfigError,
                     match='config.prune.regrow_fraction=0.1 is invalid: with privacy.enabled'):
    config_lib.validate(c, num_devices=1)
  c.privacy.enabled = False
  config_lib.validate(c, num_devices=1)
