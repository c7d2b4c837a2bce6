"""Metric writers: CLU's where it imports, JSON lines and PNG files where it does not."""

import json
import logging
import sys

import numpy as np
from PIL import Image

from secant_jax import writers


def _without_clu(monkeypatch):
  for module in ('clu.metric_writers', 'clu.periodic_actions'):
    monkeypatch.setitem(sys.modules, module, None)


def test_without_clu_scalars_go_to_json_lines_and_images_to_png(tmp_path, monkeypatch):
  _without_clu(monkeypatch)
  writer = writers.create(str(tmp_path))
  assert isinstance(writer, writers.FileWriter)
  writer.write_scalars(3, {'loss': np.float32(0.5)})
  writer.write_scalars(4, {'loss': 0.25, 'lr': 1e-4})
  writer.write_images(4, {'eval/samples': np.full((1, 4, 6, 1), 0.5, np.float32)})
  writer.flush()
  lines = [json.loads(line) for line in open(tmp_path / 'scalars.jsonl')]
  assert lines == [{'step': 3, 'loss': 0.5}, {'step': 4, 'loss': 0.25, 'lr': 1e-4}]
  image = np.asarray(Image.open(tmp_path / 'images' / 'eval_samples_4.png'))
  assert image.shape == (4, 6) and (image == 128).all()


def test_without_clu_other_processes_only_log(tmp_path, monkeypatch):
  _without_clu(monkeypatch)
  writer = writers.create(str(tmp_path / 'w'), just_logging=True)
  writer.write_scalars(1, {'loss': 1.0})
  assert not (tmp_path / 'w').exists()


def test_without_clu_the_step_rate_is_logged(monkeypatch, caplog):
  _without_clu(monkeypatch)
  report = writers.progress(1000, writers.FileWriter('', just_logging=True))
  assert isinstance(report, writers.StepRate)
  caplog.set_level(logging.INFO)
  for step in range(1, 201):
    report(step)
  rates = [r.getMessage() for r in caplog.records if 'steps/s' in r.getMessage()]
  assert [m.split(':')[0] for m in rates] == ['step 100', 'step 200']
  assert rates[-1].endswith('s left')


def test_with_clu_the_default_tensorboard_writer(tmp_path):
  writer = writers.create(str(tmp_path))
  assert not isinstance(writer, writers.FileWriter)
  writer.write_scalars(1, {'loss': 1.0})
  writer.flush()
  assert any(p.name.startswith('events.out.tfevents') for p in tmp_path.iterdir())
