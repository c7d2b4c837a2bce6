"""Where a run's files go: a local directory or a bucket (gs://BUCKET/run, as every host of
a TPU pod must share its workdir).

Everything the package writes or reads by path goes through etils' epath, as Orbax's and
CLU's own files do: TensorFlow's file system for gs:// and s3:// where TensorFlow is
installed, fsspec (gcsfs, s3fs) where not. A local path is made absolute, as Orbax needs;
a URL is kept as given (os.path.abspath would turn gs://b/run into ./gs:/b/run, a local
directory on each host).
"""

import contextlib
import json
import os
import shutil
import tempfile

import numpy as np
from etils import epath
from PIL import Image


def absolute(path):
  """`path` as a string: local paths absolute, URLs (gs://, s3://) unchanged."""
  p = epath.Path(path)
  return str(p if p.is_absolute() else p.resolve())


def make_directory(path):
  """`absolute(path)`, created with its parents where missing."""
  path = absolute(path)
  epath.Path(path).mkdir(parents=True, exist_ok=True)
  return path


def write_text(path, text):
  epath.Path(path).write_text(text)


def append_text(path, text):
  """Adds `text` at the end of the file at `path` (created if missing). Object stores have no
  append (gcsfs's 'a' mode silently overwrites), so the file is read and written whole."""
  p = epath.Path(path)
  write_text(path, (p.read_text() if p.exists() else '') + text)


def write_json(path, value):
  write_text(path, json.dumps(value, indent=2) + '\n')


def read_json(path):
  return json.loads(epath.Path(path).read_text())


@contextlib.contextmanager
def written_whole(path):
  """Yields a local filename through which to write the file at `path` whole or not at all,
  also for writers that take local filenames only (ArrayRecord's): a local `path` is
  written under a temporary name beside it and renamed on success (a stop mid-write leaves
  the previous file); a URL's file is written in a local temporary directory and uploaded
  on success (an object store's upload is all-or-nothing). On an error the partial file is
  removed and `path` is left as it was."""
  path = str(path)
  remote = '://' in path
  with (tempfile.TemporaryDirectory() if remote else contextlib.nullcontext()) as scratch:
    staged = os.path.join(scratch, 'staged') if remote else f'{path}.tmp'
    try:
      yield staged
      if remote:
        with open(staged, 'rb') as src, epath.Path(path).open('wb') as dst:
          shutil.copyfileobj(src, dst, 1 << 24)
      else:
        os.replace(staged, path)
    finally:
      if os.path.exists(staged):
        os.remove(staged)


def write_png(pixels, path):
  """uint8 pixels [H, W, C] as a PNG file, written whole (`written_whole`): grey for C = 1,
  else RGB from the first three channels (a grid of 4-channel latents shows three)."""
  image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels[..., :3])
  with written_whole(path) as staged:
    image.save(staged, format='PNG')


def write_npz(path, **arrays):
  """Writes the arrays whole or not at all (see `written_whole`)."""
  with written_whole(path) as staged, open(staged, 'wb') as f:
    np.savez(f, **arrays)
