"""Fréchet distance (FID, or FD-<data> with a domain feature network) and Inception Score
of a model's samples, all in JAX, batched over the mesh.

Per batch: samples (the config's sampler from seeded noise and uniform labels, or any
given batches) → SD-VAE decode when the data are latents → uint8 quantisation → the
feature network (evaluation.features; Inception by default) → streamed statistics.
Reference statistics come from config.fid.reference (an .npz with mu/sigma, e.g. ADM's
ImageNet-256 or EDM's cifar10-32x32.npz) or, for pixel datasets, are computed once from
the config.fid.reference_split of the data and cached in the workdir.
"""

import json
import os

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from secant_jax import files
from secant_jax import generate
from secant_jax import sample_images
from secant_jax.evaluation import features as features_lib
from secant_jax.evaluation import fid
from secant_jax.evaluation import progress as progress_lib
from secant_jax.train import parallel

REFERENCE_FILE = '{metric}_reference_{split}.npz'


def _features_fn(mesh, network, decoder):
  """images or latents [B, ...] (batch-sharded) → the network's outputs, float32, and
  'pixels': the uint8 images it scored."""

  def features(variables, x):
    pixels = fid.to_uint8(sample_images.decode(decoder, x))
    return {**network.apply(variables, pixels), 'pixels': pixels}

  return jax.jit(features, out_shardings=parallel.batch_sharding(mesh))


def image_name(index):
  """The file sample `index` is written to: 000012.png."""
  return f'{index:06d}.png'


def write_images(pixels, start, keep, directory):
  """Rows [0, keep) of a batch-sharded uint8 batch [B, H, W, C] as PNG files
  directory/image_name(start + row), each process writing the rows it holds."""
  for shard in pixels.addressable_shards:
    if shard.replica_id == 0:
      first = shard.index[0].start or 0
      for row, image in enumerate(np.asarray(shard.data), first):
        if row < keep:
          files.write_png(image, os.path.join(directory, image_name(start + row)))


# The files torch-fidelity, the official evaluator, reads from a folder of samples: those
# directly in it whose extension, in any case, is one of its default samples_find_ext.
EVALUATOR_IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')


def check_image_dir(directory, num_samples):
  """Refuses a `directory` holding image files other than this evaluation's own names,
  image_name(0) to image_name(num_samples - 1): an evaluator reading the folder would
  count them (images left by an evaluation of more samples, or anything else)."""
  def ours(name):
    stem = os.path.splitext(name)[0]
    return stem.isdecimal() and int(stem) < num_samples and name == image_name(int(stem))

  foreign = sorted(p.name for p in epath.Path(directory).iterdir()
                   if p.suffix.lower() in EVALUATOR_IMAGE_EXTENSIONS and not ours(p.name))
  if foreign:
    raise ValueError(f'{directory} holds {len(foreign)} image file(s) not among the '
                     f'{num_samples} samples of this evaluation ({image_name(0)} to '
                     f'{image_name(num_samples - 1)}), the first {foreign[0]}: an evaluator '
                     'reading the folder (torch-fidelity reads every .png, .jpg and .jpeg in '
                     'it) would count them. Delete them, or set config.fid.image_dir to an '
                     'empty folder.')


def samples_stamp(config):
  """What, besides the model's weights, decides the samples of an FID evaluation and their
  scores: a Progress fingerprint's settings (evaluation.progress)."""
  return {'seed': config.seed, 'model': config.model.to_dict(), 'path': config.path.to_dict(),
          'secant': config.secant.to_dict(), 'fid': config.fid.to_dict(),
          'latent_scale': config.data.get('latent_scale'),  # what the decoder divides by
          'teacher_sample_nfe': config.teacher_sample_nfe,  # a teacher run's sampler
          'matmul_precision': config.matmul_precision, 'processes': jax.process_count()}


class SampleQuality:
  """Loads the feature network (and the VAE for latent data) and the reference statistics
  once; add batches of samples to its `scores`, or call it with a model's variables."""

  def __init__(self, config, workdir, mesh):
    self.config, self.mesh = config, mesh
    replicated = parallel.replicated(mesh)
    self.network = features_lib.from_config(config.fid)
    self.variables = jax.device_put(self.network.variables, replicated)
    decoder = jax.device_put(sample_images.load_decoder(config, 'FID'), replicated)
    self.features_of = _features_fn(mesh, self.network, decoder)
    self.reference = self._reference(workdir)

  def _reference(self, workdir):
    """(μ, Σ) of the reference: config.fid.reference's, or else those of the data's
    reference_split, computed once and cached in the workdir stamped with what made them
    (the feature network's weights, the data, the split and the image count). A cache that
    another feature network or other reference images made (a retrained classifier, a
    changed num_reference_images, from before the stamp) is computed afresh, not used."""
    if self.config.fid.reference:
      return self._fitting(self.config.fid.reference,
                           fid.load_reference(self.config.fid.reference))
    split = self.config.fid.reference_split
    cached = os.path.join(workdir, REFERENCE_FILE.format(metric=self.network.metric,
                                                         split=split))
    stamp = json.dumps({'features': progress_lib.weights_digest(self.network.variables),
                        'data': {k: self.config.data.get(k) for k in ('name', 'dir')},
                        'split': split,
                        'num_reference_images': self.config.fid.num_reference_images},
                       sort_keys=True)
    if epath.Path(cached).exists():
      saved = progress_lib.read_if_stamped(cached, stamp)
      if saved is not None:
        return saved['mu'], saved['sigma']
      logging.info('%s was made with another feature network or other reference images; '
                   'computing it afresh.', cached)
    if self.config.data.name == 'imagenet_latents':
      raise ValueError('ImageNet FID needs reference statistics: set config.fid.reference '
                       'to ADM\'s VIRTUAL_imagenet256_labeled.npz (its mu/sigma).')
    from secant_jax.data import pipeline  # pylint: disable=import-outside-toplevel
    data_config = self.config.data.copy_and_resolve_references()
    with data_config.unlocked():
      data_config.split = split
    source = pipeline.source(data_config)
    total = min(len(source), self.config.fid.num_reference_images or len(source))
    batch = self.config.fid.batch_size
    local = batch // jax.process_count()
    offset = jax.process_index() * local
    sharding = parallel.batch_sharding(self.mesh)

    def batches():
      for start in range(0, total, batch):  # record start + r is global row r
        count = min(batch, total - start)
        images = np.stack([source[start + (offset + j) % count]['x'] for j in range(local)])
        yield jax.make_array_from_process_local_data(sharding, images), count

    mu, sigma = self._accumulate(batches(), total, 'reference images').statistics()
    if jax.process_index() == 0:
      progress_lib.write_stamped(cached, stamp, {'mu': mu, 'sigma': sigma})
    return mu, sigma

  def _fitting(self, path, reference):
    """`reference` (μ, Σ) read from `path`, refused where its features are not the feature
    network's (whose Fréchet distance would otherwise fail only after every sample)."""
    dim, (mu, sigma) = self.network.dim, reference
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
      raise ValueError(
          f'Reference statistics {path} are of features of shape mu {mu.shape}, sigma '
          f'{sigma.shape}; the feature network ({self.network.metric}) gives {dim} features: '
          "set config.fid.reference to statistics of its features, or to '' to compute them "
          "from config.data's fid.reference_split (pixel data).")
    return reference

  def scores(self):
    """An empty Scores to `add` batches to."""
    return Scores(self)

  def _accumulate(self, batches, total, what, scores=None, progress=None, image_dir=''):
    """`scores` (a new Scores by default) with the batches added, their images written to
    `image_dir` (`write_images`) and the sums saved to `progress`
    (evaluation.progress.Progress) as it goes where given."""
    scores = self.scores() if scores is None else scores
    every = max(1, total // 10 // self.config.fid.batch_size) * self.config.fid.batch_size
    for x, keep in batches:
      start = scores.count
      pixels = scores.add(x, keep)
      if image_dir:
        write_images(pixels, start, keep, image_dir)
      if scores.count % every < keep or scores.count == total:
        logging.info('%s %s: %d / %d', self.network.metric, what, scores.count, total)
      if progress:
        progress.save_if_due(scores.count, total, scores.state)
    return scores

  def __call__(self, network, task, variables, num_samples, seed, progress=None,
               image_dir=''):
    """Scores.result of `num_samples` samples of the config's sampler, batch i drawn from
    fold_in(key(seed), i). With a `progress` (evaluation.progress.Progress) the running
    sums are saved as it goes, and a rerun resumes after the latest save with the batches
    it had not scored, so that its result is the one of a run never stopped. With an
    `image_dir` each sample is also written there as the PNG it was scored as, sample i as
    image_name(i) (before the save that counts it)."""
    batch = self.config.fid.batch_size
    parallel.check_batch_size(batch, self.mesh, 'config.fid.batch_size')
    if image_dir:
      image_dir = files.make_directory(image_dir)
      check_image_dir(image_dir, num_samples)

    def draw(v, key):
      k_noise, k_label = jax.random.split(key)
      noise = jax.random.normal(k_noise, (batch, *network.image_shape))
      labels = jax.random.randint(k_label, (batch,), 0, max(network.num_classes, 1))
      return generate.model_sample(network, task, v, self.config, noise, labels)

    sample = jax.jit(draw, out_shardings=parallel.batch_sharding(self.mesh))
    scores = self.scores()
    done, saved = progress.load() if progress else (0, None)
    if saved:
      scores.restore(saved)
      logging.info('%s samples: resumed after %d / %d', self.network.metric, done,
                   num_samples)
    batches = ((sample(variables, jax.random.fold_in(jax.random.key(seed), i)),
                min(batch, num_samples - i * batch))
               for i in range(-(-done // batch), -(-num_samples // batch)))
    return self._accumulate(batches, num_samples, 'samples', scores, progress,
                            image_dir).result()


class Scores:
  """Streamed statistics of one set of samples: `add` batches (x [batch, ...] in the
  model's space, batch-sharded, and how many leading rows count), then `result`."""

  def __init__(self, quality):
    self._quality = quality
    self._stats = fid.FeatureStats(quality.network.dim)
    self._logits = []
    self.count = 0

  def add(self, x, num_valid):
    """Adds the first `num_valid` rows of `x`; returns the uint8 images they were scored as
    (batch-sharded, all rows)."""
    out = self._quality.features_of(self._quality.variables, x)
    self._stats.add(out['features'], num_valid)
    if 'logits' in out:
      self._logits.append(np.asarray(multihost_utils.process_allgather(
          out['logits'], tiled=True))[:num_valid])
    self.count += num_valid
    return out['pixels']

  def state(self):
    """What `add` has accumulated, as arrays (this process's feature sums)."""
    state = {'count': np.asarray(self.count), **self._stats.state()}
    if self._logits:
      state['logits'] = np.concatenate(self._logits)
    return state

  def restore(self, state):
    self.count = int(state['count'])
    self._stats.restore(state)
    self._logits = [state['logits']] if 'logits' in state else []

  def statistics(self):
    return self._stats.mu_sigma()

  def result(self):
    """{metric (e.g. 'fid'): Fréchet distance to the reference, and with Inception
    'inception_score', 'inception_score_std'}."""
    result = {self._quality.network.metric: fid.frechet_distance(
        *self.statistics(), *self._quality.reference)}
    if self._logits:
      result['inception_score'], result['inception_score_std'] = fid.inception_score(
          np.concatenate(self._logits))
    return result
