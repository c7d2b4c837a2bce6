"""Images → SD-VAE latents (`secant_jax.data.encode`): the listing and crop as torchvision and
ADM make them, records equal to the encoder applied to the cropped images, draws that
depend on the seed and the image only, and a stopped run that goes on."""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest
from etils import epath
from flax import traverse_util
from PIL import Image
from safetensors.numpy import save_file

from secant_jax.convert import common
from secant_jax.convert import vae as convert_vae
from secant_jax.data import encode
from secant_jax.data import latents
from secant_jax.models import vae

REDUCED = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
               latent_channels=4)
IMAGES = {'cat/1.png': ('RGB', (40, 30)), 'cat/2.jpg': ('L', (20, 36)),
          'cat/3.png': ('RGBA', (16, 16)), 'dog/a.png': ('RGB', (64, 24)),
          'dog/deeper/b.bmp': ('RGB', (18, 18))}


def _image_folder(root):
  rng = np.random.default_rng(0)
  for name, (mode, (width, height)) in IMAGES.items():
    os.makedirs(os.path.dirname(root / name), exist_ok=True)
    channels = len(mode)
    pixels = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode).save(root / name)
  (root / 'dog' / 'notes.txt').write_text('not an image')
  return root


def _vae_directory(directory):
  """A reduced AutoencoderKL's encoder with random weights (biases and norms too), as
  diffusers' save_pretrained writes it: config.json and the weights file."""
  model = vae.VAEEncoder(**REDUCED)
  variables = model.init(jax.random.key(1), np.zeros((1, 16, 16, 3), np.float32))
  flat = traverse_util.flatten_dict(variables)
  keys = jax.random.split(jax.random.key(2), len(flat))
  variables = traverse_util.unflatten_dict({
      path: value + 0.1 * jax.random.normal(key, value.shape)
      for key, (path, value) in zip(keys, flat.items())})
  os.makedirs(directory)
  save_file(common.to_state_dict(variables),
            str(directory / 'diffusion_pytorch_model.safetensors'))
  settings = {'_class_name': 'AutoencoderKL', 'in_channels': 3, 'out_channels': 3,
              'down_block_types': ['DownEncoderBlock2D'] * 2, 'act_fn': 'silu',
              'scaling_factor': 0.5, **{k: list(v) if isinstance(v, tuple) else v
                                        for k, v in REDUCED.items()}}
  (directory / 'config.json').write_text(json.dumps(settings))
  return model, variables


def _records(directory):
  """(raw latents, labels) of an encoding, read as training reads them (unscaled)."""
  source = latents.source(ml_collections.ConfigDict(dict(dir=str(directory), latent_scale=1.0)))
  return (np.stack([source[i]['x'] for i in range(len(source))]),
          [int(source[i]['y']) for i in range(len(source))])


def _encode(root, out, *flags):
  encode.main(['--images', str(root / 'images'), '--vae', str(root / 'vae'), '--out',
               str(out), '--image-size', '16', '--shard-size', '3', *flags])


def test_records_are_the_encoders_latents_of_the_cropped_images(tmp_path, capsys):
  _image_folder(tmp_path / 'images')
  model, variables = _vae_directory(tmp_path / 'vae')
  _encode(tmp_path, tmp_path / 'mean', '--latent', 'mean', '--flip', 'none', '--batch-size',
          '8')
  printed = capsys.readouterr().out
  assert f'5 latents → {tmp_path / "mean"} (raw; this VAE scales them by 0.5: set ' in printed
  assert 'config.data.latent_scale=0.5)' in printed
  records, labels = _records(tmp_path / 'mean')
  assert labels == [0, 0, 0, 1, 1]
  items, classes = encode.image_folder(str(tmp_path / 'images'))
  assert classes == ['cat', 'dog']
  pixels = np.stack([encode.center_crop(Image.open(path).convert('RGB'), 16)
                     for path, _ in items])
  mean, std = model.apply(variables, pixels / 127.5 - 1)
  assert records.shape == (5, 8, 8, 4)
  np.testing.assert_allclose(records, mean, rtol=2e-3, atol=2e-3)  # stored as float16
  manifest = latents.read_manifest(tmp_path / 'mean')
  assert manifest == {'records': 5, 'shards': ['latents-00000.array_record',
                                               'latents-00001.array_record']}

  mirrored = model.apply(variables, pixels[:, :, ::-1] / 127.5 - 1)[0]
  _encode(tmp_path, tmp_path / 'flips', '--latent', 'mean', '--batch-size', '16')
  flipped = [bool(np.allclose(r, m, atol=2e-3)) for r, m in
             zip(_records(tmp_path / 'flips')[0], np.asarray(mirrored))]
  kept = [bool(np.allclose(r, m, atol=2e-3)) for r, m in
          zip(_records(tmp_path / 'flips')[0], np.asarray(mean))]
  assert all(f != k for f, k in zip(flipped, kept)), (flipped, kept)  # one or the other
  assert 0 < sum(flipped) < 5

  _encode(tmp_path, tmp_path / 'sampled', '--batch-size', '8')
  sampled = _records(tmp_path / 'sampled')[0]
  noise = (sampled - np.where(np.array(flipped)[:, None, None, None], mirrored, mean)) / np.where(
      np.array(flipped)[:, None, None, None], model.apply(
          variables, pixels[:, :, ::-1] / 127.5 - 1)[1], std)
  assert 0.7 < float(np.std(noise)) < 1.3  # a draw from the Gaussian, with the same flips
  _encode(tmp_path, tmp_path / 'one-shard', '--batch-size', '16', '--shard-size', '5')
  np.testing.assert_allclose(_records(tmp_path / 'one-shard')[0], sampled, atol=2e-3)
  _encode(tmp_path, tmp_path / 'another-seed', '--batch-size', '8', '--seed', '1')
  assert not np.allclose(_records(tmp_path / 'another-seed')[0], sampled, atol=1e-2)


def test_a_stopped_encoding_goes_on_where_it_was(tmp_path):
  _image_folder(tmp_path / 'images')
  _vae_directory(tmp_path / 'vae')
  out = tmp_path / 'out'
  _encode(tmp_path, out, '--batch-size', '8')
  whole = _records(out)
  first = out / 'latents-00000.array_record'
  mtime = os.stat(first).st_mtime_ns
  os.remove(out / 'latents-00001.array_record')
  os.remove(out / latents.MANIFEST)
  with pytest.raises(FileNotFoundError, match=r'No finished latent import in .*out'):
    latents.read_manifest(out)
  _encode(tmp_path, out, '--batch-size', '8')
  assert os.stat(first).st_mtime_ns == mtime
  again = _records(out)
  np.testing.assert_array_equal(again[0], whole[0])
  assert again[1] == whole[1]
  assert json.loads((out / latents.PLAN).read_text())['classes'] == ['cat', 'dog']


def test_a_process_that_cannot_see_the_others_shards_says_where_out_must_be(tmp_path,
                                                                          capsys):
  """Process 0 of 2 writing where process 1's shards never appear (each host's own disk):
  it writes its shards and import.json, then names the missing shard and what --out must
  be, and writes no manifest."""
  barriers = []
  shards = [lambda: iter([(np.zeros((2, 2, 4), np.float32), 3)])] * 3
  with pytest.raises(FileNotFoundError, match=(
      r'latents-00001.array_record is missing after every process wrote its shards: with 2 '
      r'processes, \S+ must be one directory they all see \(a bucket')):
    latents.write_shards(tmp_path / 'out', {'images': 'x'}, shards,
                         latents.Processes(0, 2, barriers.append))
  assert barriers == ['latents: import.json read', 'latents: shards written']
  assert sorted(os.listdir(tmp_path / 'out')) == [
      latents.PLAN, 'latents-00000.array_record', 'latents-00002.array_record']
  assert 'process 0 of 2 writes shards [0, 2] of 3' in capsys.readouterr().out


def test_images_on_a_bucket_encode_as_on_a_disk(gcs_bucket, tmp_path):
  """Listed, read and written through epath: the same records from gs:// as from a disk."""
  root = _image_folder(tmp_path / 'images')
  _vae_directory(tmp_path / 'vae')
  for path in sorted(root.rglob('*')):
    if path.is_file():
      epath.Path(f'{gcs_bucket}/images/{path.relative_to(root)}').write_bytes(
          path.read_bytes())
  assert encode.image_folder(f'{gcs_bucket}/images') == (
      [(f'{gcs_bucket}/images/{os.path.relpath(p, root)}', y)
       for p, y in encode.image_folder(str(root))[0]], ['cat', 'dog'])
  _encode(tmp_path, tmp_path / 'local', '--batch-size', '8')
  encode.main(['--images', f'{gcs_bucket}/images', '--vae', str(tmp_path / 'vae'), '--out',
               f'{gcs_bucket}/latents', '--image-size', '16', '--shard-size', '3',
               '--batch-size', '8', '--read-threads', '1'])
  plan = json.loads(epath.Path(f'{gcs_bucket}/latents/{latents.PLAN}').read_text())
  assert plan['images'] == f'{gcs_bucket}/images' and plan['first'] == 'cat/1.png'
  on_bucket, local = _records(f'{gcs_bucket}/latents'), _records(tmp_path / 'local')
  np.testing.assert_array_equal(on_bucket[0], local[0])
  assert on_bucket[1] == local[1]


def test_center_crop_halves_then_cuts_the_middle():
  blocks = np.arange(128 * 256, dtype=np.int64).reshape(128, 256) % 251
  image = np.repeat(np.repeat(blocks, 2, axis=0), 2, axis=1).astype(np.uint8)  # 256 × 512
  cropped = encode.center_crop(Image.fromarray(image), 128)
  np.testing.assert_array_equal(cropped, blocks[:, 64:192])  # box-halved exactly, centred
  odd = np.arange(28, dtype=np.uint8).reshape(4, 7)
  np.testing.assert_array_equal(encode.center_crop(Image.fromarray(odd), 4), odd[:, 1:5])
  tall = encode.center_crop(Image.fromarray(np.zeros((100, 30, 3), np.uint8)), 16)
  assert tall.shape == (16, 16, 3)


@pytest.mark.torch
def test_images_are_listed_as_torchvisions_image_folder_lists_them(tmp_path):
  datasets = pytest.importorskip('torchvision.datasets')
  root = _image_folder(tmp_path / 'images')
  Image.new('RGB', (8, 8)).save(root / 'dog' / 'C.JPEG')
  os.makedirs(root / 'cat' / 'a')
  Image.new('RGB', (8, 8)).save(root / 'cat' / 'a' / 'z.png')
  theirs = datasets.ImageFolder(str(root))
  items, classes = encode.image_folder(str(root))
  assert classes == theirs.classes
  assert items == theirs.samples


ENCODE_PATHS = ['--images', 'x', '--vae', 'x', '--out', 'x']  # never read: refused before
IMPORT_PATHS = ['--features', 'x', '--labels', 'x', '--out', 'x']


@pytest.mark.parametrize('tool, paths, flag, value, expected', [
    (encode.main, ENCODE_PATHS, '--shard-size', '-5', 'a positive integer'),  # was: 0 shards
    (encode.main, ENCODE_PATHS, '--shard-size', '0', 'a positive integer'),
    (encode.main, ENCODE_PATHS, '--read-threads', '-1', 'a non-negative integer'),
    (latents.main, IMPORT_PATHS, '--shard-size', '0', 'a positive integer')])
def test_the_latent_writers_refuse_bad_counts_by_flag(tool, paths, flag, value, expected,
                                                      capsys):
  with pytest.raises(SystemExit):
    tool([*paths, flag, value])
  assert f"argument {flag}: expected {expected}, got '{value}'" in capsys.readouterr().err


def test_bad_input_is_named_with_the_fix(tmp_path):
  root = _image_folder(tmp_path / 'images')
  _vae_directory(tmp_path / 'vae')
  with pytest.raises(ValueError, match=r'--image-size 15 is not a positive multiple of 2, '
                                       r'which the VAE downsamples by'):
    _encode(tmp_path, tmp_path / 'out', '--image-size', '15')  # the reduced VAE's 2
  with pytest.raises(ValueError, match=r'Global batch size 12 is not a positive multiple of '
                                       r'the 8 devices; set --batch-size to a multiple of 8'):
    _encode(tmp_path, tmp_path / 'out', '--batch-size', '12')
  with pytest.raises(FileNotFoundError, match=r'Image directory .*missing does not exist'):
    encode.image_folder(str(tmp_path / 'missing'))
  os.makedirs(root / 'empty')
  with pytest.raises(FileNotFoundError, match=r'images/empty holds no images .*remove it or '
                                              r'add its images'):
    encode.image_folder(str(root))
  os.rmdir(root / 'empty')
  (root / 'dog' / 'broken.png').write_bytes(b'not a png')
  with pytest.raises(ValueError, match=r'dog/broken.png could not be read as an image'):
    _encode(tmp_path, tmp_path / 'out', '--batch-size', '8')
  settings = json.loads((tmp_path / 'vae' / 'config.json').read_text())
  (tmp_path / 'vae' / 'config.json').write_text(json.dumps(
      {**settings, 'latent_channels': 16, 'use_quant_conv': False, 'shift_factor': 0.1159}))
  with pytest.raises(ValueError, match=r'has use_quant_conv=False in its config.json where '
                                       r'this encoder computes use_quant_conv=True'):
    convert_vae.load_encoder(tmp_path / 'vae')
