"""The SD-VAE encoder and decoder against diffusers' AutoencoderKL (reduced config, random
weights), and the converter on the full sd-vae-ft-ema parameter shapes."""

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


def _randomised_autoencoder(torch, directory):
  """A reduced AutoencoderKL with norms and biases randomised too (not only the default
  init), saved by diffusers' save_pretrained into directory/vae (config.json beside
  diffusion_pytorch_model.safetensors)."""
  reference = _autoencoder(torch, REDUCED)
  with torch.no_grad():
    for name, p in reference.named_parameters():
      if name.endswith('bias') or 'norm' in name:
        p.copy_(p + 0.1 * torch.randn_like(p))
  reference.save_pretrained(directory / 'vae')
  return reference


@pytest.mark.torch
def test_encoder_parity_with_diffusers(tmp_path):
  torch = pytest.importorskip('torch')
  reference = _randomised_autoencoder(torch, tmp_path)
  model, variables, scale = convert_vae.load_encoder(tmp_path / 'vae')
  assert model == vae.VAEEncoder(**{k: v for k, v in REDUCED.items() if k != 'out_channels'})
  assert scale == reference.config.scaling_factor == 0.18215
  images = np.random.default_rng(0).uniform(-1, 1, size=(2, 24, 16, 3)).astype(np.float32)
  with torch.no_grad():
    posterior = reference.encode(torch.from_numpy(images).permute(0, 3, 1, 2)).latent_dist
  mean, std = jax.jit(model.apply)(variables, images)
  assert mean.shape == std.shape == (2, 12, 8, 4)
  for name, ours, theirs in (('mean', mean, posterior.mean), ('std', std, posterior.std)):
    theirs = theirs.permute(0, 2, 3, 1).numpy()
    err = float(np.max(np.abs(np.asarray(ours) - theirs)))
    print(f'VAE encoder {name}: max abs error {err:.2e} (max {np.abs(theirs).max():.2f})')
    assert err <= 1e-4


@pytest.mark.torch
def test_decoder_parity_with_diffusers(tmp_path):
  torch = pytest.importorskip('torch')
  reference = _randomised_autoencoder(torch, tmp_path)
  model = vae.VAEDecoder(**REDUCED)
  variables = convert_vae.convert(
      common.load_state_dict(tmp_path / 'vae' / 'diffusion_pytorch_model.safetensors'), model)
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
  encoder = convert_vae.convert(state, vae.VAEEncoder())['params']
  assert sorted(encoder) == ['encoder', 'quant_conv']
  np.testing.assert_array_equal(
      encoder['encoder']['down_blocks_2']['downsamplers_0']['conv']['kernel'],
      state['encoder.down_blocks.2.downsamplers.0.conv.weight'].transpose(2, 3, 1, 0))


def test_the_encoder_is_read_from_the_weights_not_a_converted_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match=r'is not a diffusers AutoencoderKL directory '
                                              r'\(config.json and diffusion_pytorch_model.'
                                              r'safetensors or .*\); converted VAE checkpoints '
                                              r'hold only the decoder'):
    convert_vae.load_encoder(tmp_path)
  with pytest.raises(FileNotFoundError, match=r'vae.safetensors do not exist; download '
                                              r'https://huggingface.co/stabilityai/sd-vae-ft-ema'
                                              r'.*and pass it as --vae\.$'):
    convert_vae.load_encoder(tmp_path / 'vae.safetensors')


def test_missing_weights_name_where_they_are_published(tmp_path):
  with pytest.raises(FileNotFoundError, match=r'vae.safetensors do not exist; download '
                                              r'https://huggingface.co/stabilityai/sd-vae-ft-ema'):
    convert_vae.load(tmp_path / 'vae.safetensors')
