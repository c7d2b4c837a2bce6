"""Run files by path: local paths made absolute, bucket URLs kept (a pod's shared workdir),
PNGs and JSON through the one writer."""

import os

import numpy as np
import pytest
from etils import epath
from PIL import Image

from secant_jax import files


@pytest.mark.parametrize('url', ['gs://bucket/runs/sdei4', 's3://bucket/run'])
def test_a_bucket_url_stays_a_url(url):
  assert files.absolute(url) == url  # os.path.abspath gives ./gs:/bucket/..., on each host


def test_a_relative_path_becomes_absolute_and_a_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  made = files.make_directory('runs/a')
  assert made == os.path.join(str(tmp_path), 'runs', 'a') and os.path.isdir(made)
  files.write_json(os.path.join(made, 'x.json'), {'step': 3})
  assert files.read_json(os.path.join(made, 'x.json')) == {'step': 3}


@pytest.mark.parametrize('channels, mode', [(1, 'L'), (3, 'RGB'), (4, 'RGB')])
def test_png_is_grey_or_rgb_from_the_first_three_channels(tmp_path, channels, mode):
  pixels = np.random.default_rng(0).integers(0, 256, (5, 7, channels), dtype=np.uint8)
  files.write_png(pixels, tmp_path / 'a.png')
  with Image.open(tmp_path / 'a.png') as image:
    assert image.mode == mode
    np.testing.assert_array_equal(np.asarray(image).reshape(5, 7, -1),
                                  pixels[..., :min(channels, 3)])


@pytest.mark.parametrize('where', ['local', 'bucket'])
def test_an_npz_write_stopped_midway_leaves_the_previous_file(where, tmp_path, monkeypatch,
                                                               request):
  root = str(tmp_path) if where == 'local' else request.getfixturevalue('gcs_bucket')
  path = f'{root}/stats.npz'
  files.write_npz(path, mu=np.zeros(3))

  def stopped_midway(file, **arrays):
    del arrays
    file.write(b'PK\x03\x04 cut off')
    raise KeyboardInterrupt  # a preemption's signal

  with monkeypatch.context() as patch:
    patch.setattr(files.np, 'savez', stopped_midway)
    with pytest.raises(KeyboardInterrupt):
      files.write_npz(path, mu=np.ones(3))
  with epath.Path(path).open('rb') as f, np.load(f) as arrays:
    np.testing.assert_array_equal(arrays['mu'], np.zeros(3))
  assert [p.name for p in epath.Path(root).iterdir()] == ['stats.npz']
  files.write_npz(path, mu=np.ones(3))
  with epath.Path(path).open('rb') as f, np.load(f) as arrays:
    np.testing.assert_array_equal(arrays['mu'], np.ones(3))
