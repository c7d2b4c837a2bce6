"""The demo (configs/demo.py): teacher → SDEI and STEE secant models → error table.

Each stage is an ordinary training run of `train.loop` with a derived config, in its own
subdirectory of the workdir (so a rerun resumes stopped stages, and checks finished ones
against the config: more steps train on, other settings are refused); the evaluation
(evaluation.comparison) compares, from the same noise and labels, secant samples with the
teacher's Euler and Heun at equal NFE, all measured as RMS distance to the teacher's
adaptive reference solution of its own (guided) ODE.
"""

import os

from etils import epath

from secant_jax import config as config_lib
from secant_jax import files
from secant_jax import generate
from secant_jax.evaluation import comparison
from secant_jax.evaluation import reference_error
from secant_jax.train import loop
from secant_jax.train import parallel


# The demo's own settings that would otherwise fail only after its stages trained (as
# config.SETTING_RANGES, checked by `run` first).
DEMO_RANGES = (
    ('demo.sdei_step_counts', '[1, inf)', 'the step counts of the SDEI models'),
    ('demo.eval_step_counts', '[1, inf)', 'the step counts the table compares'),
    ('demo.num_eval', '[1, inf)', 'the samples the table scores'),
    ('demo.secant_learning_rate', '[0, inf)', "the secant stages' learning rate"),
)


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
  """(the stage's EMA export, whether it trained now): a new stage trains, a stopped one
  resumes, and a finished one is only restored and checked, so that a rerun with more
  steps trains on and one with other settings is refused (train.loop), not skipped."""
  _, history = loop.train_and_evaluate(config, stage_dir)
  return os.path.join(stage_dir, 'ema'), bool(history)


def check_no_secant_stages(workdir, stage_names):
  """Refuses secant stages in `workdir` that an earlier teacher trained: called when the
  teacher stage has just trained on (more teacher steps), whose secant models would
  otherwise be compared with a teacher they were not trained from."""
  earlier = [name for name in stage_names if epath.Path(workdir, name).exists()]
  if earlier:
    raise ValueError(f'The teacher in {workdir}/teacher has trained further, and the secant '
                     f'stages {", ".join(earlier)} there were trained from its earlier '
                     'weights: delete them to train them from this teacher, or run the demo '
                     'in a new --workdir.')


def evaluate(config, workdir, teacher_dir, secant_runs):
  """The comparison table (evaluation.comparison) of the teacher's solvers and the secant
  runs ({name: [(stage config, EMA dir, step counts)]}); writes samples.png and CLU
  scalars, returns the rows."""
  d = config.demo
  teacher_config, _ = stage_config(config, workdir, 'teacher', 'diffusion', 1, 1)
  float32 = config.compare_in_float32
  mesh = parallel.make_mesh(config.fsdp)
  network, task, tangent_of, _ = comparison.teacher(teacher_config, teacher_dir,
                                                     d.eval_scale, float32, mesh)
  noise, labels = generate.fixed_noise_and_labels(config.seed + 1, d.num_eval,
                                                  network.image_shape, network.num_classes)
  samplers = comparison.teacher_samplers(task, tangent_of, d.eval_step_counts)
  for name, runs in secant_runs.items():
    for run_config, ema_dir, steps in runs:
      samplers += comparison.secant_samplers(name, run_config, ema_dir, steps, d.eval_scale,
                                             float32, mesh)
  with reference_error.precision_scope(config):
    rows, firsts = comparison.compare(samplers, task, tangent_of, noise, labels,
                                      parallel.batch_of_all(d.num_eval, mesh), mesh)
  comparison.write_results(rows, firsts, workdir)
  return rows


def run(config, workdir):
  """All stages and the evaluation; writes workdir/metrics.json and samples.png."""
  d = config.demo
  config_lib.check_setting_ranges(config, DEMO_RANGES)
  workdir = files.absolute(workdir)
  c, stage_dir = stage_config(config, workdir, 'teacher', 'diffusion', 1, d.teacher_steps)
  teacher_dir, teacher_trained = train_stage(c, stage_dir)
  if teacher_trained:
    check_no_secant_stages(workdir, [f'sdei-{n}' for n in d.sdei_step_counts] + ['stee'])
  secant_runs = {'secant SDEI': [], 'secant STEE': []}
  for n in d.sdei_step_counts:  # one SDEI model per step count
    c, stage_dir = stage_config(config, workdir, f'sdei-{n}', 'sdei', n, d.sdei_steps,
                                init=teacher_dir, teacher=teacher_dir)
    secant_runs['secant SDEI'].append((c, train_stage(c, stage_dir)[0], [n]))
  c, stage_dir = stage_config(config, workdir, 'stee', 'stee', 1, d.stee_steps,
                              init=teacher_dir)  # one STEE model for every step count
  secant_runs['secant STEE'].append((c, train_stage(c, stage_dir)[0], d.eval_step_counts))
  rows = evaluate(config, workdir, teacher_dir, secant_runs)
  files.write_json(os.path.join(workdir, 'metrics.json'),
                   {'guidance_scale': d.eval_scale, 'num_samples': d.num_eval, 'rows': rows})
  print(comparison.format_table(rows))
  return rows
