"""ImageNet-256 VAE latents in ArrayRecord files, and the importer from .npy files.

Each record is msgpack({'latent': [32, 32, 4] float16/32 raw VAE latent (NHWC),
'label': int}). Raw means not yet multiplied by the SD-VAE scale factor: the pipeline
multiplies by config.data.latent_scale (0.18215), the one place it is applied.

Import the official layout: <name>.npy files in features/ and labels/, NCHW latents one
per file ([1, 4, 32, 32] or [4, 32, 32], as the Hugging Face set the official code names
holds them) or a batch per file ([N, 4, 32, 32] with N labels, as the official train.py
reads them: one file per step), imported file by file in natural name order, then row by
row:

    python -m secant_jax.data.latents --features DIR/features --labels DIR/labels \\
        --out DIR/latents [--already-scaled] [--shard-size 10000]

--already-scaled for features saved after ×0.18215 (as fast-DiT's extract_features does):
they are divided back so that every ArrayRecord holds raw latents. Which of the two a set
is shows in its spread (0.18215 is 1/std of raw SD-VAE latents), so the importer reads the
first latents and refuses, naming the flag, a set whose spread says the flag is wrong.

A shard holds whole files, about --shard-size latents. --out may be a bucket (gs://…),
which training then reads directly (ArrayRecord's reader opens gs:// paths). Each shard
appears whole, and `manifest.json`, written last, lists them and counts the latents: a
directory without it holds an import that did not finish, and is refused rather than
trained on in part. `import.json`, written first, records what is imported (the
directories, the flag, the shard size, the number of files and the first and last names);
a rerun of the same import keeps the shards already there and writes only the missing
ones, so a stopped import goes on where it was (to import changed files of the same names,
delete --out first). `write_shards` is that mechanism; `data.encode` writes its latents of
images through it too.
"""

import argparse
import functools
import glob
import os
import re
from typing import Callable, NamedTuple

import numpy as np
from etils import epath
from flax import serialization

from secant_jax import arguments
from secant_jax import files
from secant_jax.models.vae import SD_VAE_SCALE

MANIFEST = 'manifest.json'
PLAN = 'import.json'


def to_record(latent_nhwc, label):
  """The ArrayRecord record of one raw NHWC latent and its label (float16 latent)."""
  return serialization.msgpack_serialize(
      {'latent': np.asarray(latent_nhwc, np.float16), 'label': int(label)})


def from_record(record):
  """{'latent': float16 [H, W, C], 'label': int} of a record `to_record` wrote."""
  return serialization.msgpack_restore(record)


class LatentSource:
  """Random access over ArrayRecord files of latents: {'x': scaled float32, 'y': int32}."""

  def __init__(self, paths, latent_scale):
    import grain  # pylint: disable=import-outside-toplevel
    self._records = grain.sources.ArrayRecordDataSource(paths)
    self._scale = np.float32(latent_scale)

  def __len__(self):
    return len(self._records)

  def __getitem__(self, index):
    record = from_record(self._records[index])
    return {'x': record['latent'].astype(np.float32) * self._scale,
            'y': np.int32(record['label'])}


def read_manifest(directory):
  """{'records': count, 'shards': [file names]} of the import in `directory` (local or a
  bucket)."""
  manifest = epath.Path(directory) / MANIFEST
  if not manifest.exists():
    raise FileNotFoundError(f'No finished latent import in {directory}: {MANIFEST}, written '
                            'last by the importer, is missing (the import did not run there '
                            'or was stopped); import the latents with python -m '
                            'secant_jax.data.latents --features ... --labels ... --out DIR, '
                            'or set config.data.dir.')
  return files.read_json(manifest)


def source(data_config):
  manifest = read_manifest(data_config.dir)
  records = LatentSource([str(epath.Path(data_config.dir) / name) for name in
                          manifest['shards']], data_config.get('latent_scale', SD_VAE_SCALE))
  if len(records) != manifest['records']:
    raise ValueError(f'{data_config.dir} holds {len(records)} latents where its {MANIFEST} '
                     f'lists {manifest["records"]}: its shards changed after the import; '
                     'import again.')
  return records


def _natural_key(path):
  return [int(p) if p.isdigit() else p for p in re.split(r'(\d+)', os.path.basename(path))]


def _raw_latents(path, already_scaled):
  """The raw latents [N, C, H, W] in a .npy file of one ([1, C, H, W] or [C, H, W]) or a
  batch ([N, C, H, W])."""
  latents = np.load(path).astype(np.float32)
  if latents.ndim not in (3, 4):
    raise ValueError(f'{path} holds an array of shape {list(latents.shape)}: the importer '
                     'takes NCHW latents, one per file ([1, 4, 32, 32] or [4, 32, 32]) or a '
                     'batch per file ([N, 4, 32, 32]).')
  latents = latents.reshape(-1, *latents.shape[-3:])
  return latents / SD_VAE_SCALE if already_scaled else latents


def check_scale(features, already_scaled, sample_size=64):
  """Raises where the first `sample_size` latents, read as raw (already_scaled False)
  or as ×0.18215 latents, do not have the spread of raw SD-VAE latents: std ≈ 1/0.18215
  ≈ 5.5, accepted within a factor √5.5, so that a set off by the factor 5.5 either way
  is caught."""
  sample = []
  for path in features:
    sample.extend(_raw_latents(path, already_scaled))
    if len(sample) >= sample_size:
      break
  sample = sample[:sample_size]
  std = float(np.std(np.stack(sample)))
  expected = 1 / SD_VAE_SCALE
  if np.sqrt(expected) <= std <= expected * np.sqrt(expected):
    return
  looks, fix = (('already multiplied by 0.18215', 'pass --already-scaled')
                if std < expected else ('raw', 'drop --already-scaled'))
  read_as = 'as ×0.18215 (--already-scaled)' if already_scaled else 'as raw'
  raise ValueError(f'The latents in {os.path.dirname(features[0])} look {looks}: the first '
                   f'{len(sample)}, read {read_as}, have std {std:.3g} where raw SD-VAE '
                   f'latents have {expected:.3g}; {fix}.')


def import_npy(features_dir, labels_dir, out_dir, already_scaled=False, shard_size=10000):
  """Writes ArrayRecord shards of raw NHWC latents and their manifest into `out_dir` (a
  local directory or a bucket), about `shard_size` latents each; returns the number of
  records."""
  features = sorted(glob.glob(os.path.join(features_dir, '*.npy')), key=_natural_key)
  if not features:
    raise FileNotFoundError(f'No .npy files in {features_dir}; expected one latent per '
                            'sample, e.g. features/0.npy with shape [1, 4, 32, 32], or one '
                            'batch per file, [N, 4, 32, 32].')
  check_scale(features, already_scaled)
  first = np.load(features[0], mmap_mode='r').shape
  files_per_shard = max(1, shard_size // int(np.prod(first[:-3])))
  plan = {'features': files.absolute(features_dir), 'labels': files.absolute(labels_dir),
          'already_scaled': already_scaled, 'shard_size': shard_size,
          'files': len(features), 'first': os.path.basename(features[0]),
          'last': os.path.basename(features[-1])}
  return write_shards(out_dir, plan, [
      functools.partial(_npy_records, features[start:start + files_per_shard], labels_dir,
                        already_scaled)
      for start in range(0, len(features), files_per_shard)])


def _npy_records(features, labels_dir, already_scaled):
  for path in features:
    batch = _raw_latents(path, already_scaled)
    for latent, label in zip(batch, _labels(path, labels_dir, len(batch))):
      yield latent.transpose(1, 2, 0), label


class Processes(NamedTuple):
  """The processes that write one import together: this one's index, their count, and a
  barrier(name) that returns once every process has called it with that name."""
  index: int = 0
  count: int = 1
  barrier: Callable[[str], None] = lambda name: None


def write_shards(out_dir, plan, shards, processes=Processes()):
  """Writes shard k of `shards` (functions, each giving its (raw NHWC latent, label)
  records) as latents-0000k.array_record into `out_dir` (local or a bucket), each whole,
  then the manifest; returns the number of records. `plan` (what is written, as JSON) goes
  to import.json first: a rerun with the same plan keeps the shards already there.

  With several `processes` (encode --distributed, the directory one they share), process
  i writes the shards k with k mod count = i; process 0 writes import.json, and the
  manifest once every process has written its shards. The shards do not depend on the
  number of processes, so an import stopped on one count goes on with another."""
  from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
  out = epath.Path(files.make_directory(out_dir))
  kept = _shards_of(out, plan)
  processes.barrier('latents: import.json read')  # before process 0 writes it
  if processes.index == 0:
    (out / MANIFEST).unlink(missing_ok=True)
    files.write_json(out / PLAN, plan)
    if kept:
      print(f'{out}: keeping the {len(kept)} shards an earlier run of this import finished')
  names = [f'latents-{k:05d}.array_record' for k in range(len(shards))]
  mine = [k for k in range(processes.index, len(shards), processes.count)
          if names[k] not in kept]
  if processes.count > 1:
    print(f'{out}: process {processes.index} of {processes.count} writes shards {mine} of '
          f'{len(shards)}')
  for k in mine:
    with files.written_whole(out / names[k]) as staged:
      writer = array_record_module.ArrayRecordWriter(staged, 'group_size:1')
      try:
        for latent, label in shards[k]():
          writer.write(to_record(latent, label))
      finally:
        writer.close()
  processes.barrier('latents: shards written')
  records = 0
  for name in names:
    if not (out / name).exists():
      raise FileNotFoundError(
          f'{out / name} is missing after every process wrote its shards: with '
          f'{processes.count} processes, {out_dir} must be one directory they all see (a '
          'bucket, gs://..., or a shared file system), not a disk of each host.')
    reader = array_record_module.ArrayRecordReader(str(out / name))
    records += reader.num_records()
    reader.close()
  if processes.index == 0:
    files.write_json(out / MANIFEST, {'records': records, 'shards': names})
  return records


def _shards_of(out, plan):
  """The shard files in `out` if its import.json records `plan` (a rerun of the same
  import), else none."""
  if not (out / PLAN).exists() or files.read_json(out / PLAN) != plan:
    return set()
  return {p.name for p in out.glob('latents-*.array_record')}


def _labels(feature_path, labels_dir, count):
  """The `count` labels of the latents in `feature_path`, from labels_dir/<same name>."""
  path = os.path.join(labels_dir, os.path.basename(feature_path))
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} is missing: every features/<name>.npy needs '
                            'labels/<name>.npy.')
  labels = np.load(path).reshape(-1)
  if labels.size != count:
    raise ValueError(f'{path} holds {labels.size} labels where {feature_path} holds {count} '
                     'latents: a labels file holds one label per latent of its features '
                     'file.')
  return labels


def main(argv=None):
  parser = argparse.ArgumentParser(description='Import .npy latents into ArrayRecord shards.')
  parser.add_argument('--features', required=True)
  parser.add_argument('--labels', required=True)
  parser.add_argument('--out', required=True)
  parser.add_argument('--already-scaled', action='store_true')
  parser.add_argument('--shard-size', type=arguments.positive_int, default=10000,
                      help='latents per shard')
  args = parser.parse_args(argv)
  count = import_npy(args.features, args.labels, args.out, args.already_scaled,
                     args.shard_size)
  print(f'{count} latents → {args.out}')


if __name__ == '__main__':
  main()
