"""The comparison table: secant models against their teacher's own ODE solvers, from the
same noise and labels.

Rows: the teacher's adaptive reference solve (Tsit5, rtol 1e-6), the teacher's Euler and
Heun at each NFE, and each secant model at each step count. Columns: the RMS error to the
reference solution (over pixels and samples, evaluation.reference_error), and, given a
SampleQuality, the Fréchet distance of each row's samples to its reference statistics;
for the rows asked for, the error each step makes alone (evaluation.step_errors).
The callers build every network as evaluation.reference_error measures (float32
throughout, `teacher` and `secant_samplers` given float32=True) and trace `compare` under
its precision of float32 products (reference_error.precision).
One pass over the noise: each batch's reference is solved once and every sampler is
scored against it, so every row sees exactly the same noise. Each sampler starts from it at
its own grid's first time (sampling.run_steps): a secant model trained on the teacher's
path with a later start (the EDM path with a smaller σ_max) from its σ_max·ε, its error
still to the reference solved from the teacher's start. The running sums can be
saved as it goes (evaluation.progress), so a preempted comparison resumes where it was, and
the reference solutions kept (evaluation.references), so a later comparison of the same
teacher on the same noise skips its most expensive part.
"""

import contextlib
import dataclasses
import os
import re
from typing import Callable, Optional

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from secant_jax import files
from secant_jax import generate
from secant_jax import sampling
from secant_jax import writers
from secant_jax.evaluation import progress as progress_lib
from secant_jax.evaluation import reference_error
from secant_jax.evaluation import step_errors
from secant_jax.models import registry
from secant_jax.train import loop
from secant_jax.train import parallel
from secant_jax.train import recipe


@dataclasses.dataclass(frozen=True)
class Sampler:
  name: str  # 'teacher Heun', 'secant SDEI (sdei-4)'
  nfe: Optional[int]  # network evaluations per sample (None: adaptive)
  steps: Callable  # labels → its sampling.Steps; run and jitted by `compare`
  # a secant model's: the digest of its weights (evaluation.progress.weights_digest)
  weights: str = ''


def teacher(run_config, ema_dir, scale, float32, mesh=None):
  """(teacher network, task, guided tangent of labels: y → v(x, t), its variables as its
  checkpoint holds them) of a trained teacher run, CFG-guided at `scale`
  (None: the plain conditional tangent), in float32 throughout with `float32`
  (reference_error.measured_config), for `compare` on `mesh` (registry.build)."""
  run_config = reference_error.measured_config(run_config, float32)
  network = registry.build(run_config.model, guided=False, mesh=mesh)
  variables = loop.load_into(network, ema_dir, jax.random.key(0))
  task = recipe.make_task(run_config, network)

  def tangent_of(labels):
    return reference_error.teacher_tangent(network, variables, task, labels, scale)

  return network, task, tangent_of, variables


def teacher_samplers(task, tangent_of, nfes):
  """Euler and Heun (sampling.solve_with_nfe) at each NFE, each row named with the NFE it
  spends (on the EDM path Heun is EDM's sampler, which spends odd counts: 4 → 3), and a
  count that repeats another row is left out."""
  samplers = []
  for method in ('euler', 'heun'):
    for nfe in nfes:
      sampler = Sampler(f'teacher {method.capitalize()}',
                        sampling.spent_evaluations(task.path, method, nfe),
                        lambda y, nfe=nfe, method=method: sampling.steps_with_nfe(
                            tangent_of(y), task.path, nfe, method))
      if all((s.name, s.nfe) != (sampler.name, sampler.nfe) for s in samplers):
        samplers.append(sampler)
  return samplers


def secant_samplers(name, run_config, ema_dir, steps, scale, float32, mesh=None):
  """A trained secant run sampled with each step count in `steps`, guided at `scale` (the
  embedded scale of distilled models, else classic CFG's), in float32 throughout with
  `float32` (reference_error.measured_config), for `compare` on `mesh` (registry.build)."""
  run_config = reference_error.measured_config(run_config, float32)
  network = recipe.make_network(run_config, mesh)
  task = recipe.make_task(run_config, network)
  variables = loop.load_into(network, ema_dir, jax.random.key(0))
  sample_config = run_config.secant.copy_and_resolve_references()
  with sample_config.unlocked():
    sample_config.sample_guidance_scale = scale
    sample_config.sample_cfg_scale = scale
  digest = progress_lib.weights_digest(variables)
  return [Sampler(name, n, lambda y, n=n: generate.secant_steps(
      network, task, variables, sample_config, y, n), digest) for n in steps]


def compare(samplers, task, tangent_of, noise, labels, batch_size, mesh, quality=None,
            progress=None, references=None, step_nfes=()):
  """Rows {'sampler', 'nfe', 'error' (+ quality's metrics)} for the reference and each
  sampler, and {sampler index: its first batch of samples} (index −1: the reference).
  The rows of samplers whose NFE is in `step_nfes` also have the error each step makes
  alone (evaluation.step_errors: 'step_errors', 'step_grid').
  `batch_size` must divide over the mesh; the number of samples need not. With a
  `progress` (evaluation.progress.Progress) the running sums are saved as it goes
  (`Progress.save_if_due`) and a rerun resumes after the latest save. With `references`
  (evaluation.references.References) each batch's reference solution is read where kept,
  and kept where solved."""
  parallel.check_batch_size(batch_size, mesh, 'batch_size')
  sharding = parallel.batch_sharding(mesh)
  reference_fn = jax.jit(lambda n, y: sampling.reference_sample(tangent_of(y), n, task.path),
                         out_shardings=sharding)
  fns = [jax.jit(lambda n, y, s=s: sampling.run_steps(s.steps(y), n, task.path),
                 out_shardings=sharding) for s in samplers]
  squared = np.zeros(len(samplers))
  scores = [quality.scores() for _ in range(len(samplers) + 1)] if quality else []
  steps = step_errors.StepErrors(
      samplers, [i for i, s in enumerate(samplers) if s.nfe in step_nfes], tangent_of,
      task.path, sharding, labels[:batch_size])
  firsts = {}
  total = noise.shape[0]
  done, saved = progress.load() if progress else (0, None)
  if saved:
    squared, firsts = _restore(saved, scores, steps)
    logging.info('comparison: resumed after %d / %d samples', done, total)
  for start in range(done, total, batch_size):
    keep = min(batch_size, total - start)
    index = (start + np.arange(batch_size)) % total  # a last partial batch wraps around
    n, y = jax.device_put((noise[index], labels[index]), sharding)
    reference = _reference(references, start, reference_fn, n, y, sharding)
    outputs = [reference] + [fn(n, y) for fn in fns]
    steps.add(n, y, reference, keep)
    for i, x in enumerate(outputs):
      if i:
        squared[i - 1] += reference_error.squared_distance(x, reference, keep)
      if scores:
        scores[i].add(x, keep)
      if i - 1 not in firsts:
        firsts[i - 1] = np.asarray(multihost_utils.process_allgather(x, tiled=True))
    done = start + keep
    logging.info('comparison: %d / %d samples, %d samplers', done, total, len(samplers))
    if progress:
      progress.save_if_due(done, total, lambda: _state(squared, scores, steps, firsts))
  per_value = total * int(np.prod(noise.shape[1:]))
  rows = [{'sampler': 'teacher adaptive reference', 'nfe': None, 'error': 0.0}]
  rows += [{'sampler': s.name, 'nfe': s.nfe, 'error': float(np.sqrt(e / per_value))}
           for s, e in zip(samplers, squared)]
  for row, score in zip(rows, scores):
    row.update(score.result())
  for i in steps.indices:
    rows[i + 1].update(steps.result(i, per_value))
  return rows, firsts


def _reference(references, start, solve, n, y, sharding):
  """The reference solution of the batch starting at sample `start`: `references`' copy
  where it has one, else solved (and kept there)."""
  kept = references.read(start) if references else None
  if kept is not None:
    return jax.device_put(kept, sharding)
  reference = solve(n, y)
  if references:
    references.write(start, reference)
  return reference


def _state(squared, scores, steps, firsts):
  """`compare`'s running sums as named arrays (evaluation.progress saves them)."""
  state = {'squared': squared, **steps.state(), **{f'first{i}': x for i, x in firsts.items()}}
  for i, score in enumerate(scores):
    state.update({f'scores{i}.{k}': v for k, v in score.state().items()})
  return state


def _restore(state, scores, steps):
  """Puts `_state`'s arrays back into `scores` and `steps`; returns (squared, firsts)."""
  steps.restore(state)
  for i, score in enumerate(scores):
    prefix = f'scores{i}.'
    score.restore({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
  firsts = {int(k[len('first'):]): v for k, v in state.items() if k.startswith('first')}
  return np.array(state['squared'], np.float64), firsts


def _markdown(header, rows):
  """A Markdown table: the `header` cells, then each of `rows` (lists of strings)."""
  cells = lambda values: '| ' + ' | '.join(values) + ' |'
  return '\n'.join([cells(header), cells(['---'] * len(header))] + [cells(r) for r in rows])


def format_table(rows):
  """A Markdown table of `compare`'s rows."""
  metrics = [k for k in rows[0] if k not in ('sampler', 'nfe', 'error', 'step_errors',
                                              'step_grid')]
  names = {'fid': 'FID', 'fd_fmnist': 'FD-FMNIST', 'inception_score': 'IS',
           'inception_score_std': 'IS std'}
  return _markdown(
      ['sampler', 'NFE', 'error to reference'] + [names.get(m, m) for m in metrics],
      [[r['sampler'], 'adaptive' if r['nfe'] is None else str(r['nfe']), f"{r['error']:.4f}"]
       + [f'{r[m]:.3f}' for m in metrics] for r in rows])


def format_step_tables(rows):
  """Markdown tables of the rows with step errors (evaluation.step_errors), one per grid:
  a column per step (t_k → t_{k+1}) and the row's error; '' when no row has them."""
  grids = {}
  for r in rows:
    if 'step_errors' in r:
      grids.setdefault(tuple(r['step_grid']), []).append(r)
  return '\n\n'.join(_markdown(
      ['sampler', 'NFE'] + [f'{a:.3g} → {b:.3g}' for a, b in zip(grid[:-1], grid[1:])]
      + ['all steps'],
      [[r['sampler'], str(r['nfe'])] + [f'{e:.4f}' for e in r['step_errors']]
       + [f"{r['error']:.4f}"] for r in grouped]) for grid, grouped in grids.items())


def _png(image, path, zoom):
  """image (float, [0, 1]) as a PNG, each pixel a zoom × zoom block."""
  pixels = (image * 255).round().astype(np.uint8)
  files.write_png(pixels.repeat(zoom, axis=0).repeat(zoom, axis=1), path)


def write_grids(rows, firsts, directory, images_of=np.asarray, grid_size=64,
                overview_columns=10, zoom=2):
  """A grid PNG per row (directory/samples/<row>.png, the first `grid_size` samples) and
  samples.png: the first `overview_columns` samples of every row, one row each;
  `images_of(samples)` gives the images of samples (`sample_images.as_images`: latents
  decoded). Returns the overview image (float, [0, 1])."""
  files.make_directory(os.path.join(directory, 'samples'))
  images = {i: images_of(firsts[i][:grid_size]) for i in sorted(firsts)}
  for row, index in zip(rows, sorted(firsts)):
    nfe = 'adaptive' if row['nfe'] is None else f"{row['nfe']}"
    slug = re.sub(r'[^a-z0-9]+', '-', f"{row['sampler']} {nfe}".lower()).strip('-')
    _png(generate.image_grid(images[index]),
         os.path.join(directory, 'samples', f'{slug}.png'), zoom)
  overview = generate.image_grid(
      np.concatenate([images[i][:overview_columns] for i in sorted(images)]),
      columns=overview_columns)
  _png(overview, os.path.join(directory, 'samples.png'), zoom * 2)
  return overview


def write_results(rows, firsts, workdir, images_of=np.asarray):
  """Process 0 writes the sample grids (`write_grids`, with `images_of`; None: no grids)
  and, under workdir/eval, each row's numbers as TensorBoard scalars at its NFE
  ('<sampler>/<column>') and the overview image; the other processes only log the
  scalars."""
  with contextlib.closing(writers.create(os.path.join(workdir, 'eval'),
                                         just_logging=jax.process_index() > 0)) as writer:
    for row in rows[1:]:
      writer.write_scalars(row['nfe'], {f"{row['sampler']}/{k}": v for k, v in row.items()
                                        if isinstance(v, float)})
    if jax.process_index() == 0 and images_of is not None:
      writer.write_images(0, {'samples': write_grids(rows, firsts, workdir, images_of)[None]})
