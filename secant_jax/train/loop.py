"""The training loop: config → data → jitted step → writers and checkpoints.

`train_and_evaluate(config, workdir)` resumes from the latest checkpoint in
workdir/checkpoints when there is one (state, EMA, optimizer, rng and data position), and
otherwise starts from config.init_checkpoint (a converted teacher) or a random init. When
the run completes it exports the EMA variables to workdir/ema, a converted checkpoint that
a later run can start from or use as its teacher; a run stopped on SIGTERM (a preemption, a
scheduler's time limit) or Ctrl-C saves a checkpoint and raises stop_requests.Stopped
instead (during an FID, its progress too: train.periodic_fid).
"""

import contextlib
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from flax import traverse_util
from jax.experimental import multihost_utils

from secant_jax import config as config_lib
from secant_jax import files
from secant_jax import generate
from secant_jax import sample_images
from secant_jax import stop_requests
from secant_jax import writers
from secant_jax.convert import common
from secant_jax.convert import sit as convert_sit
from secant_jax.data import pipeline
from secant_jax.evaluation import progress
from secant_jax.models import registry
from secant_jax.train import checkpoint
from secant_jax.train import memory
from secant_jax.train import parallel
from secant_jax.train import periodic_fid
from secant_jax.train import rate as rate_lib
from secant_jax.train import recipe
from secant_jax.train import state as state_lib
from secant_jax.train import step as step_lib
from secant_jax.train import step_trace


def load_into(network, directory, key):
  """A converted checkpoint's variables fitted to `network` (a teacher's fill a secant
  model: the s-embedder copies the t-embedder, a guidance embedder starts at init from
  `key`). Fresh variables are made only for such a module: a checkpoint that holds them all
  is fitted to their shapes (SiT-XL/2's init: 9 s and 2.7 GB on a CPU)."""
  saved = traverse_util.flatten_dict(common.load_variables(directory))
  try:
    return common.fit(saved, network.abstract_variables(), fresh=lambda: network.init(key),
                      **convert_sit.TEACHER_TO_SECANT)
  except common.ConversionError as e:
    raise common.ConversionError(f'Checkpoint {directory} does not fit the configured model: '
                                 f'{e}') from None


def load_teacher(config, key, mesh=None):
  """(teacher network, variables): the same architecture without the guidance input, for
  programs that split its batch over `mesh` (`registry.build`), and its variables as its
  checkpoint holds them."""
  path = config.teacher_checkpoint or config.init_checkpoint
  if not path:
    raise ValueError(f'Variant {config.secant.variant!r} needs a teacher: set '
                     'config.teacher_checkpoint (or config.init_checkpoint) to a converted '
                     'checkpoint.')
  teacher = registry.build(config.model, guided=False, mesh=mesh)
  return teacher, load_into(teacher, path, key)


def teacher_of(config, key, mesh=None):
  """`load_teacher`'s network and its frozen variables as it computes with them
  (`Network.inference_variables`: bf16 for a bf16 DiT, so the step neither holds nor
  re-casts an fp32 copy)."""
  teacher, variables = load_teacher(config, key, mesh)
  return teacher, teacher.inference_variables(variables)


def _config_changes(config, workdir, resumed_step):
  """The settings outside config.RESUMABLE_CHANGES in which `config` differs from the
  config.json of a run resumed from `resumed_step` (none for a new run). Such changes are
  refused, listed, before anything is restored, unless config.allow_config_change."""
  path = os.path.join(workdir, 'config.json')
  if resumed_step is None or not epath.Path(path).exists():
    return []
  changes = config_lib.changed_settings(files.read_json(path),
                                        json.loads(config.to_json_best_effort()))
  if changes and not config.allow_config_change:
    raise ValueError(
        f'The run in {workdir} trained up to step {resumed_step} with another config '
        f'({len(changes)} settings differ from its config.json: {_shown(changes)}). Resume '
        'with the config it was saved with, start the changed run in a new --workdir, or go '
        'on with the change on purpose with --config.allow_config_change=True (config.json '
        f'of the steps before is then kept as config.step_{resumed_step}.json).')
  return changes


def _shown(changes):
  return '; '.join(changes[:4]) + ('; ...' if len(changes) > 4 else '')


def check_trained_model(config, workdir, mode):
  """Refuses to read workdir/ema in `mode` (e.g. 'Sample mode') under a config that differs
  from the run's config.json in what its model is (config.MODEL_SETTINGS; a forgotten
  :variant=stee would sample an STEE model as SDEI, its guidance embedder at init and
  without its CFG), unless allow_config_change. A secant model sampled in other steps
  than it trained for is logged, and one with embedded guidance sampled at a scale outside
  the range it trained on (config.secant.sample_guidance_scale; its guidance input then
  extrapolates) is warned of. A workdir without config.json (a converted checkpoint placed
  in RUN/ema) is not checked."""
  path = os.path.join(workdir, 'config.json')
  if not epath.Path(path).exists():
    return
  saved = files.read_json(path)
  changes = config_lib.changed_settings(saved, json.loads(config.to_json_best_effort()),
                                        only=config_lib.MODEL_SETTINGS,
                                        free=config_lib.SAMPLING_CHOICES)
  variant, trained = saved['secant']['variant'], saved['secant']['steps']
  if changes and not config.allow_config_change:
    raise ValueError(
        f'{mode} reads the model that the run in {workdir} trained, and the config differs '
        f'from its config.json in what that model is ({_shown(changes)}): it would sample '
        f'as another model. Give the --config the run trained with (variant {variant!r}, '
        f'steps {trained}; {path} holds every setting), or read it so on purpose with '
        '--config.allow_config_change=True.')
  if variant != 'diffusion' and config.secant.steps != trained:
    logging.info('%s samples the run in %s in %d steps; it trained for %d.', mode, workdir,
                 config.secant.steps, trained)
  warn_outside_guidance(mode, workdir, saved['secant'].get('guidance'),
                        config.secant.sample_guidance_scale, 'config.secant.sample_guidance_scale')


def warn_outside_guidance(mode, run_dir, trained_range, scale, setting):
  """Warns that the run in `run_dir`, whose embedded guidance trained on the scales
  `trained_range` (None: no guidance input), is sampled at `scale`, given by `setting`,
  outside that range, where its guidance input extrapolates."""
  if trained_range and not trained_range[0] <= scale <= trained_range[1]:
    logging.warning('%s samples the run in %s at the guidance scale %g, outside the range '
                    '[%g, %g] it trained on: its guidance input extrapolates. Set %s '
                    'inside it to sample as it learnt.', mode, run_dir, scale, *trained_range,
                    setting)


TEACHER_RECORD = 'teacher.json'


def _check_teacher(config, workdir, resumed_step, teacher_digest):
  """Records in workdir/teacher.json a digest of the teacher's weights (as the step computes
  with them) that a new run learns from, and refuses to resume a run whose teacher's
  weights have changed since, at the same path (a teacher trained on, or converted again
  from another file or key), unless allow_config_change: its steps so far learnt from the
  earlier teacher. `teacher_digest`: `progress.weights_digest` of the teacher's variables;
  for a run whose steps use no teacher (STEE), of those the config names all the same
  (teacher_checkpoint, by default the init_checkpoint it starts from), where it starts
  (resumed, it does not read them); None otherwise, which records nothing."""
  if teacher_digest is None:
    return
  path = os.path.join(workdir, TEACHER_RECORD)
  record = {'checkpoint': config.teacher_checkpoint or config.init_checkpoint,
            'digest': teacher_digest}
  if resumed_step is not None and epath.Path(path).exists():
    recorded = files.read_json(path)
    if recorded['digest'] == record['digest']:
      return
    if not config.allow_config_change:
      raise ValueError(
          f'The teacher weights in {record["checkpoint"]} are not those the run in {workdir} '
          f'learnt its {resumed_step} steps from (its {TEACHER_RECORD}: those in '
          f'{recorded["checkpoint"]} then; trained on or converted again since?): resume with '
          'those weights, start a new --workdir for these, or go on with them on purpose '
          'with --config.allow_config_change=True.')
    logging.warning('Resuming at step %d with a changed teacher: %s', resumed_step,
                    record['checkpoint'])
  if jax.process_index() == 0:
    files.write_json(path, record)


def _named_teacher_digest(config, key):
  """For a run whose steps use no teacher (STEE): `progress.weights_digest` of the teacher
  its config names all the same (teacher_checkpoint, by default the init_checkpoint it
  starts from), as a teacher computes with it; None where it names none, or where that
  checkpoint is not a teacher's (a secant model's, guidance embedder and all: a run
  fine-tuned from a secant run, which has no teacher to be measured against)."""
  if not (config.teacher_checkpoint or config.init_checkpoint):
    return None
  try:
    return progress.weights_digest(teacher_of(config, key)[1])
  except common.ConversionError:
    return None


def check_learnt_from(run_dir, teacher_variables, allow_change):
  """Refuses to measure the secant run in `run_dir` against a teacher whose weights are not
  those it learnt from, unless `allow_change`: `teacher_variables()` (the teacher's, as its
  checkpoint holds them; called only where there is a record), cast as the run's train
  step held them (the model of its config.json), must have the digest that its
  teacher.json recorded (`_check_teacher`; an STEE run's: the weights it started from). A
  run without that record (one from random weights; from before the record) is not
  checked."""
  path = os.path.join(run_dir, TEACHER_RECORD)
  if allow_change or not epath.Path(path).exists():
    return
  recorded = files.read_json(path)
  run_config, _ = common.load_run(run_dir)
  held = registry.build(run_config.model, guided=False).inference_variables(
      teacher_variables())
  if progress.weights_digest(held) == recorded['digest']:
    return
  raise ValueError(
      f'The secant run in {run_dir} learnt from other teacher weights than these (its '
      f'{TEACHER_RECORD}: those in {recorded["checkpoint"]} when it trained; trained on or '
      'converted again since?): its error to this teacher\'s solutions would not measure '
      'what it learnt. Measure it against the teacher it learnt from, or against this one on '
      'purpose with --config.allow_config_change=True.')


def _warn_of_initial_weights_in_ema(config):
  """A warning where the exported EMA would keep more than 1% of the weights the run
  started from (random, or a teacher's), as a short run at a long-run decay does."""
  share = step_lib.ema_initial_share(config.ema_decay, config.ema_warmup,
                                     config.num_train_steps)
  if share > 0.01:
    logging.warning('The EMA at decay %g over %d steps keeps %.1f%% of the weights the run '
                    'starts from; set --config.ema_warmup=True or a lower ema_decay for an '
                    'EMA of the trained weights.', config.ema_decay, config.num_train_steps,
                    100 * share)


def _record_config(config, workdir, resumed_step, changes):
  """Writes workdir/config.json, the config the run trains with; where `changes` (allowed
  ones, `_config_changes`) were made on resume, the config.json of the steps up to
  `resumed_step` is kept as config.step_<resumed_step>.json."""
  path = os.path.join(workdir, 'config.json')
  if jax.process_count() > 1:  # every process has read config.json before it is replaced
    multihost_utils.sync_global_devices('config.json read')
  if jax.process_index() == 0:
    if changes:
      logging.warning('Resuming at step %d with changed settings: %s', resumed_step,
                      '; '.join(changes))
      files.write_text(os.path.join(workdir, f'config.step_{resumed_step}.json'),
                       epath.Path(path).read_text())
    files.write_text(path, config.to_json_best_effort(indent=2))


def check_labels(labels, num_classes, data_name):
  """Refuses class labels the network has no class for: each must be in 0 … num_classes − 1
  (a network of 0 classes, unconditional, takes none). Outside, a DiT's embedding lookup
  gives NaN (the run diverges, its loss naming no cause) and the U-Net's one-hot input is
  all zeros, the null class, so the label would be dropped without a word."""
  labels = np.asarray(labels)
  if num_classes and labels.size and not 0 <= labels.min() <= labels.max() < num_classes:
    bad = labels.max() if labels.max() >= num_classes else labels.min()
    raise ValueError(f'Dataset {data_name!r} gives the class label {bad}, and the model has '
                     f'{num_classes} classes, labels 0 to {num_classes - 1}: set '
                     "config.model.num_classes to the data's number of classes (or 0 for an "
                     'unconditional model), or fix config.data.')


def _global_batch(local, sharding):
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local.items()}


def _start_state(config, workdir, ckpts, abstract_state, data_iter, init):
  """The run's state: the latest checkpoint's (the data iterator set to its position), or
  `init()` placed like `abstract_state`. A run already past num_train_steps is an error."""
  restored = ckpts.restore_latest(abstract_state)
  if restored is not None:
    state, data_state = restored
    data_iter.set_state(data_state)
  else:
    state = jax.device_put(init(), jax.tree_util.tree_map(lambda a: a.sharding, abstract_state))
  if int(state.step) > config.num_train_steps:
    raise ValueError(f'The run in {workdir} is at step {int(state.step)}, past '
                     f'num_train_steps={config.num_train_steps}: set num_train_steps to '
                     f'{int(state.step)} or more to go on (its EMA export is of the last step '
                     'it trained), or start in a new --workdir.')
  return state


def _finite_means(window, window_steps, step, workdir):
  """Each metric's mean over the `window_steps` steps summed in `window` (None: none since
  the last log, {}). A non-finite one (a diverged run, whose parameters then are too) is a
  FloatingPointError, raised before the log that shows it and before any checkpoint save
  of its state: a run that diverges between two logs never replaces its checkpoints of the
  steps before with one of a non-finite state."""
  if window is None:
    return {}
  values = {k: float(v) / window_steps for k, v in jax.device_get(window).items()}
  if not all(np.isfinite(v) for v in values.values()):
    raise FloatingPointError(
        f'Non-finite loss or gradient norm in the {window_steps} steps up to step {step}: '
        f'{values}. Its state is not saved; the latest checkpoint in {workdir}/checkpoints '
        'is from before these steps.')
  return values


def train_and_evaluate(config, workdir):
  """Trains config.secant.variant for config.num_train_steps; returns (state, history),
  history being the logged metrics ({'step': ..., 'loss': ..., ...} per log step), each
  the mean over the steps since the previous log. Raises stop_requests.Stopped when SIGTERM
  or Ctrl-C stopped it before its last step or its last FID."""
  config_lib.check_setting_ranges(config)
  generate.guidance_interval(config.secant)  # the grids', and the exported model's sampler
  workdir = files.make_directory(workdir)
  mesh = parallel.make_mesh(config.fsdp)
  step_lib.check_microbatches(config.microbatches)  # before it divides the batch
  parallel.check_batch_size(config.batch_size, mesh, microbatches=config.microbatches)
  trace = step_trace.StepTrace(workdir, config.profile_skip_steps, config.profile_steps)

  network = recipe.make_network(config, mesh)
  task = recipe.make_task(config, network)
  k_init, k_teacher, k_state = jax.random.split(jax.random.key(config.seed), 3)
  teacher, teacher_variables = (teacher_of(config, k_teacher, mesh) if task.needs_teacher
                                else (None, None))
  teacher_digest = (progress.weights_digest(teacher_variables)  # on the host, before sharding
                    if teacher_variables is not None else None)
  optimizer = recipe.make_optimizer(config.optimizer)
  train_step = recipe.make_train_step(config, task, network, teacher, optimizer, mesh)
  _warn_of_initial_weights_in_ema(config)

  data_iter, record_shape = pipeline.build(config.data, config.batch_size, config.seed)
  if tuple(record_shape) != tuple(network.image_shape):
    raise ValueError(f'Dataset {config.data.name!r} gives records of shape {record_shape}, '
                     f'the model takes {network.image_shape}; fix config.model or config.data.')

  def init():
    variables = (load_into(network, config.init_checkpoint, k_init) if config.init_checkpoint
                 else network.init(k_init))
    return state_lib.create(variables, optimizer, k_state)

  abstract_state = jax.eval_shape(lambda: state_lib.create(
      network.init(k_init), optimizer, k_state))
  state_sharding = parallel.tree_sharding(abstract_state, mesh, config.fsdp > 1)
  teacher_sharding = (parallel.tree_sharding(teacher_variables, mesh, config.fsdp > 1)
                      if teacher_variables is not None else parallel.replicated(mesh))
  teacher_variables = jax.device_put(teacher_variables, teacher_sharding)
  step_fn = parallel.jit_train_step(train_step, state_sharding, teacher_sharding, mesh)
  batch_sharding = parallel.batch_sharding(mesh)
  schedule = recipe.learning_rate_schedule(config.optimizer)
  fid = periodic_fid.PeriodicFid(config, workdir, mesh) if config.eval_every else None
  decoder = (jax.device_put(sample_images.load_decoder(config, 'config.sample_every'))
             if config.sample_every else None)  # on the device once, not at every grid
  writer = writers.create(workdir, just_logging=jax.process_index() > 0)
  report = writers.progress(config.num_train_steps, writer)
  rate = rate_lib.of_run(task, network, config.batch_size)
  history = []
  # Closing the iterator stops its read-ahead threads: left running, they read on after
  # the run and a process exits only once they give up (a bucket gone: minutes of retries).
  with contextlib.closing(data_iter), contextlib.closing(writer), checkpoint.Checkpoints(
      os.path.join(workdir, 'checkpoints'), config.checkpoint_every,
      config.keep_checkpoints) as ckpts, trace:
    resumed_step = ckpts.latest_step
    changes = _config_changes(config, workdir, resumed_step)
    if teacher_digest is None and resumed_step is None:  # STEE's: where it starts
      teacher_digest = _named_teacher_digest(config, k_teacher)
    _check_teacher(config, workdir, resumed_step, teacher_digest)
    state = _start_state(config, workdir, ckpts,
                         checkpoint.abstract_like(abstract_state, state_sharding), data_iter, init)
    step = int(state.step)
    if step < config.num_train_steps:  # a finished run only exports its EMA again
      compiled_step = step_fn.lower(state, teacher_variables, parallel.batch_spec(
          config.batch_size, record_shape, mesh)).compile()
      memory.check_train_step_fits(compiled_step, config, jax.local_devices()[0])
    # after the restore and the compile, so that a checkpoint the config does not fit, and a
    # run it does not let fit in memory, keep their config.json
    _record_config(config, workdir, resumed_step, changes)
    window, window_steps = None, 0  # metrics summed on device since the last log

    def fid_written():
      """Whether the FID at `step` was written (not cut short by a stop)."""
      with rate.paused(state):
        scores = fid(network, task, state.ema_params, step, ckpts.stop)
      if scores is not None:
        writer.write_scalars(step, scores)
      return scores is not None

    def evaluate(fid_due):
      """The FID (where `fid_due`), then the sample grid where due at `step`, as a run never
      stopped writes them; returns whether a stop cut the FID short (the grid then waits for
      the resumed run, which finishes the FID first)."""
      cut = fid_due and not fid_written()
      if config.sample_every and step % config.sample_every == 0 and not cut:
        with rate.paused(state):
          write_samples(config, network, task, state.ema_params, writer, step, decoder)
      return cut

    fid_cut = fid is not None and fid.left_unfinished(step) and evaluate(fid_due=True)
    while step < config.num_train_steps and not fid_cut:
      with trace.step(step + 1, state):
        local = next(data_iter)
        check_labels(local['y'], network.num_classes, config.data.name)
        state, metrics = compiled_step(state, teacher_variables,
                                       _global_batch(local, batch_sharding))
      trace.stepped(state)
      window = metrics if window is None else jax.tree_util.tree_map(jnp.add, window, metrics)
      window_steps += 1
      step += 1
      report(step)
      if step % config.log_every == 0 or step == config.num_train_steps:
        values = _finite_means(window, window_steps, step, workdir)
        window, window_steps = None, 0
        values['learning_rate'] = float(schedule(step))
        values.update(rate.scalars(step))
        writer.write_scalars(step, values)
        history.append({'step': step, **values})
      fid_cut = evaluate(fid_due=fid is not None and step % config.eval_every == 0)
      if ckpts.save_if_due(step, state, data_iter, before_save=functools.partial(
          _finite_means, window, window_steps, step, workdir)):
        break
    ckpts.save(step, state, data_iter)
  if fid_cut:
    raise stop_requests.Stopped(
        f'Stopped on {ckpts.stop.by} at step {step} of {config.num_train_steps} during its '
        f'FID, with a checkpoint in {workdir}/checkpoints and the FID\'s samples so far in '
        f'{fid.directory}; the same command resumes the run, finishing that FID first.')
  if step < config.num_train_steps:
    raise stop_requests.Stopped(f'Stopped on {ckpts.stop.by} at step {step} of '
                                f'{config.num_train_steps}, with a checkpoint in '
                                f'{workdir}/checkpoints; the same command resumes the run.')
  common.save(state.ema_params, os.path.join(workdir, 'ema'), overwrite=True)
  return state, history


def write_samples(config, network, task, variables, writer, step, decoder=None):
  """A grid of EMA samples (`generate.model_sample`) from fixed noise and labels, as an
  image summary. Latent samples are decoded with `decoder`
  (`sample_images.load_decoder`)."""
  noise, labels = generate.fixed_noise_and_labels(
      config.seed, config.num_sample_images, network.image_shape, network.num_classes)
  samples = jax.jit(lambda v: generate.model_sample(network, task, v, config, noise, labels))(
      variables)
  images = sample_images.as_images(decoder, jax.device_get(samples))
  writer.write_images(step, {'samples': generate.image_grid(images)[None]})

