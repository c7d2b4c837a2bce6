"""--config.mode=evaluate: the run's EMA export (workdir/ema) sampled with the config's steps
and guidance (a config of another model than the run's config.json is refused:
`loop.check_trained_model`), scored by

- its integration error to the teacher's reference ODE solution from the same noise, next
  to the teacher's own Euler and Heun at the same number of guided evaluations (when the
  config names a teacher: the one the run learnt from, `loop.check_learnt_from`), and
- FID and Inception Score (or the Fréchet distance of another feature network) over
  config.fid.num_samples samples, when config.fid names the network's weights (see
  evaluation.sample_quality); with config.fid.image_dir set, these samples are also
  written there as PNG images, for another evaluator (torch-fidelity reads the folder).

Written to workdir/eval.json and as CLU scalars under workdir/eval. While the FID samples
are scored, and then the integration error's batches solved, their running sums are saved
(to workdir/eval and workdir/eval/integration_error) every config.eval_save_seconds and on
SIGTERM or Ctrl-C, which stop the run there (exit status 75; evaluation.progress), so the
same command resumes a stopped evaluation; the saves are stamped with a digest of the
weights and the settings that decide the samples and their scores, and deleted once
eval.json is written (a later evaluation, e.g. after more training, starts afresh).
"""

import contextlib
import os

import jax
from jax.experimental import multihost_utils

from secant_jax import files
from secant_jax import generate
from secant_jax import writers
from secant_jax.evaluation import comparison
from secant_jax.evaluation import features
from secant_jax.evaluation import progress
from secant_jax.evaluation import reference_error
from secant_jax.evaluation import sample_quality
from secant_jax.train import loop
from secant_jax.train import parallel
from secant_jax.train import recipe


def integration_error(config, workdir, variables, digest, mesh, stop):
  """{'num_samples', 'secant', 'teacher_euler', 'teacher_heun', 'teacher_heun_nfe'}: RMS
  errors to the teacher's reference of the secant model (`variables`) and of the teacher's
  Euler and Heun at its steps' NFE (Heun's spent count: evaluation.comparison's rows),
  from config.num_eval_samples noises in batches of at most config.compare.batch_size over
  `mesh`, every network computing as evaluation.reference_error measures. Its running
  sums, stamped with `digest` (progress.weights_digest of `variables`), are saved in
  workdir/eval/integration_error as the FID's are, and it stops where `stop` (a
  stop_requests.StopRequests) asks. Returns (those errors, the Progress, whose
  saves go once the result is written)."""
  measured = reference_error.measured_config(config, config.compare_in_float32)
  network = recipe.make_network(measured, mesh)
  task = recipe.make_task(measured, network)
  teacher, teacher_variables = loop.teacher_of(measured, jax.random.key(config.seed), mesh)
  _, scale = generate.sampler_secant(network, task, variables, config.secant)
  tangent_of = lambda y: reference_error.teacher_tangent(teacher, teacher_variables, task, y,
                                                         scale)
  samplers = comparison.teacher_samplers(task, tangent_of, [task.num_steps]) + [
      comparison.Sampler('secant', task.num_steps, lambda y: generate.secant_steps(
          network, task, variables, config.secant, y))]
  count = config.num_eval_samples
  noise, labels = generate.fixed_noise_and_labels(config.seed + 1, count,
                                                  network.image_shape, network.num_classes)
  batch = min(config.compare.batch_size, parallel.batch_of_all(count, mesh))
  stamp = {'weights': digest,
           'teacher': progress.weights_digest(teacher_variables), 'seed': config.seed,
           'num_eval_samples': count, 'batch_size': batch, 'model': config.model.to_dict(),
           'path': config.path.to_dict(), 'secant': config.secant.to_dict(),
           'compare_in_float32': config.compare_in_float32,
           'matmul_precision': reference_error.precision(config),
           'processes': jax.process_count()}
  directory = files.make_directory(os.path.join(workdir, 'eval', 'integration_error'))
  saves = progress.Progress(directory, stamp, config.eval_save_seconds, stop)
  with reference_error.precision_scope(config):
    rows, _ = comparison.compare(samplers, task, tangent_of, noise, labels, batch, mesh,
                                 progress=saves)
  euler, heun, secant = rows[1:]
  return {'num_samples': count, 'secant': secant['error'], 'teacher_euler': euler['error'],
          'teacher_heun': heun['error'], 'teacher_heun_nfe': heun['nfe']}, saves


def fid_progress(config, workdir, digest, stop):
  """The Progress of the FID samples of the weights whose progress.weights_digest is
  `digest`, in workdir/eval, stopping the run where `stop` (a stop_requests.StopRequests)
  asks."""
  stamp = {'weights': digest, **sample_quality.samples_stamp(config)}
  return progress.Progress(files.make_directory(os.path.join(workdir, 'eval')), stamp,
                           config.eval_save_seconds, stop)


def evaluate(config, workdir):
  """Returns the result dict that it writes."""
  loop.check_trained_model(config, workdir, 'Evaluate mode')
  has_teacher = bool(config.teacher_checkpoint or config.init_checkpoint)
  scored = features.configured(config.fid)
  if not (has_teacher or scored):
    raise ValueError(f'Nothing to evaluate: set config.fid.{config.fid.features} (the '
                     'weights of the feature network: FID, Inception Score) and/or '
                     'config.teacher_checkpoint (error to the teacher\'s ODE).')
  if has_teacher:  # before the FID samples, which the integration error comes after
    loop.check_learnt_from(workdir, lambda: loop.load_teacher(config, jax.random.key(0))[1],
                           config.allow_config_change)
  mesh = parallel.make_mesh(config.fsdp)
  network = recipe.make_network(config, mesh)
  task = recipe.make_task(config, network)
  variables = loop.load_into(network, os.path.join(workdir, 'ema'), jax.random.key(0))
  _, scale = generate.sampler_secant(network, task, variables, config.secant)
  result = {'steps': task.num_steps, 'guidance_scale': scale}
  if task.variant == 'diffusion':  # sampled by Heun (generate.model_sample)
    result['teacher_sample_nfe'] = config.teacher_sample_nfe
  digest = progress.weights_digest(variables)  # both parts' stamps: computed once
  saves = []  # each part's Progress, cleared once eval.json is written
  # The FID part first: saves of another evaluation are refused before anything is
  # computed, and a run stopped there has not spent the integration error's solves.
  with progress.stop_requests_of_an_evaluation() as stop:
    if scored:
      quality = sample_quality.SampleQuality(config, workdir, mesh)
      saves.append(fid_progress(config, workdir, digest, stop))
      result.update(quality(network, task, variables, config.fid.num_samples,
                            config.seed + 2, saves[-1], config.fid.image_dir),
                    num_fid_samples=config.fid.num_samples)
    if has_teacher:
      errors, error_progress = integration_error(config, workdir, variables, digest,
                                                 mesh, stop)
      result.update(errors)
      saves.append(error_progress)
  if jax.process_index() == 0:
    files.write_json(os.path.join(workdir, 'eval.json'), result)
  with contextlib.closing(writers.create(os.path.join(workdir, 'eval'),
                                         just_logging=jax.process_index() > 0)) as writer:
    writer.write_scalars(task.num_steps, {k: v for k, v in result.items()
                                          if isinstance(v, float)})
  if jax.process_count() > 1:  # no process deletes its saves before eval.json is written
    multihost_utils.sync_global_devices('eval.json written')
  for part in saves:
    part.clear()
  return result
