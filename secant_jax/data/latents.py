"""ImageNet-256 VAE latents in ArrayRecord files, and the importer from per-sample .npy.

Each record is msgpack({'latent': [32, 32, 4] float16/32 raw VAE latent (NHWC),
'label': int}). Raw means not yet multiplied by the SD-VAE scale factor: the pipeline
multiplies by config.data.latent_scale (0.18215), the one place it is applied.

Import the official layout (one <name>.npy per sample in features/ and labels/, NCHW
latents [1, 4, 32, 32] or [4, 32, 32]):

    python -m secant_jax.data.latents --features DIR/features --labels DIR/labels \\
        --out DIR/latents [--already-scaled] [--shard-size 10000]

--already-scaled for features saved after ×0.18215 (as fast-DiT's extract_features does):
they are divided back so that every ArrayRecord holds raw latents. Which of the two a set
is shows in its spread (0.18215 is 1/std of raw SD-VAE latents), so the importer reads the
first files and refuses, naming the flag, a set whose spread says the flag is wrong.

--out may be a bucket (gs://…), which training then reads directly (ArrayRecord's reader
opens gs:// paths). Each shard appears whole, and `manifest.json`, written last, lists
them: a directory without it holds an import that did not finish, and is refused rather
than trained on in part. `import.json`, written first, records what is imported (the
directories, the flag, the shard size, the number of files and the first and last names);
a rerun of the same import keeps the shards already there and writes only the missing
ones, so a stopped import goes on where it was (to import changed files of the same names,
delete --out first).
"""

import argparse
import glob
import os
import re

import numpy as np
from etils import epath
from flax import serialization

from secant_jax import files

SD_VAE_SCALE = 0.18215
MANIFEST = 'manifest.json'
PLAN = 'import.json'


def encode(latent_nhwc, label):
  return serialization.msgpack_serialize(
      {'latent': np.asarray(latent_nhwc, np.float16), 'label': int(label)})


def decode(record):
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
    record = decode(self._records[index])
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


def _raw_latent(path, already_scaled):
  """The [C, H, W] raw latent in a [1, C, H, W] or [C, H, W] .npy file."""
  latent = np.load(path).astype(np.float32)
  if latent.ndim not in (3, 4) or latent.ndim == 4 and latent.shape[0] != 1:
    raise ValueError(f'{path} holds an array of shape {list(latent.shape)}: the importer '
                     'takes one latent per file, NCHW [1, 4, 32, 32] or [4, 32, 32]; save '
                     'each latent of a batch in a file of its own.')
  latent = latent.reshape(latent.shape[-3:])
  return latent / SD_VAE_SCALE if already_scaled else latent


def check_scale(features, already_scaled, sample_size=64):
  """Raises where the first `sample_size` features, read as raw (already_scaled False)
  or as ×0.18215 latents, do not have the spread of raw SD-VAE latents: std ≈ 1/0.18215
  ≈ 5.5, accepted within a factor √5.5, so that a set off by the factor 5.5 either way
  is caught."""
  std = float(np.std(np.stack([_raw_latent(p, already_scaled)
                               for p in features[:sample_size]])))
  expected = 1 / SD_VAE_SCALE
  if np.sqrt(expected) <= std <= expected * np.sqrt(expected):
    return
  looks, fix = (('already multiplied by 0.18215', 'pass --already-scaled')
                if std < expected else ('raw', 'drop --already-scaled'))
  read_as = 'as ×0.18215 (--already-scaled)' if already_scaled else 'as raw'
  raise ValueError(f'The latents in {os.path.dirname(features[0])} look {looks}: the first '
                   f'{min(len(features), sample_size)}, read {read_as}, have std {std:.3g} '
                   f'where raw SD-VAE latents have {expected:.3g}; {fix}.')


def import_npy(features_dir, labels_dir, out_dir, already_scaled=False, shard_size=10000):
  """Writes ArrayRecord shards of raw NHWC latents and their manifest into `out_dir` (a
  local directory or a bucket); returns the number of records."""
  from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
  features = sorted(glob.glob(os.path.join(features_dir, '*.npy')), key=_natural_key)
  if not features:
    raise FileNotFoundError(f'No .npy files in {features_dir}; expected one latent per '
                            'sample, e.g. features/0.npy with shape [1, 4, 32, 32].')
  check_scale(features, already_scaled)
  out = epath.Path(files.make_directory(out_dir))
  plan = {'features': files.absolute(features_dir), 'labels': files.absolute(labels_dir),
          'already_scaled': already_scaled, 'shard_size': shard_size,
          'records': len(features), 'first': os.path.basename(features[0]),
          'last': os.path.basename(features[-1])}
  kept = _shards_of(out, plan)
  (out / MANIFEST).unlink(missing_ok=True)
  files.write_json(out / PLAN, plan)
  if kept:
    print(f'{out}: keeping the {len(kept)} shards an earlier run of this import finished')
  shards = []
  for start in range(0, len(features), shard_size):
    shards.append(f'latents-{start // shard_size:05d}.array_record')
    if shards[-1] in kept:
      continue
    with files.written_whole(out / shards[-1]) as staged:
      writer = array_record_module.ArrayRecordWriter(staged, 'group_size:1')
      try:
        for path in features[start:start + shard_size]:
          writer.write(encode(_raw_latent(path, already_scaled).transpose(1, 2, 0),
                              _label(path, labels_dir)))
      finally:
        writer.close()
  files.write_json(out / MANIFEST, {'records': len(features), 'shards': shards})
  return len(features)


def _shards_of(out, plan):
  """The shard files in `out` if its import.json records `plan` (a rerun of the same
  import), else none."""
  if not (out / PLAN).exists() or files.read_json(out / PLAN) != plan:
    return set()
  return {p.name for p in out.glob('latents-*.array_record')}


def _label(feature_path, labels_dir):
  path = os.path.join(labels_dir, os.path.basename(feature_path))
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} is missing: every features/<name>.npy needs '
                            'labels/<name>.npy.')
  label = np.load(path).reshape(-1)
  if label.size != 1:
    raise ValueError(f'{path} holds {label.size} labels: the importer takes one per file, '
                     'as its features file holds one latent.')
  return label[0]


def main(argv=None):
  parser = argparse.ArgumentParser(description='Import per-sample .npy latents.')
  parser.add_argument('--features', required=True)
  parser.add_argument('--labels', required=True)
  parser.add_argument('--out', required=True)
  parser.add_argument('--already-scaled', action='store_true')
  parser.add_argument('--shard-size', type=int, default=10000)
  args = parser.parse_args(argv)
  count = import_npy(args.features, args.labels, args.out, args.already_scaled,
                     args.shard_size)
  print(f'{count} latents → {args.out}')


if __name__ == '__main__':
  main()
