"""A pretrained encoder truncated to its first layers (``model.pretrained_layers``)."""

import numpy as np
import pytest
from flax import nnx

from experiments.configs import default
from fedjax_fm import config as config_lib
from fedjax_fm import hf
from fedjax_fm import models


def test_first_layers_hold_the_checkpoints_first_layers(minilm_dir):
  full, _ = hf.load_bert(minilm_dir, num_labels=3)
  short, cfg = hf.load_bert(minilm_dir, num_labels=3, num_layers=2)
  assert cfg.num_layers == 2 and len(short.layers) == 2 and len(full.layers) == 6
  tensors = hf.load_safetensors(minilm_dir)
  q0 = np.asarray(tensors['encoder.layer.1.attention.self.query.weight']).T
  np.testing.assert_array_equal(np.asarray(short.layers[1].query.kernel[...]), q0)
  # every weight of the short model is the full model's, layer for layer
  f_flat = dict(nnx.to_flat_state(nnx.state(full, nnx.Param)))
  checked = 0
  for path, value in nnx.to_flat_state(nnx.state(short, nnx.Param)):
    if 'classifier' in path:
      continue
    np.testing.assert_array_equal(np.asarray(value[...]), np.asarray(f_flat[path][...]),
                                  err_msg=str(path))
    checked += 1
  assert checked > 30


def test_a_shallower_model_needs_first_layers(minilm_dir):
  cfg = hf.configs.encoder_config_from_hf(hf.load_hf_config(minilm_dir), num_labels=3,
                                          num_layers=2)
  model = models.Encoder(cfg, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='unexpected keys'):   # strict by default
    hf.load_bert_into(model, minilm_dir)
  assert any(k.startswith('encoder.layer.1.') for k in
             hf.load_bert_into(model, minilm_dir, first_layers=True))
  with pytest.raises(ValueError, match=r'num_layers must be an int in \[1, 6\]'):
    hf.load_bert(minilm_dir, num_labels=3, num_layers=7)


def test_config_field_is_validated_and_reaches_the_model():
  c = default.get_config('tiny')
  assert c.model.pretrained_layers == 2
  config_lib.validate(c)
  c.model.pretrained_layers = 7
  with pytest.raises(config_lib.ConfigError, match=r'config\.model\.pretrained_layers=7'):
    config_lib.validate(c)
  c.model.pretrained_layers = -1
  with pytest.raises(config_lib.ConfigError, match=r'config\.model\.pretrained_layers=-1'):
    config_lib.validate(c)
  assert default.get_config().model.pretrained_layers == 0   # the main job: all 6
