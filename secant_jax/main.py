"""python -m secant_jax.main --config=configs/X.py[:args] --workdir=DIR [--config.k=v]

Modes (config.mode): train (resumes from DIR's latest checkpoint), sample (a PNG grid and
an .npz from DIR's EMA export), evaluate (DIR's EMA export: error to the teacher's
reference ODE solution, FID and Inception Score), compare (a teacher run and its secant
runs: the table of evaluation.comparison), demo (configs/demo.py: the whole method on
digits).

Exit status 75 (process 0 only): a training run (or a demo stage) stopped on SIGTERM (or
Ctrl-C, in one process) after saving its checkpoint, or an evaluation (evaluate, compare)
after saving its progress; the same command resumes it (see stop_requests).
"""

import sys

import jax
import ml_collections
from absl import app
from absl import flags
from jax.experimental.compilation_cache import compilation_cache
from ml_collections import config_flags

from secant_jax import config as config_lib
from secant_jax import stop_requests
from secant_jax.train import parallel


def run(config, workdir):
  """Dispatches on config.mode (importable, for tests and notebooks)."""
  if 'mode' not in config:  # ml_collections' own error would be AttributeError: "'mode'"
    raise ValueError('The config has no mode: it is not a config of python -m '
                     'secant_jax.main (configs/oracle.py is python -m secant_jax.bench.oracle'
                     "'s). Give configs/imagenet_sit.py, cifar10_edm.py, fashion_mnist.py or "
                     'demo.py, or a config built on secant_jax.config.base_config().')
  if config.mode not in config_lib.MODES:
    raise ValueError(f'Unknown mode {config.mode!r}: expected one of {config_lib.MODES}; '
                     'set --config.mode.')
  config_lib.check_setting_ranges(config)
  if config.distributed:
    parallel.initialize_distributed(config.cluster)
  if config.compilation_cache_dir:
    use_compilation_cache(config.compilation_cache_dir)
  with config_lib.matmul_precision(config):
    return _run_mode(config, workdir)


def use_compilation_cache(path):
  """Makes `path` JAX's persistent compilation cache from the next compile on, also in a
  process that has compiled already (JAX settles on its cache at the first compile, so it
  is reset)."""
  if jax.config.jax_compilation_cache_dir != path:
    compilation_cache.set_cache_dir(path)
    compilation_cache.reset_cache()


def _run_mode(config, workdir):
  if config.mode == 'train':
    from secant_jax.train import loop  # pylint: disable=import-outside-toplevel
    return loop.train_and_evaluate(config, workdir)
  if config.mode == 'sample':
    from secant_jax import sample_mode  # pylint: disable=import-outside-toplevel
    return sample_mode.write_samples(config, workdir)
  if config.mode == 'evaluate':
    from secant_jax import evaluate_mode  # pylint: disable=import-outside-toplevel
    return evaluate_mode.evaluate(config, workdir)
  if config.mode == 'compare':
    from secant_jax import compare_mode  # pylint: disable=import-outside-toplevel
    return compare_mode.compare(config, workdir)
  from secant_jax import demo  # pylint: disable=import-outside-toplevel
  return demo.run(config, workdir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  with parallel.exit_at_once_on_error():
    try:
      run(flags.FLAGS.config, flags.FLAGS.workdir)
    except stop_requests.Stopped as stopped:
      print(stopped, flush=True)
      sys.exit(stop_requests.STOPPED_EXIT_STATUS if jax.process_index() == 0 else 0)


def define_config_flag(flag_values, sys_argv):
  """Defines --config, a config file (configs/X.py[:args]) with its --config.key=value
  overrides read from `sys_argv`, in `flag_values`."""
  config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                  flag_values=flag_values, lock_config=True, sys_argv=sys_argv)


def define_flags(flag_values=flags.FLAGS, sys_argv=None):
  """Defines --config (with its --config.key=value overrides) and --workdir in
  `flag_values`; `sys_argv` is the command line the overrides are read from (default
  sys.argv)."""
  define_config_flag(flag_values, sys_argv)
  flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs, exports.',
                      flag_values=flag_values)
  flags.mark_flags_as_required(['config', 'workdir'], flag_values=flag_values)


def _unknown_settings(argv):
  """What is wrong with each --config.KEY flag in `argv` whose KEY the config file's
  config (loaded without those flags) has no setting for."""
  config_args, keys = [], []
  for i, arg in enumerate(argv[1:], 1):
    if arg == '--config' or arg.startswith('--config='):
      config_args += argv[i:i + 2] if arg == '--config' else [arg]
    elif arg.startswith('--config.'):
      keys.append(arg[len('--config.'):].partition('=')[0])
  values = flags.FlagValues()
  define_config_flag(values, [argv[0], *config_args])
  values([argv[0], *config_args])
  unknown = []
  for key in keys:
    node, parent = values.config, 'config'
    for name in key.split('.'):
      if not isinstance(node, ml_collections.ConfigDict):
        unknown.append(f'--config.{key}: {parent} is a value, not a group of settings.')
        break
      if name not in node:
        unknown.append(f'--config.{key} names no setting of the config; {parent} has: '
                       f'{", ".join(sorted(node.keys()))}.')
        break
      node, parent = node[name], f'{parent}.{name}'
  return unknown


def _parse_flags(flag_values, argv):
  """flag_values(argv), with a config file that does not load and a --config.KEY that names
  no setting reported as flags errors, the latter saying which settings there are
  (ml_collections defers the first to the config's first use, and raises
  AttributeError("'KEY'"), or TypeError for a KEY below a value, for the second)."""
  try:
    remaining = flag_values(argv)
    flag_values.config.keys()  # a config file that did not load raises at its first use
    return remaining
  except OSError as e:  # ml_collections' "Configuration is not available because of ..."
    raise flags.Error(str(e)) from None
  except (AttributeError, KeyError, TypeError):
    unknown = _unknown_settings(argv)
    if not unknown:
      raise
    raise flags.Error(' '.join(unknown) + ' Spell each flag as a setting the config has, '
                      'or leave it out.') from None


def parse_command_line(args):
  """(config, workdir) that `python -m secant_jax.main *args` runs, `args` as a shell splits
  them. Raises what the command line reports: absl's flags errors (an unknown flag or
  setting, a value of the wrong type, a config file that does not load)."""
  argv = [__name__, *args]
  values = flags.FlagValues()
  define_flags(values, sys_argv=argv)
  _parse_flags(values, argv)
  return values.config, values.workdir


def parse_flags_or_exit(argv):
  """absl's flags_parser for a program with `define_config_flag`'s --config: flags.FLAGS
  parsed from argv, or the exit with absl's message for a flags error (`_parse_flags`)."""
  try:
    return _parse_flags(flags.FLAGS, argv)
  except flags.Error as error:
    sys.exit(f'FATAL Flags parsing error: {error}\n'
             'Pass --helpshort or --helpfull to see help on flags.')


if __name__ == '__main__':  # flags defined here only, so importing this module defines none
  define_flags()
  app.run(main, flags_parser=parse_flags_or_exit)
