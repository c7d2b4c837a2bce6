"""Every command that README.md, docs/ and the module docstrings (their usage lines) show
parses as written: each `python -m secant_jax.X` (the module exists, its flags do, a config
file loads with the arguments after ':' and each --config.key=value names a setting that
takes the value) and each launch script's (`launch/gpu_local.sh`, `gpu_slurm.sh` and
`tpu_pod.sh run|encode` pass their arguments on; `launch/fashion_mnist.sh` and
`throughput_table.sh` are run with a stand-in for python that records the commands they
would run, with the settings in the environment that the document gives them). A flag or
setting renamed in the code fails here, not in a reader's shell.

Commands are read from indented code blocks (lines ending in '\\' joined) and from inline
code spans. Shell variables are expanded from the assignments the document makes before
the command, in code blocks or inline (`M="..."`), and a loop variable (`for v in a b`)
takes its first value; a variable not defined before the command fails it (a reader who
copies the block would run it without). The elisions `...` and `ARGS` are left out, and so
are the brackets of an optional argument (`[--fsdp 8]`, `[:quick]`: checked as given).
Parsing runs nothing: argparse programs stop at their parser; absl programs (`main`,
`bench.oracle`) are parsed with the flags their `define_flags` defines, as their
`__main__` does.
"""

import argparse
import ast
import bisect
import dataclasses
import glob
import importlib
import importlib.util
import inspect
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ASSIGNMENT = re.compile(r'([A-Za-z_]\w*)=(.*)', re.DOTALL)
_LOOP = re.compile(r'\bfor (\w+) in (\S+)')
_VARIABLE = re.compile(r'\$\{?(\w+)\}?')  # $NAME or ${NAME}
_SEPARATORS = (';', '&&', '||', '|', '&')
_SHELL_WORDS = ('do', 'done', 'then', 'fi', 'wait', 'time')
_ELISIONS = ('...', 'ARGS')
_OPTIONAL = r'\[((?:--|:)[^\[\]]*)\]'  # [--flag value] or [:argument]
# launch scripts that run one program with their arguments, and the arguments they add
_PASS_ON = {'launch/gpu_local.sh': ('secant_jax.main', ()),
            'launch/gpu_slurm.sh': ('secant_jax.main', ('--config.distributed=True',)),
            'launch/tpu_pod.sh run': ('secant_jax.main', ('--config.distributed=True',)),
            'launch/tpu_pod.sh encode': ('secant_jax.data.encode', ('--distributed',))}
# launch scripts that run several, with PYTHON the interpreter, RUNS_DIR their first argument
_RECORDED = ('launch/fashion_mnist.sh', 'launch/throughput_table.sh')


@dataclasses.dataclass(frozen=True)
class Command:
  where: str  # 'FILE:LINE'
  program: str  # a module 'secant_jax.X' or a launch script 'launch/X.sh'
  args: tuple
  env: tuple = ()  # the (NAME, value) settings given before the program
  undefined: tuple = ()  # the $variables it uses that the document has not defined before


def _shell_lines(text):
  """(line number, shell text) of each line of the code blocks (a line ending in '\\'
  joined with the next) and of each inline code span, in the order they appear."""
  lines, paragraph, continued = [], [], False

  def end_paragraph():
    joined = ' '.join(line for _, line in paragraph)
    starts = [0]
    for _, line in paragraph:
      starts.append(starts[-1] + len(line) + 1)
    for span in re.finditer(r'`([^`]+)`', joined):
      lines.append((paragraph[bisect.bisect_right(starts, span.start()) - 1][0],
                    span.group(1)))
    paragraph.clear()

  for number, line in enumerate(text.split('\n') + [''], 1):
    if line.startswith('    ') and not paragraph:
      code = line[4:].rstrip()
      if continued:
        lines[-1] = (lines[-1][0], lines[-1][1][:-1] + ' ' + code.lstrip())
      else:
        lines.append((number, code))
      continued = code.endswith('\\')
    elif line.strip():
      paragraph.append((number, line.strip()))
      continued = False
    elif paragraph:
      end_paragraph()
  return lines


def _expand(text, env):
  return _VARIABLE.sub(lambda m: env.get(m.group(1), ''), text)


def _split(text, posix):
  lexer = shlex.shlex(text, posix=posix, punctuation_chars=';&|')
  lexer.whitespace_split = True
  return list(lexer)


def _segments(line):
  """The line's simple commands (between ; && || | &), each as its unexpanded text."""
  segments, current = [], []
  for token in _split(line, posix=False) + [';']:
    if token in _SEPARATORS:
      if current:
        segments.append(' '.join(current))
      current = []
    else:
      current.append(token)
  return segments


def _command(where, tokens, env, undefined=()):
  """The Command that `tokens` (one simple command, expanded and split) runs, or None."""
  settings = []
  while tokens and (tokens[0] in _SHELL_WORDS or _ASSIGNMENT.fullmatch(tokens[0])):
    if tokens[0] not in _SHELL_WORDS:
      settings.append(_ASSIGNMENT.fullmatch(tokens[0]).groups())
    tokens = tokens[1:]
  if not tokens:  # assignments only: they hold for the rest of the document
    env.update(settings)
    return None
  if tokens[0] in ('python', 'python3') and tokens[1:2] == ['-m']:
    program, args = tokens[2], tokens[3:]
    if not re.fullmatch(r'secant_jax(\.\w+)+', program):  # not a pattern such as secant_jax.…
      return None
  else:
    scripts = [i for i, t in enumerate(tokens) if re.fullmatch(r'launch/\w+\.sh', t)]
    if not scripts:
      return None
    program, args = tokens[scripts[0]], tokens[scripts[0] + 1:]
    if program == 'launch/tpu_pod.sh' and args:
      program, args = f'{program} {args[0]}', args[1:]
  redirections = [i for i, a in enumerate(args) if re.match(r'\d*>', a)]
  args = args[:redirections[0]] if redirections else args
  return Command(where, program, tuple(a for a in args if a not in _ELISIONS), tuple(settings),
                 tuple(undefined))


def _line_commands(where, line, env):
  commands = []
  for segment in _segments(line):
    undefined = [name for name in _VARIABLE.findall(segment) if name not in env]
    expanded = _expand(segment, env)
    while re.search(_OPTIONAL, expanded):  # innermost first: [--config=c.py[:quick]]
      expanded = re.sub(_OPTIONAL, r'\1', expanded)
    command = _command(where, _split(expanded, posix=True), env, undefined)
    if command:
      commands.append(command)
  return commands


def documented_commands(document, text, first_line=1):
  """The commands in `text`, the contents of `document` from its line `first_line`."""
  env, commands = {}, []
  for number, line in _shell_lines(text):
    for name, values in _LOOP.findall(line):
      env[name] = values
    try:
      commands += _line_commands(f'{document}:{number + first_line - 1}', line, env)
    except ValueError:  # unbalanced quotes: prose in a code span, or a command gone wrong
      if re.search(r'python -m secant_jax|launch/\w+\.sh', line):
        raise ValueError(f'{document}:{number}: cannot split {line!r} as a shell does') from None
  return commands


def _documents():
  """(name, text, its first line) of README.md, docs/*.md and the module docstrings of
  secant_jax/ and configs/ (their usage lines)."""
  def read(path):
    with open(os.path.join(REPO, path), encoding='utf-8') as f:
      return f.read()

  documents = [('README.md', read('README.md'), 1)]
  documents += [(path, read(path), 1) for path in sorted(glob.glob('docs/*.md', root_dir=REPO))]
  for path in sorted(glob.glob('secant_jax/**/*.py', root_dir=REPO, recursive=True)
                     + glob.glob('configs/*.py', root_dir=REPO)):
    module = ast.parse(read(path))
    docstring = ast.get_docstring(module, clean=True)
    if docstring:
      documents.append((path, docstring, module.body[0].lineno))
  return documents


COMMANDS = [c for document in _documents() for c in documented_commands(*document)]


class _Parsed(Exception):
  """Raised in place of running a command once its parser accepted the arguments."""


def _parse_argparse_command(module, args, monkeypatch):
  """Calls the module's main(argv) with argparse's parse_args made to stop once it parsed."""
  parameters = list(inspect.signature(module.main).parameters.values())
  if not parameters or parameters[0].default is inspect.Parameter.empty:
    pytest.fail(f'{module.__name__}.main takes no argv to parse: an absl program needs a '
                'define_flags(flag_values, sys_argv) as secant_jax.main has.')
  parse_args = argparse.ArgumentParser.parse_args

  def parse_and_stop(self, argv=None, namespace=None):
    raise _Parsed(parse_args(self, argv, namespace))

  with monkeypatch.context() as patch:
    patch.setattr(argparse.ArgumentParser, 'parse_args', parse_and_stop)
    with pytest.raises(_Parsed):
      module.main(list(args))


def _check_parses(where, module_name, args, monkeypatch):
  """Fails, naming `where` and the command, unless `python -m module_name *args` parses
  (in the repository's root, where the documents run their commands)."""
  shown = f'{where}: python -m {module_name} {shlex.join(args)}'
  assert importlib.util.find_spec(module_name), f'{shown}: no such module'
  monkeypatch.chdir(REPO)
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    if e.name != 'torch':
      raise
    pytest.skip(f'{module_name} needs the torch extra')
  if hasattr(module, 'define_flags'):  # an absl program, its flags defined as its __main__ does
    argv = [module_name, *args]
    values = flags.FlagValues()
    module.define_flags(values, sys_argv=argv)
    try:
      values(argv)
      for name in values:  # a config file that did not load raises on any attribute
        getattr(getattr(values, name), 'keys', None)
    except Exception as e:  # pylint: disable=broad-except  (flags errors, unknown settings)
      pytest.fail(f'{shown}: {type(e).__name__}: {e}')
    return
  try:
    _parse_argparse_command(module, args, monkeypatch)
  except SystemExit:
    pytest.fail(f'{shown}: does not parse (usage above)')


def _recorded_calls(command, tmp_path):
  """The argv of each python that the launch script runs, with a stand-in that records
  them for python (PYTHON), writing under tmp_path in place of its RUNS_DIR."""
  record, python = tmp_path / 'calls.jsonl', tmp_path / 'python'
  python.write_text(f'#!{sys.executable}\nimport json, sys\n'
                    f'with open({str(record)!r}, "a") as f:\n'
                    '  f.write(json.dumps(sys.argv[1:]) + "\\n")\n')
  python.chmod(0o755)
  run = subprocess.run(['bash', command.program, str(tmp_path / 'runs'), *command.args[1:]],
                       cwd=REPO, capture_output=True, text=True, check=False,
                       env={**os.environ, **dict(command.env), 'PYTHON': str(python)})
  assert run.returncode == 0, f'{command.where}: {command.program} failed:\n{run.stderr}'
  return [json.loads(line) for line in record.read_text().splitlines()]


CHECKED = [c for c in COMMANDS if (c.program.startswith('secant_jax') or c.program in _PASS_ON
                                   or c.program in _RECORDED) and c.args]


def test_the_documents_show_commands_of_every_kind():
  """The reader finds commands (a broken reader that finds none would pass all below), in
  the README and in docstrings (bench.oracle's usage line is only there)."""
  assert {'secant_jax.main', 'secant_jax.bench.throughput', 'secant_jax.convert.sit',
          'secant_jax.data.encode', 'secant_jax.bench.oracle', *_PASS_ON,
          *_RECORDED} <= {c.program for c in CHECKED}
  assert sum(c.program == 'secant_jax.main' and len(c.args) > 3 for c in CHECKED) >= 10


def test_the_reader_expands_variables_loops_and_optional_arguments():
  text = '\n'.join([
      'Set `M="--config.batch_size=64"` first, `MODEL=x` for the script.', '',
      '    R=runs/x', '    for v in sdei stee; do',
      '      python -m secant_jax.main --config=configs/demo.py:variant=$v \\',
      '        --workdir=$R/$v $M [--config.seed=3] &', '    done; wait',
      '    XLA_FLAGS=x TEACHER_FLAGS="$M --config.seed=2" launch/fashion_mnist.sh $R', '',
      'and `python -m secant_jax.bench.throughput ... --target h100 > log`, or',
      '`sbatch -N 4 launch/gpu_slurm.sh --workdir=$OUT/w`, `launch/tpu_pod.sh encode ARGS`,',
      '`python -m secant_jax.bench.oracle [--config=configs/oracle.py[:quick]]`.'])
  assert [dataclasses.astuple(c) for c in documented_commands('x.md', text)] == [
      ('x.md:5', 'secant_jax.main', ('--config=configs/demo.py:variant=sdei',
                                     '--workdir=runs/x/sdei', '--config.batch_size=64',
                                     '--config.seed=3'), (), ()),
      ('x.md:8', 'launch/fashion_mnist.sh', ('runs/x',),
       (('XLA_FLAGS', 'x'), ('TEACHER_FLAGS', '--config.batch_size=64 --config.seed=2')), ()),
      ('x.md:10', 'secant_jax.bench.throughput', ('--target', 'h100'), (), ()),
      ('x.md:11', 'launch/gpu_slurm.sh', ('--workdir=/w',), (), ('OUT',)),
      ('x.md:11', 'launch/tpu_pod.sh encode', (), (), ()),
      ('x.md:12', 'secant_jax.bench.oracle', ('--config=configs/oracle.py:quick',), (), ())]


@pytest.mark.parametrize('command', CHECKED, ids=lambda c: f'{c.where}:{c.program}')
def test_documented_command_parses(command, monkeypatch, tmp_path):
  assert not command.undefined, (
      f'{command.where}: {command.program} uses {", ".join("$" + v for v in command.undefined)}'
      ', not defined above it in its document: define it in the code block (NAME="...").')
  if command.program in _PASS_ON:
    module, added = _PASS_ON[command.program]
    _check_parses(command.where, module, [*command.args, *added], monkeypatch)
  elif command.program in _RECORDED:
    calls = _recorded_calls(command, tmp_path)
    assert calls, f'{command.where}: {command.program} ran no python'
    for call in calls:
      assert call[0] == '-m', call
      _check_parses(f'{command.where} ({command.program})', call[1], call[2:], monkeypatch)
  else:
    _check_parses(command.where, command.program, list(command.args), monkeypatch)
