"""The FID Inception against torch-fidelity's own feature extractor (random weights saved to
a temp file in place of the download), and its TF1 resize."""

import os
from unittest import mock

import jax
import numpy as np
import pytest

from secant_jax.convert import inception as convert_inception
from secant_jax.models import inception


def test_tf1_resize_samples_without_half_pixel_offset():
  x = np.arange(4, dtype=np.float32).reshape(1, 1, 4, 1) * np.ones((1, 4, 1, 1), np.float32)
  out = np.asarray(inception.resize_bilinear_tf1(x, 8))[0, 0, :, 0]
  # source x = i·4/8: 0, .5, 1, ..., 3, 3.5 → clamped at the last pixel (3)
  np.testing.assert_allclose(out, [0, 0.5, 1, 1.5, 2, 2.5, 3, 3])


def test_missing_weights_name_the_file_and_where_it_is_published(tmp_path):
  with pytest.raises(FileNotFoundError, match=r'absent.pth do not exist; download https://'
                                              r'github.com/toshas/torch-fidelity/releases'):
    convert_inception.load(tmp_path / 'absent.pth')


def _random_fidelity_weights(path):
  """A torch-fidelity InceptionV3 state dict with random weights and BatchNorm statistics,
  saved where the extractor's weights path expects the download."""
  import torch  # pylint: disable=import-outside-toplevel
  from torch_fidelity import feature_extractor_inceptionv3 as fe  # pylint: disable=import-outside-toplevel
  with mock.patch.object(fe.torch, 'load', lambda *a, **k: {}), \
       mock.patch.object(fe.FeatureExtractorInceptionV3, 'load_state_dict',
                         lambda self, sd: None):
    model = fe.FeatureExtractorInceptionV3('inception-v3-compat', ['2048'],
                                           feature_extractor_weights_path='unused')
  gen = torch.Generator().manual_seed(0)
  state = {}
  for key, value in model.state_dict().items():
    if key.endswith('num_batches_tracked'):
      state[key] = value
    elif key.endswith('conv.weight'):
      fan_in = value[0].numel()
      state[key] = torch.randn(value.shape, generator=gen) * (2.0 / fan_in) ** 0.5
    elif key.endswith('running_var') or key.endswith('bn.weight'):
      state[key] = 0.5 + torch.rand(value.shape, generator=gen)
    else:
      state[key] = 0.1 * torch.randn(value.shape, generator=gen)
  torch.save(state, path)
  return state


@pytest.mark.torch
def test_parity_with_torch_fidelity_feature_extractor(tmp_path):
  torch = pytest.importorskip('torch')
  fe = pytest.importorskip('torch_fidelity.feature_extractor_inceptionv3')
  weights = os.path.join(tmp_path, 'weights-inception-2015-12-05-6726825d.pth')
  _random_fidelity_weights(weights)
  reference = fe.FeatureExtractorInceptionV3(
      'inception-v3-compat', ['2048', 'logits_unbiased', 'logits'],
      feature_extractor_weights_path=weights).eval()  # torch-fidelity < 0.4 leaves it training
  variables = convert_inception.load(weights)
  apply = jax.jit(lambda v, x: inception.InceptionV3().apply(v, x))
  rng = np.random.default_rng(0)
  for size in (32, 64, 256):
    images = rng.integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    with torch.no_grad():
      expected = reference(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
    ours = apply(variables, images)
    for name, value in zip(('2048', 'logits_unbiased', 'logits'), expected):
      err = float(np.max(np.abs(np.asarray(ours[name]) - value.numpy())))
      scale = float(np.max(np.abs(value.numpy())))
      print(f'{size}x{size} {name}: max abs error {err:.2e} (max |value| {scale:.2f})')
      assert err <= 1e-3, (size, name, err)
