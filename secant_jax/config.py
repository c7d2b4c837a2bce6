"""The shape of a run's config, shared by the files in configs/ (which fill it in).

Every key here is read by the trainer. `parse_arg` turns the config-file argument
'variant=stee,steps=8' into values, rejecting unknown keys.
"""

import copy

import jax
import ml_collections
from ml_collections import config_dict
from flax import traverse_util

from secant_jax import secant

MODES = ('train', 'sample', 'evaluate', 'compare', 'demo')
# config.matmul_precision: how float32 matmuls and convolutions compute ('' = JAX's
# default, which favours speed: TF32 on recent NVIDIA GPUs, one bfloat16 pass on TPUs).
MATMUL_PRECISIONS = ('', 'bfloat16', 'tensorfloat32', 'float32')
# The variants the official code trains with the guidance scale as an input (its sampler's
# --embed-cfg: "True for SDEI, STEI, SDEE, False for STEE"); the others drop labels.
EMBEDDED_GUIDANCE = ('sdei', 'stei', 'sdee')
# What a resumed run may set otherwise than the config its checkpoints were trained with:
# how long it runs, what it reports and when, the machines it runs on (a checkpoint
# restores onto any mesh and process count) and how the same model is computed on them.
# Every other setting decides the numbers trained, and a change to it on resume is refused
# (train.loop) unless allow_config_change.
RESUMABLE_CHANGES = ('mode', 'num_train_steps', 'log_every', 'checkpoint_every',
                     'keep_checkpoints', 'sample_every', 'num_sample_images',
                     'teacher_sample_nfe', 'num_eval_samples', 'eval_every',
                     'eval_save_seconds', 'fid', 'compare', 'compare_in_float32',
                     'fsdp', 'microbatches', 'distributed', 'cluster', 'data.read_threads',
                     'compilation_cache_dir', 'profile_steps', 'profile_skip_steps',
                     'matmul_precision', 'model.attention', 'model.remat', 'model.split_qkv',
                     'model.residual_dtype',
                     'secant.sample_cfg_scale', 'secant.sample_guidance_scale',
                     'secant.guidance_interval', 'allow_config_change', 'demo')

# What a run's exported model is and how a sampler reads it (its network, path, variant,
# guidance input, whether it was trained for classic CFG, what its samples are and the
# scale its latents are decoded at). Sample and evaluate mode refuse to read a run's ema/
# under a config that differs from its config.json in one of these
# (`changed_settings(..., only=MODEL_SETTINGS, free=SAMPLING_CHOICES)`): the network would
# load, a guidance embedder it lacks filled in at its initialisation, and sample as
# another model with no error. The compute settings among them may differ.
MODEL_SETTINGS = ('model', 'path', 'secant.variant', 'secant.guidance',
                  'secant.label_dropout', 'data.name', 'data.latent_scale')
SAMPLING_CHOICES = RESUMABLE_CHANGES + ('model.dtype',)

# Settings added after runs had trained, each with the value in effect before it existed.
# A run's config.json without one holds that value (`with_added_settings`), so a run from
# before is rebuilt as it trained (compare, evaluate), and resuming it under a config that
# now sets another value is refused as the change it is (`changed_settings`).
ADDED_SETTINGS = {'ema_warmup': False, 'secant.loss_weighting': 'uniform',
                  'secant.diffusion_log_sigma': None, 'path.schedule': 'rho',
                  'microbatches': 1}

# The settings whose values outside a range break a run, in every mode: (setting, its range
# as mathematics writes it, what it is); of a tuple setting, each of its values. A count or
# interval of 0 ends a run at its first step or grid with an error that names no setting,
# keep_checkpoints=0 deletes every checkpoint as soon as it is written, and a decay or Adam
# moment outside [0, 1) or a negative rate, clip or warmup trains with no error at all.
SETTING_RANGES = (
    ('num_train_steps', '[0, inf)', 'the steps the run trains'),
    ('log_every', '[1, inf)', 'steps between logs'),
    ('checkpoint_every', '[1, inf)', 'steps between checkpoint saves'),
    ('keep_checkpoints', '[1, inf)', 'the latest checkpoints kept; with 0, each would be '
     'deleted as soon as it was written'),
    ('sample_every', '[0, inf)', 'steps between sample grids, 0 for none'),
    ('eval_every', '[0, inf)', 'steps between FID evaluations, 0 for none'),
    ('num_sample_images', '[1, inf)', 'the images of a sample grid and of sample mode'),
    ('teacher_sample_nfe', '[1, inf)', "the network evaluations of a teacher run's samples"),
    ('num_eval_samples', '[1, inf)', 'the samples evaluate mode scores against the teacher'),
    ('fid.num_samples', '[1, inf)', 'the samples evaluate mode scores'),
    ('fid.train_num_samples', '[1, inf)', "the samples of a training run's FID"),
    ('compare.num_samples', '[1, inf)', 'the samples a comparison scores'),
    ('compare.teacher_nfe', '[1, inf)', "the evaluations of a comparison's teacher rows"),
    ('compare.secant_steps', '[1, inf)', "the steps of a comparison's secant rows"),
    ('eval_save_seconds', '[0, inf)', 'seconds between saves of an evaluation, 0 for after '
     'every batch'),
    ('fsdp', '[1, inf)', "the devices that split a model's parameters, 1 for none"),
    ('data.read_threads', '[0, inf)', "grain's reading threads per process, 0 for the "
     'default of where the data is'),
    ('ema_decay', '[0, 1]', 'the EMA\'s weight on its previous value at each step'),
    ('optimizer.learning_rate', '[0, inf)', "Adam's step size; a negative one ascends"),
    ('optimizer.b1', '[0, 1)', "the decay of Adam's first moment"),
    ('optimizer.b2', '[0, 1)', "the decay of Adam's second moment; at 1 its bias correction "
     'divides by zero'),
    ('optimizer.eps', '(0, inf)', "Adam's denominator's floor; at 0 a parameter with a zero "
     'gradient, such as an unused class embedding, becomes NaN'),
    ('optimizer.weight_decay', '[0, inf)', "AdamW's decoupled weight decay"),
    ('optimizer.grad_clip', '[0, inf)', 'the global gradient norm clipped to, 0 for none'),
    ('optimizer.warmup_steps', '[0, inf)', "the learning rate's linear warmup, 0 for none"),
    ('secant.stei_lambda', '[0, inf)', "the weight of STEI's diffusion term"),
    ('path.rho', '(0, inf)', "the exponent of EDM's σ schedule"),
    ('path.sigma_data', '(0, inf)', "the data's standard deviation, EDM's preconditioning"),
)


def _bounds(range_text):
  """'[0, 1)' → (0.0, True, 1.0, False): low, whether it is in, high, whether it is in."""
  low, high = (float(b) for b in range_text[1:-1].split(','))
  return low, range_text[0] == '[', high, range_text[-1] == ']'


def _in_range(value, range_text):
  low, low_in, high, high_in = _bounds(range_text)
  return (low <= value if low_in else low < value) and (value <= high if high_in else
                                                        value < high)


def _required(name, range_text, each):
  """(what a value must be, how to set it) for the messages of `check_setting_ranges`."""
  _, low_in, high, _ = _bounds(range_text)
  least = range_text[1:range_text.index(',')]
  flag = f'each value of --config.{name}' if each else f'--config.{name}'
  if high != float('inf'):
    return f'in {range_text}', f'set {flag} to a value in {range_text}'
  if not low_in:
    return f'more than {least}', f'set {flag} to more than {least}'
  return (f'at least {least}', f'set {flag} to {least} or more' if each else
          f'set {flag}={least} or more')


def check_setting_ranges(config, ranges=SETTING_RANGES):
  """Refuses a setting of `ranges` (as SETTING_RANGES) outside its range, naming it, the
  range and the fix, before the run builds anything."""
  for name, range_text, what in ranges:
    value = config
    for key in name.split('.'):
      value = value[key]
    each = isinstance(value, (tuple, list))
    if all(_in_range(v, range_text) for v in (value if each else (value,))):
      continue
    must, fix = _required(name, range_text, each)
    shown = f'{tuple(value)!r}, each must be' if each else f'{value}, must be'
    raise ValueError(f'config.{name} is {shown} {must} ({what}): {fix}.')


def with_added_settings(saved):
  """A copy of `saved` (a run's config.json as a dict) with each ADDED_SETTINGS key that it
  lacks set to the value that key's setting had before it existed."""
  saved = copy.deepcopy(saved)
  for key, value in ADDED_SETTINGS.items():
    *sections, name = key.split('.')
    node = saved
    for section in sections:
      node = node.setdefault(section, {})
    node.setdefault(name, value)
  return saved


def parse_arg(arg, defaults):
  """'k=v,k=v' → {k: v} over `defaults` (values typed like the defaults)."""
  values = dict(defaults)
  for item, key, sep, value in _arg_items(arg):
    if not sep or key not in defaults:
      raise ValueError(f'Bad config argument {item!r}: expected key=value with key in '
                       f'{sorted(defaults)}, e.g. variant=stee,steps=8.')
    kind = type(defaults[key])
    try:
      values[key] = kind(value)
    except ValueError:
      what = {int: 'an integer', float: 'a number'}.get(kind, kind.__name__)
      raise ValueError(f'Bad config argument {item!r}: {key} takes {what}, e.g. '
                       f'{key}={defaults[key]}.') from None
  return values


def given_keys(arg):
  """The keys that a 'k=v,k=v' config argument gives (parse_arg fills in the others)."""
  return {key for _, key, _, _ in _arg_items(arg)}


def _arg_items(arg):
  for item in filter(None, (arg or '').split(',')):
    yield (item, *item.partition('='))


def matmul_precision(config):
  """The context a run computes in: jax.default_matmul_precision at
  config.matmul_precision, so that every float32 product the run traces (networks, VAE,
  feature networks without their own) computes at it; '' leaves JAX's default."""
  value = config.get('matmul_precision', '')
  if value not in MATMUL_PRECISIONS:
    raise ValueError(f'matmul_precision (config.matmul_precision) must be one of '
                     f'{MATMUL_PRECISIONS}, got {value!r}: float32 for true float32 products '
                     "(as EDM trains), '' for JAX's faster default.")
  return jax.default_matmul_precision(value or None)


def changed_settings(saved, current, only=('',), free=RESUMABLE_CHANGES):
  """'key: saved → current' for each setting (dotted key) under `only` (all by default)
  that both configs (JSON dicts) hold with different values, those under `free` aside. The
  saved config holds ADDED_SETTINGS at their values from before they existed; another key
  only one of them holds (a setting added or removed between versions) is not a change."""
  saved, current = (traverse_util.flatten_dict(c, sep='.')
                    for c in (with_added_settings(saved), current))
  return [f'{key}: {saved[key]!r} → {current[key]!r}' for key in current
          if key in saved and not _same(saved[key], current[key])
          and _under(key, only) and not _under(key, free)]


def _under(key, settings):
  """Whether dotted `key` is one of `settings` or inside one ('' holds every key)."""
  return any(not s or key == s or key.startswith(s + '.') for s in settings)


def _same(saved, current):
  """Equal settings; None and [] both say none (a tuple field that is None by default
  is set to none from the command line as '()', e.g. secant.guidance)."""
  return saved == current or (saved in (None, []) and current in (None, []))


def secant_config(variant, steps, guidance=(1.0, 2.5), label_dropout=0.1):
  """Variant settings as the official code uses them: SDEI, STEI and SDEE embed
  w ~ U(guidance); STEE (and a diffusion teacher) drops labels with p = 0.1 and samples
  with ordinary CFG; STEI drops labels in its unguided diffusion term (train.step)."""
  secant.check_variant(variant)
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.steps = steps
  # A tuple field, None by default, so that the command line can set it either way:
  # --config.secant.guidance='(1.0, 2.0)', or '()' for none (recipe.guidance_range).
  c.guidance = (tuple(guidance) if guidance and variant in EMBEDDED_GUIDANCE
                else config_dict.placeholder(tuple))
  c.label_dropout = label_dropout if variant in ('stei', 'stee', 'diffusion') else 0.0
  c.stei_lambda = 1.0
  c.stei_target = 'teacher'
  # 'uniform' (the secant's ℓ2) or 'edm' (σ-path: the network output's, as EDM weights;
  # models.precond.loss_weight_fn)
  c.loss_weighting = 'uniform'
  # The diffusion term's σ (teacher, STEI; EDM path): None or '()' from the path's grid,
  # (P_mean, P_std) log-normal as EDM trains its denoiser, EDM's own (-1.2, 1.2)
  c.diffusion_log_sigma = config_dict.placeholder(tuple)
  c.sample_cfg_scale = 1.5  # classic CFG for non-embedded models when sampling
  c.sample_guidance_scale = 1.5  # the embedded scale for distilled models when sampling
  c.guidance_interval = (0.0, 1.0)
  return c


def dit_model(name, input_size, in_channels, num_classes, learn_sigma, dtype='bfloat16',
              **sizes):
  """config.model of a DiT/SiT (`models.registry`): its size (`name`, or `sizes` such as
  hidden_size=64, depth=2, num_heads=4 over it) and input, and how it computes, which every
  DiT config has so that the same flags tune any of them, e.g.
  --config.model.attention=cudnn --config.model.split_qkv=True on GPUs."""
  return ml_collections.ConfigDict(dict(
      family='dit', name=name, input_size=input_size, in_channels=in_channels,
      num_classes=num_classes, learn_sigma=learn_sigma,
      dtype=dtype,  # of the products; parameters and loss are float32
      # The residual stream and conditioning sum: 'float32' as PyTorch's autocast keeps
      # them; 'bfloat16' moves fewer bytes for twice the error (models/dit.py)
      residual_dtype='float32',
      attention='',  # '' = JAX's choice; 'cudnn' for the fused kernel on GPUs
      remat=False,  # True: recompute block activations (large per-device batches)
      split_qkv=False,  # True: q, k, v as three products, no split copy (dit.QKVProjection)
      **sizes))


def base_config():
  c = ml_collections.ConfigDict()
  c.mode = 'train'
  c.seed = 0
  c.model = ml_collections.ConfigDict()
  c.path = ml_collections.ConfigDict(dict(name='linear', sigma_min=0.002, sigma_max=80.0,
                                          rho=7.0, schedule='rho', sigma_data=0.5))
  c.secant = secant_config('sdei', 4)
  c.init_checkpoint = ''  # converted weights to start from ('' = random init)
  c.teacher_checkpoint = ''  # converted teacher ('' = init_checkpoint)
  c.optimizer = ml_collections.ConfigDict(dict(learning_rate=1e-4, weight_decay=0.0, b1=0.9,
                                               b2=0.999, eps=1e-8, grad_clip=0.0,
                                               warmup_steps=0))
  c.ema_decay = 0.9999
  c.ema_warmup = False  # decay min(ema_decay, (1 + k)/(10 + k)) at update k: from scratch, short runs
  c.batch_size = 256
  # gradient accumulation: the batch's gradient is taken over this many equal slices of it
  # one after another (a slice's activations in memory at a time), then one optimizer step
  c.microbatches = 1
  c.num_train_steps = 1000
  c.log_every = 100
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  c.sample_every = 0  # sample grid every K steps (0: never); latents decoded by fid.vae
  c.num_sample_images = 64
  # a diffusion (teacher) run's samples (grids, sample mode, FID): its ODE by Heun at this NFE
  c.teacher_sample_nfe = 35
  c.num_eval_samples = 256  # evaluate mode: samples scored against the teacher's reference
  # evaluate and compare modes: seconds between saves of the running sums, from which the
  # same command resumes a stopped evaluation (0: after every batch)
  c.eval_save_seconds = 300.0
  c.eval_every = 0  # FID every K training steps (0: never), with fid.train_num_samples
  c.fid = ml_collections.ConfigDict(dict(
      features='inception',  # the feature network: 'inception' (FID) or 'fmnist' (FD-FMNIST)
      inception='',  # torch-fidelity's Inception .pth or its conversion ('' = no FID)
      fmnist='',  # the Fashion-MNIST classifier's checkpoint (evaluation.fmnist_features)
      vae='',  # sd-vae-ft-ema weights or their conversion: latent data's images (FID, grids)
      reference='',  # mu/sigma .npz ('' = computed from the data's reference_split, cached)
      reference_split='train',
      num_reference_images=0,  # images the computed reference uses (0: the whole split)
      num_samples=50_000, train_num_samples=5_000, batch_size=256,
      # evaluate mode: also write its num_samples samples here as PNGs (<index>.png), a
      # folder torch-fidelity (the official evaluation) reads ('' = none)
      image_dir=''))
  c.compare = ml_collections.ConfigDict(dict(  # compare mode (compare_mode.py)
      teacher='',  # the teacher's run directory (the --workdir it trained in)
      secants='',  # its secant runs: 'name=run_dir,...', each sampled with secant_steps
      # and with the step count it was trained for
      teacher_nfe=(1, 2, 4, 8, 16, 35), secant_steps=(1, 2, 4, 8), num_samples=10_000,
      batch_size=256, guidance_scale=1.0,
      # the rows whose NFE column is one of these also get the error each of their steps
      # makes alone (evaluation.step_errors; up to N − 1 reference solves per N-step row)
      step_errors=(),
      references=''))  # a directory to keep the teacher's reference solutions in, for reuse
  # evaluate's integration error and all of compare mode: the teacher's reference solve and
  # every sampler scored against it compute in float32 with float32 products, whatever
  # config.model.dtype and config.matmul_precision (and a compared run's) say. The adaptive
  # solve to tolerance 1e-6 needs a tangent smooth to that tolerance; bfloat16 outputs
  # (three significant digits) or TF32 products make it chase their rounding with tiny
  # steps and measure it as integration error. False: as the runs train.
  c.compare_in_float32 = True
  c.allow_config_change = False  # resume with settings not in RESUMABLE_CHANGES changed
  c.matmul_precision = ''  # of float32 products: MATMUL_PRECISIONS, '' = JAX's default
  c.fsdp = 1
  # JAX's persistent compilation cache: every compiled program kept in this directory (or
  # gs://...) and read back by a later run of the same program, so that a run resumed
  # after a preemption skips its compiles ('' = JAX's own setting, JAX_COMPILATION_CACHE_DIR).
  # Only process 0 writes: with several hosts, a path they all read (a bucket).
  c.compilation_cache_dir = ''
  # a jax.profiler trace of profile_steps training steps (0: none) after the first
  # profile_skip_steps of the process, into <workdir>/plugins/profile (train.step_trace)
  c.profile_steps = 0
  c.profile_skip_steps = 5
  c.distributed = False  # jax.distributed.initialize() (multi-host TPU/GPU)
  # where JAX does not detect the cluster (TPU VMs, Slurm, Open MPI, Kubernetes it does):
  # the coordinator's host:port, the process count and this process's index
  c.cluster = ml_collections.ConfigDict(dict(coordinator_address='', num_processes=0,
                                             process_id=-1))
  # read_threads: grain's threads per process, each reading whole local batches; 0: 16 for
  # a dir in a bucket (gs://: each record one request), 1 for a disk (data.pipeline)
  c.data = ml_collections.ConfigDict(dict(name='digits', dir='', random_flip=False,
                                          read_threads=0))
  return c
