"""--config.mode=compare: the comparison table (evaluation.comparison) of a finished teacher
run and its secant runs, with the Fréchet distance of config.fid's feature network when its
weights are set (FD-FMNIST on Fashion-MNIST).

config.compare: teacher (the teacher's run directory; '' for this config's own teacher, a
converted checkpoint: config.teacher_checkpoint or config.init_checkpoint, built as
config.model on config.path, e.g. SiT-XL/2 from configs/imagenet_sit.py), secants
('name=run_dir,...'), teacher_nfe, secant_steps (each secant run is also sampled with the
step count it was trained for), num_samples, batch_size, guidance_scale,
step_errors (NFEs whose rows also get the error of each step alone, a table per grid
after the main one; evaluation.step_errors), references. A run directory is one a
training run wrote: its config.json says how to build and sample the model, its ema/
holds the weights. Every network computes in float32 with float32 products, whatever the
runs trained in (config.compare_in_float32; see evaluation.reference_error). Writes
workdir/table.md, table.json, samples/<row>.png, samples.png (on latent data, the SD-VAE
decoder's images, config.fid.vae; without it no grids) and CLU scalars; while it
runs, it saves the running sums every config.eval_save_seconds and on SIGTERM or Ctrl-C,
which stop it there (exit status 75; evaluation.progress), so the same command resumes a
preempted comparison. The saves are stamped with
config.compare (`stamped_settings`), config.seed, config.fid, the precision, the process
count and a digest of each model's weights (evaluation.progress.weights_digest): a run
retrained into the same directory is refused by name, not taken for the one compared
before. A secant run whose teacher.json says it learnt from other teacher weights than the
table's is refused (`loop.check_learnt_from`). With compare.references set, the teacher's
reference solutions are kept there (evaluation.references) and read back by any later
comparison with the same teacher (path and weights), guidance_scale, seed, num_samples,
batch_size and precision.
"""

import functools
import os

import jax

from secant_jax import files
from secant_jax import generate
from secant_jax import sample_images
from secant_jax.convert import common
from secant_jax.evaluation import comparison
from secant_jax.evaluation import features
from secant_jax.evaluation import progress
from secant_jax.evaluation import reference_error
from secant_jax.evaluation import references
from secant_jax.evaluation import sample_quality
from secant_jax.train import loop
from secant_jax.train import parallel


def parse_runs(spec):
  """'sdei=runs/a,stee=runs/b' → [('sdei', 'runs/a'), ('stee', 'runs/b')]."""
  runs = []
  for item in filter(None, spec.split(',')):
    name, sep, run_dir = item.partition('=')
    if not sep or not name or not run_dir:
      raise ValueError(f'Bad secant run {item!r} in config.compare.secants: expected '
                       'name=run_dir, e.g. sdei=runs/fmnist-sdei,stee=runs/fmnist-stee.')
    runs.append((name, run_dir))
  return runs


def teacher_of(config):
  """(config, weights directory) of the compared teacher: config.compare.teacher's run, or
  the config's own converted teacher."""
  if config.compare.teacher:
    return common.load_run(config.compare.teacher)
  converted = config.teacher_checkpoint or config.init_checkpoint
  if not converted:
    raise ValueError('The comparison needs a teacher: set --config.compare.teacher to the '
                     '--workdir of its training run, or config.teacher_checkpoint to its '
                     'converted weights (and --config.compare.secants to its secant runs, '
                     'name=run_dir,...).')
  return config, common.existing_checkpoint(converted)


def check_same_path(name, run_dir, run_config, teacher_config):
  """A secant run must sample the teacher's ODE: trained on the same kind of path (its
  limits may differ, see evaluation.comparison), else its error to the teacher's
  reference would compare points of different spaces."""
  if run_config.path.name != teacher_config.path.name:
    raise ValueError(f'Secant run {name} ({run_dir}) was trained on the '
                     f'{run_config.path.name!r} path and the teacher on the '
                     f'{teacher_config.path.name!r} path: a table compares samplers of the '
                     "teacher's ODE; compare it with a teacher trained on its path.")


def check_step_errors(nfes, samplers):
  """Every NFE in config.compare.step_errors must be some row's, else the breakdown
  asked for would silently be missing."""
  have = sorted({s.nfe for s in samplers})
  missing = [n for n in nfes if n not in have]
  if missing:
    raise ValueError(f'config.compare.step_errors has {missing}, which no row of the table '
                     f'has in its NFE column (the rows have {have}): pick from those (a '
                     'teacher row is named by the NFE it spends, e.g. EDM\'s Heun asked for '
                     '4 spends 3; a secant row by its steps).')


def stamped_settings(compare_config):
  """config.compare as the progress of a comparison is stamped with: without `references`
  (where the teacher's solutions are kept does not change the table), and without
  `step_errors` when there are none, so that progress saved before that option existed
  resumes."""
  return {k: v for k, v in compare_config.to_dict().items()
          if k != 'references' and (k != 'step_errors' or v)}


def compare(config, workdir):
  """Returns the table's rows."""
  with reference_error.precision_scope(config):
    return _compare(config, workdir)


def _compare(config, workdir):
  c = config.compare
  teacher_config, teacher_weights = teacher_of(config)
  images_of = None  # latent samples without the decoder: no grids
  if not sample_images.images_unavailable(config, 'The sample grids (samples/, samples.png)'):
    images_of = functools.partial(  # the decoder on the device once, not for every row
        sample_images.as_images, jax.device_put(sample_images.load_decoder(config,
                                                                           'Sample grids')))
  workdir = files.make_directory(workdir)
  mesh = parallel.make_mesh(config.fsdp)
  parallel.check_batch_size(c.batch_size, mesh, 'config.compare.batch_size')
  network, task, tangent_of, teacher_variables = comparison.teacher(
      teacher_config, teacher_weights, c.guidance_scale, config.compare_in_float32, mesh)
  teacher_digest = progress.weights_digest(teacher_variables)
  samplers = comparison.teacher_samplers(task, tangent_of, c.teacher_nfe)
  added_steps = {}
  for name, run_dir in parse_runs(c.secants):
    run_config, ema_dir = common.load_run(run_dir)
    check_same_path(name, run_dir, run_config, teacher_config)
    loop.check_learnt_from(run_dir, lambda: teacher_variables, config.allow_config_change)
    loop.warn_outside_guidance('Compare mode', run_dir, run_config.secant.guidance,
                               c.guidance_scale, 'config.compare.guidance_scale')
    steps = tuple(c.secant_steps)
    if run_config.secant.steps not in steps:  # after the rows asked for, which keep their order
      added_steps[name] = run_config.secant.steps
      steps += (run_config.secant.steps,)
    samplers += comparison.secant_samplers(f'secant {name}', run_config, ema_dir, steps,
                                           c.guidance_scale, config.compare_in_float32, mesh)
  check_step_errors(c.step_errors, samplers)
  noise, labels = generate.fixed_noise_and_labels(
      config.seed + 1, c.num_samples, network.image_shape, network.num_classes)
  quality = (sample_quality.SampleQuality(config, workdir, mesh)
             if features.configured(config.fid) else None)
  stamp = {'compare': stamped_settings(c),
           'seed': config.seed, 'fid': config.fid.to_dict(),
           'latent_scale': config.data.get('latent_scale'),  # what the decoder divides by
           'compare_in_float32': config.compare_in_float32,
           'matmul_precision': reference_error.precision(config),
           'processes': jax.process_count(),
           'weights': {'teacher': teacher_digest,
                       **{s.name: s.weights for s in samplers if s.weights}}}
  if not c.teacher:
    stamp['teacher_weights'] = teacher_weights
  if added_steps:  # saved sums are per row, so a save without these rows must not resume
    stamp['added_steps'] = added_steps
  kept = None
  if c.references:
    kept = references.References(c.references, {
        'teacher': files.absolute(c.teacher or teacher_weights),
        'teacher_digest': teacher_digest, 'guidance_scale': c.guidance_scale,
        'seed': config.seed, 'num_samples': c.num_samples, 'batch_size': c.batch_size,
        'compare_in_float32': config.compare_in_float32,
        'matmul_precision': reference_error.precision(config)})
  with progress.stop_requests_of_an_evaluation() as stop:
    rows, firsts = comparison.compare(
        samplers, task, tangent_of, noise, labels, c.batch_size, mesh, quality,
        progress.Progress(workdir, stamp, config.eval_save_seconds, stop), kept,
        tuple(c.step_errors))
  table = '\n\n'.join(filter(None, [comparison.format_table(rows),
                                    comparison.format_step_tables(rows)]))
  if jax.process_index() == 0:
    files.write_text(os.path.join(workdir, 'table.md'), table + '\n')
    files.write_json(os.path.join(workdir, 'table.json'),
                     {'num_samples': c.num_samples, 'guidance_scale': c.guidance_scale,
                      'rows': rows})
  comparison.write_results(rows, firsts, workdir, images_of)
  print(table)
  return rows
