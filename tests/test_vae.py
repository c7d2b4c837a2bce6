"""The SD-VAE decoder against diffusers' AutoencoderKL (reduced config, random weights), and
the converter on the full sd-vae-ft-ema parameter shapes."""

import jax
import numpy as np
import pytest

from secant_jax.convert import common
from secant_jax.convert import vae as convert_vae
from secant_jax.models import vae

REDUCED = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
               latent_channels=4, out_channels=3)


def _autoencoder(torch, settings, seed=0):
  diffusers = pytest.importorskip('diffusers')
  torch.manual_seed(seed)
  n = len(settings['block_out_channels'])
  model = diffusers.AutoencoderKL(
      in_channels=3, out_channels=settings['out_channels'],
      down_block_types=('DownEncoderBlock2D',) * n, up_block_types=('UpDecoderBlock2D',) * n,
      block_out_channels=settings['block_out_channels'],
      layers_per_block=settings['layers_per_block'],
      latent_channels=settings['latent_channels'],
      norm_num_groups=settings['norm_num_groups'], sample_size=32)
  return model.eval()


@pytest.mark.torch
def test_decoder_parity_with_diffusers(tmp_path):
  torch = pytest.importorskip('torch')
  reference = _autoencoder(torch, REDUCED)
  with torch.no_grad():  # randomise norms and biases too, not only the default init
    for name, p in reference.named_parameters():
      if name.endswith('bias') or 'norm' in name:
        p.copy_(p + 0.1 * torch.randn_like(p))
  from safetensors.torch import save_file  # pylint: disable=import-outside-toplevel
  save_file(reference.state_dict(), tmp_path / 'vae.safetensors')
  model = vae.VAEDecoder(**REDUCED)
  variables = convert_vae.convert(common.load_state_dict(tmp_path / 'vae.safetensors'), model)
  latents = np.random.default_rng(0).normal(size=(2, 8, 8, 4)).astype(np.float32) * 0.18215
  with torch.no_grad():
    expected = reference.decode(torch.from_numpy(latents).permute(0, 3, 1, 2) / 0.18215).sample
  ours = jax.jit(model.apply)(variables, latents)
  assert ours.shape == (2, 16, 16, 3)
  err = float(np.max(np.abs(np.asarray(ours) - expected.permute(0, 2, 3, 1).numpy())))
  print(f'VAE decoder max abs error {err:.2e}')
  assert err <= 1e-4


@pytest.mark.torch
def test_converter_accepts_the_full_sd_vae_shapes():
  torch = pytest.importorskip('torch')
  state = {k: v.numpy() for k, v in _autoencoder(torch, vae.SD_VAE).state_dict().items()}
  variables = convert_vae.convert(state)
  kernel = variables['params']['decoder']['mid_block']['attentions_0']['to_q']['kernel']
  assert kernel.shape == (512, 512)
  np.testing.assert_array_equal(kernel, state['decoder.mid_block.attentions.0.to_q.weight'].T)
  old_names = {k.replace('to_q', 'query').replace('to_out.0', 'proj_attn'): v
               for k, v in state.items()}
  again = convert_vae.convert(old_names)
  np.testing.assert_array_equal(
      again['params']['decoder']['mid_block']['attentions_0']['to_q']['kernel'], kernel)


def test_missing_weights_name_where_they_are_published(tmp_path):
  with pytest.raises(FileNotFoundError, match=r'vae.safetensors do not exist; download '
                                              r'https://huggingface.co/stabilityai/sd-vae-ft-ema'):
    convert_vae.load(tmp_path / 'vae.safetensors')
