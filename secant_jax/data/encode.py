"""Images → SD-VAE latents, into the ArrayRecord shards that training reads (`data.latents`).

    python -m secant_jax.data.encode --images DIR/train --vae diffusion_pytorch_model.safetensors \\
        --out data/imagenet256-latents [--image-size 256] [--batch-size 64]

For images without the official code's pre-extracted latents (another resolution, another
dataset, or ImageNet itself). The images (a local directory or a bucket, gs://…) are
listed as torchvision's ImageFolder lists them: one subdirectory per class, classes
numbered in sorted name order, the files with an image extension in sorted order. Each is
prepared as fast-DiT's extract_features.py (the extraction the official code's latents
come from) prepares it: converted to RGB, cut to image_size² as ADM does (`center_crop`),
flipped left-right with probability ½ (--flip random; --flip none never flips) and scaled
to [−1, 1]. Its record holds a draw from the encoder's Gaussian (--latent sample, as
fast-DiT) or the Gaussian's mean, raw (not ×scaling factor, as the importer's records).
The flip and the draw come from a key folded with --seed and the image's index in the
listing, so a rerun, or a stopped run run again, writes the same records, whatever the
batch size. Shards, manifest and resuming are the importer's (`latents.write_shards`);
import.json also records the class names in label order.

The encoder computes in float32 with --matmul-precision highest (full float32 products);
`default` is faster: TF32 on recent NVIDIA GPUs (as fast-DiT's extraction ran), one bf16
pass on TPUs. It runs on every device of its host, the batch split over them. With
--distributed it runs on every host of a pod or cluster (`launch/tpu_pod.sh encode`), --out
one directory they share (a bucket): host i reads, encodes and writes the shards k with
k mod hosts = i, each on its own devices; the records are those one host would write.
"""

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from PIL import Image

from secant_jax import arguments
from secant_jax import files
from secant_jax.convert import vae as convert_vae
from secant_jax.data import latents
from secant_jax.train import parallel

# torchvision's IMG_EXTENSIONS, matched without regard to case.
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')


def image_folder(directory):
  """([(path, label)], class names) of a directory (local or a bucket) of class
  subdirectories, in the order torchvision's ImageFolder gives: classes sorted; within one,
  its directories and theirs sorted by path, each one's files sorted. An entry named with
  an image extension is taken for a file without asking (a bucket would be asked once per
  image)."""
  root = epath.Path(directory)
  if not root.is_dir():
    raise FileNotFoundError(f'Image directory {directory} does not exist; pass --images, a '
                            'directory with one subdirectory of images per class (as '
                            "ImageNet's train/).")
  classes = sorted(p.name for p in root.iterdir()
                   if not _is_image(p.name) and p.is_dir())
  items = []
  for label, name in enumerate(classes):
    found = _images_under(root / name)
    if not found:
      raise FileNotFoundError(f'Class directory {root / name} holds no images (files ending '
                              f'{", ".join(IMAGE_EXTENSIONS)}); remove it or add its '
                              'images.')
    items.extend((path, label) for path in found)
  if not items:
    raise FileNotFoundError(f'{directory} has no class subdirectories; expected one '
                            'subdirectory of images per class (as ImageNet\'s train/n01440764/'
                            '...).')
  return items, classes


def _is_image(name):
  return name.lower().endswith(IMAGE_EXTENSIONS)


def _images_under(directory):
  """The image files in `directory` and its subdirectories, as os.walk sorted by path
  lists them."""
  listed, pending = [], [directory]
  while pending:
    here = pending.pop()
    entries = list(here.iterdir())
    listed.append((str(here), sorted(p.name for p in entries if _is_image(p.name))))
    pending.extend(p for p in entries if not _is_image(p.name) and p.is_dir())
  return [f'{where}/{name}' for where, names in sorted(listed) for name in names]


def center_crop(image, size):
  """ADM's crop of a PIL image to uint8 [size, size, C]: halve it with a box filter while
  its short side is at least 2·size, resize it (bicubic) so that its short side is `size`
  (the long one rounded), then keep the centred size × size (the extra pixel of an odd
  margin at the bottom/right)."""
  while min(image.size) >= 2 * size:
    image = image.resize(tuple(n // 2 for n in image.size), resample=Image.BOX)
  scale = size / min(image.size)
  image = image.resize(tuple(round(n * scale) for n in image.size), resample=Image.BICUBIC)
  pixels = np.asarray(image)
  top, left = (pixels.shape[0] - size) // 2, (pixels.shape[1] - size) // 2
  return pixels[top:top + size, left:left + size]


def load_image(item, size):
  """{'x': uint8 [size, size, 3], 'y': int32} of an (image path, label) item."""
  path, label = item
  try:
    with epath.Path(path).open('rb') as f, Image.open(f) as image:
      pixels = center_crop(image.convert('RGB'), size)
  except (OSError, ValueError) as e:
    raise ValueError(f'{path} could not be read as an image ({e}); remove or replace '
                     'it.') from e
  return {'x': pixels, 'y': np.int32(label)}


def latent_function(encoder, flip, sample):
  """(variables, key, uint8 pixels [B, S, S, 3], indices [B]) → raw latents [B, S/8, S/8,
  C]. Image i's key is fold_in(key, i): fold_in(·, 0) draws its flip (probability ½),
  fold_in(·, 1) the ε of its draw mean + std·ε."""
  def latents_of(variables, key, pixels, indices):
    keys = jax.vmap(functools.partial(jax.random.fold_in, key))(indices)
    images = pixels.astype(jnp.float32) / 127.5 - 1
    if flip:
      flips = jax.vmap(lambda k: jax.random.bernoulli(jax.random.fold_in(k, 0)))(keys)
      images = jnp.where(flips[:, None, None, None], images[:, :, ::-1], images)
    mean, std = encoder.apply(variables, images)
    if not sample:
      return mean
    noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1), mean.shape[1:]))(
        keys)
    return mean + std * noise
  return latents_of


def encode_folder(images_dir, out_dir, vae_path, image_size=256, batch_size=64, flip=True,
                  sample=True, seed=0, shard_size=10000, read_threads=16,
                  matmul_precision='highest'):
  """Writes the latents of the images in `images_dir` as ArrayRecord shards of
  `shard_size` images into `out_dir`; returns (record count, the VAE's scaling factor).
  In a multi-process run (jax.distributed initialised) each process writes its share of
  the shards."""
  items, classes = image_folder(images_dir)
  encoder, variables, scaling_factor = convert_vae.load_encoder(vae_path)
  factor = encoder.downsampling
  if image_size < factor or image_size % factor:
    raise ValueError(f'--image-size {image_size} is not a positive multiple of {factor}, '
                     'which the VAE downsamples by; use 256 for ImageNet-256 (512 for '
                     'ImageNet-512).')
  mesh = parallel.make_mesh(devices=jax.local_devices())
  parallel.check_batch_size(batch_size, mesh, '--batch-size')
  variables = jax.device_put(variables, parallel.replicated(mesh))
  latents_of = jax.jit(latent_function(encoder, flip, sample))
  key = jax.random.key(seed)

  def run(pixels, indices):
    with jax.default_matmul_precision(matmul_precision):
      return latents_of(variables, key, jax.device_put(pixels, parallel.batch_sharding(mesh)),
                        jax.device_put(indices, parallel.batch_sharding(mesh)))

  prefix = len(str(epath.Path(images_dir))) + 1  # a listed path's part before its class
  plan = {'images': files.absolute(images_dir), 'classes': classes, 'files': len(items),
          'first': items[0][0][prefix:], 'last': items[-1][0][prefix:],
          'vae': files.absolute(vae_path), 'image_size': image_size, 'flip': flip,
          'sample': sample, 'seed': seed, 'matmul_precision': matmul_precision,
          'shard_size': shard_size}
  shards = [functools.partial(_shard_records, items[start:start + shard_size], start, run,
                              image_size, batch_size, read_threads)
            for start in range(0, len(items), shard_size)]
  processes = latents.Processes(jax.process_index(), jax.process_count(),
                                multihost_utils.sync_global_devices)
  return latents.write_shards(out_dir, plan, shards, processes), scaling_factor


def _shard_records(items, first_index, run, image_size, batch_size, read_threads):
  """(raw NHWC latent, label) of each item, in order; images are read ahead by
  `read_threads` threads, and the device encodes a batch while the previous one is
  written."""
  import grain  # pylint: disable=import-outside-toplevel
  batches = (grain.MapDataset.source(items)
             .map(functools.partial(load_image, size=image_size)).batch(batch_size)
             .to_iter_dataset(grain.ReadOptions(num_threads=read_threads)))

  def records(latents_of_batch, labels):  # waits for the device; drops the padding
    return zip(np.asarray(latents_of_batch)[:len(labels)], labels)

  pending = None
  for k, batch in enumerate(batches):
    count = len(batch['y'])
    pixels = np.zeros((batch_size, *batch['x'].shape[1:]), np.uint8)
    pixels[:count] = batch['x']
    indices = np.arange(batch_size, dtype=np.int32) + first_index + k * batch_size
    if pending is not None:
      yield from records(*pending)
    pending = run(pixels, indices), batch['y']
  if pending is not None:
    yield from records(*pending)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--images', required=True,
                      help='directory of class subdirectories of images (ImageNet\'s train/)')
  parser.add_argument('--vae', required=True,
                      help='diffusers AutoencoderKL weights file, or the directory of its '
                           f'config.json and weights (default weights: {convert_vae.WEIGHTS_URL})')
  parser.add_argument('--out', required=True, help='directory (or gs:// bucket path) to write')
  parser.add_argument('--image-size', type=int, default=256)
  parser.add_argument('--batch-size', type=int, default=64,
                      help='images per device call, a multiple of the local device count')
  parser.add_argument('--flip', choices=('random', 'none'), default='random')
  parser.add_argument('--latent', choices=('sample', 'mean'), default='sample')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--shard-size', type=arguments.positive_int, default=10000,
                      help='images per shard')
  parser.add_argument('--read-threads', type=arguments.non_negative_int, default=16,
                      help='threads that read and crop images (0: the main thread)')
  parser.add_argument('--matmul-precision', choices=('highest', 'high', 'default'),
                      default='highest')
  parser.add_argument('--distributed', action='store_true',
                      help='run on every host (jax.distributed.initialize), each writing its '
                           'share of the shards to --out, which they must share')
  parser.add_argument('--coordinator-address', default='',
                      help='with --distributed where JAX does not detect the cluster (TPU '
                           'VMs, Slurm, Open MPI, Kubernetes it does): host:port of process 0')
  parser.add_argument('--num-processes', type=int, default=0)
  parser.add_argument('--process-id', type=int, default=-1)
  args = parser.parse_args(argv)
  if args.distributed:
    parallel.initialize_distributed(args)
  with parallel.exit_at_once_on_error():
    count, scaling_factor = encode_folder(
        args.images, args.out, args.vae, args.image_size, args.batch_size,
        args.flip == 'random', args.latent == 'sample', args.seed, args.shard_size,
        args.read_threads, args.matmul_precision)
  if jax.process_index() == 0:
    print(f'{count} latents → {args.out} (raw; this VAE scales them by {scaling_factor}: '
          f'set config.data.dir={args.out} config.data.latent_scale={scaling_factor})')


if __name__ == '__main__':
  main()
