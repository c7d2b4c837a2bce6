"""The demo (configs/demo.py): teacher → SDEI and STEE secant models → error table.

Each stage is an ordinary training run of `train.loop` with a derived config, in its own
subdirectory of the workdir (so a re-run resumes or skips finished stages); the evaluation
compares, from the same noise and labels, secant samples with the teacher's Euler and Heun
at equal NFE, all measured as RMS distance to the teacher's adaptive reference solution of
its own (guided) ODE.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from clu import metric_writers
from PIL import Image

from secant_jax import config as config_lib
from secant_jax import generate
from secant_jax import sampling
from secant_jax.evaluation import reference_error
from secant_jax.models import registry
from secant_jax.train import loop
from secant_jax.train import recipe


def stage_config(config, workdir, name, variant, steps, num_train_steps, init='',
                 teacher=''):
  c = config.copy_and_resolve_references()
  with c.unlocked():
    del c.demo
    c.mode = 'train'
    c.secant = config_lib.secant_config(variant, steps, guidance=tuple(config.demo.guidance))
    c.num_train_steps = num_train_steps
    c.init_checkpoint = init
    c.teacher_checkpoint = teacher
    if init:
      c.optimizer.learning_rate = config.demo.secant_learning_rate
  return c, os.path.join(workdir, name)


def train_stage(config, stage_dir):
  if not os.path.isdir(os.path.join(stage_dir, 'ema')):
    loop.train_and_evaluate(config, stage_dir)
  return os.path.join(stage_dir, 'ema')


def evaluate(config, workdir, teacher_dir, secant_dirs):
  """The error table and a sample grid; returns the rows."""
  d = config.demo
  teacher_config, _ = stage_config(config, workdir, 'teacher', 'diffusion', 1, 1)
  teacher_net = registry.build(teacher_config.model, guided=False)
  teacher_vars = loop.load_into(teacher_net, teacher_dir, jax.random.key(0))
  task = recipe.make_task(teacher_config, teacher_net)
  noise, labels = generate.fixed_noise_and_labels(config.seed + 1, d.num_eval,
                                                  teacher_net.image_shape, 10)
  scale = jnp.full((d.num_eval,), d.eval_scale, jnp.float32)
  tangent = reference_error.teacher_tangent(
      task.path, lambda *a: teacher_net.apply(teacher_vars, *a), teacher_net.null_class,
      labels, scale)
  reference = jax.jit(lambda n: sampling.reference_sample(tangent, n, task.path))(noise)
  rows, grid = [], [reference[:10]]
  for nfe in d.eval_step_counts:
    row = {'nfe': nfe, **reference_error.teacher_solver_errors(tangent, noise, task.path,
                                                               reference, nfe)}
    for variant, dirs in secant_dirs.items():
      stage, secant_dir = dirs.get(nfe, dirs.get('any'))
      net = registry.build(stage.model, guided=stage.secant.guidance is not None)
      secant_task = recipe.make_task(stage, net)
      sample_config = stage.secant.copy_and_resolve_references()
      with sample_config.unlocked():
        sample_config.sample_guidance_scale = d.eval_scale
        sample_config.sample_cfg_scale = d.eval_scale
      variables = loop.load_into(net, secant_dir, jax.random.key(0))
      x = jax.jit(lambda v: generate.sample(net, secant_task, v, sample_config, noise, labels,
                                            nfe))(variables)
      row[variant] = reference_error.rms(x, reference)
      grid.append(x[:10])
    rows.append(row)
  image = generate.image_grid(np.concatenate([np.asarray(g) for g in grid]), columns=10)
  Image.fromarray((image[..., 0] * 255).round().astype(np.uint8)).resize(
      (image.shape[1] * 4, image.shape[0] * 4), Image.NEAREST).save(
          os.path.join(workdir, 'samples.png'))
  writer = metric_writers.create_default_writer(os.path.join(workdir, 'eval'),
                                                just_logging=jax.process_index() > 0)
  for row in rows:
    writer.write_scalars(row['nfe'], {k: v for k, v in row.items() if k != 'nfe'})
  writer.write_images(0, {'samples': image[None]})
  writer.flush()
  return rows


def format_rows(rows, variants):
  head = '| NFE | ' + ' | '.join(f'secant {v.upper()}' for v in variants) + \
         ' | teacher Euler | teacher Heun |'
  lines = [head, '|' + '---|' * (len(variants) + 3)]
  for r in rows:
    lines.append(f"| {r['nfe']} | " + ' | '.join(f'{r[v]:.4f}' for v in variants) +
                 f" | {r['teacher_euler']:.4f} | {r['teacher_heun']:.4f} |")
  return '\n'.join(lines)


def run(config, workdir):
  """All stages and the evaluation; writes workdir/metrics.json and samples.png."""
  d = config.demo
  workdir = os.path.abspath(workdir)
  c, stage_dir = stage_config(config, workdir, 'teacher', 'diffusion', 1, d.teacher_steps)
  teacher_dir = train_stage(c, stage_dir)
  secant_dirs = {'sdei': {}, 'stee': {}}
  for n in d.sdei_step_counts:
    c, stage_dir = stage_config(config, workdir, f'sdei-{n}', 'sdei', n, d.sdei_steps,
                                init=teacher_dir, teacher=teacher_dir)
    secant_dirs['sdei'][n] = (c, train_stage(c, stage_dir))
  c, stage_dir = stage_config(config, workdir, 'stee', 'stee', 1, d.stee_steps,
                              init=teacher_dir)
  secant_dirs['stee']['any'] = (c, train_stage(c, stage_dir))
  rows = evaluate(config, workdir, teacher_dir, secant_dirs)
  with open(os.path.join(workdir, 'metrics.json'), 'w') as f:
    json.dump({'guidance_scale': d.eval_scale, 'num_samples': d.num_eval, 'rows': rows}, f,
              indent=2)
  print(format_rows(rows, list(secant_dirs)))
  return rows
