"""Every `python -m secant_jax.…` command that README.md and docs/ show parses as written:
the module exists, its flags do, `secant_jax.main`'s config file loads with the arguments
after ':' and each --config.key=value names a setting that takes the value. A flag or
setting renamed in the code fails here, not in a reader's shell.

Commands are read from indented code blocks (lines ending in '\\' joined) and from inline
code spans. Shell variables are expanded from the assignments the file makes before the
command, in code blocks or inline (`M="..."`), and a loop variable (`for v in a b`) takes
its first value; a variable the file defines only in words is left out, and so are the
elision `...` and the brackets of an optional argument (`[--fsdp 8]` is checked as given).
Parsing runs nothing: argparse commands stop at their parser, `secant_jax.main` is parsed
as its `__main__` does (`main.parse_command_line`).
"""

import argparse
import bisect
import dataclasses
import glob
import importlib
import importlib.util
import inspect
import os
import re
import shlex

import pytest

from secant_jax import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCUMENTS = ('README.md', *sorted(os.path.relpath(p, REPO)
                                  for p in glob.glob(os.path.join(REPO, 'docs', '*.md'))))
_ASSIGNMENT = re.compile(r'(?:^|(?<=[\s;]))([A-Za-z_]\w*)=("[^"]*"|\'[^\']*\'|[^\s;"\']*)')
_LOOP = re.compile(r'\bfor (\w+) in (\S+)')
_VARIABLE = re.compile(r'\$(\w+)|\$\{(\w+)\}')
_COMMAND_ENDS = (';', '&&', '||', '|', '&', 'done')


@dataclasses.dataclass(frozen=True)
class Command:
  where: str  # 'FILE:LINE'
  module: str
  args: tuple


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
  return _VARIABLE.sub(lambda m: env.get(m.group(1) or m.group(2), ''), text)


def _unquote(value):
  return value[1:-1] if value[:1] in '"\'' and value[-1:] == value[:1] else value


def documented_commands(document, text):
  """The `python -m secant_jax.X` commands in `text`, the contents of `document`."""
  env, commands = {}, []
  for number, line in _shell_lines(text):
    for name, value in _ASSIGNMENT.findall(line.split('python -m ')[0]):
      env[name] = _expand(_unquote(value), env)
    for name, values in _LOOP.findall(line):
      env[name] = values
    line = re.sub(r'\[(--[^\]]*)\]', r'\1', _expand(line, env))
    for call in line.split('python -m ')[1:]:
      lexer = shlex.shlex(call, posix=True, punctuation_chars=';&|')
      lexer.whitespace_split = True
      module, *tokens = list(lexer)
      args = []
      for token in tokens:
        if token in _COMMAND_ENDS or token.startswith('>'):
          break
        if token != '...':
          args.append(token)
      if re.fullmatch(r'secant_jax(\.\w+)+', module):  # not a pattern such as secant_jax.…
        commands.append(Command(f'{document}:{number}', module, tuple(args)))
  return commands


def _read(document):
  with open(os.path.join(REPO, document), encoding='utf-8') as f:
    return f.read()


COMMANDS = [c for d in DOCUMENTS for c in documented_commands(d, _read(d))]


class _Parsed(Exception):
  """Raised in place of running a command once its parser accepted the arguments."""


def _parse_argparse_command(module_name, args, monkeypatch):
  """Calls the module's main(argv) with argparse's parse_args made to stop once it parsed."""
  module = importlib.import_module(module_name)
  parameters = list(inspect.signature(module.main).parameters.values())
  if not parameters or parameters[0].default is inspect.Parameter.empty:
    pytest.fail(f'{module_name}.main takes no argv to parse (an absl program?): teach '
                'tests/test_documented_commands.py to parse it without running it.')
  parse_args = argparse.ArgumentParser.parse_args

  def parse_and_stop(self, argv=None, namespace=None):
    raise _Parsed(parse_args(self, argv, namespace))

  monkeypatch.setattr(argparse.ArgumentParser, 'parse_args', parse_and_stop)
  with pytest.raises(_Parsed):
    module.main(list(args))


def test_the_documents_show_commands_of_every_kind():
  """The reader finds commands (a broken reader that finds none would pass all below)."""
  modules = {c.module for c in COMMANDS}
  assert {'secant_jax.main', 'secant_jax.bench.throughput', 'secant_jax.convert.sit',
          'secant_jax.data.encode'} <= modules
  assert sum(c.module == 'secant_jax.main' and len(c.args) > 3 for c in COMMANDS) >= 10


def test_the_reader_expands_variables_loops_and_optional_arguments():
  text = '\n'.join([
      'Set `M="--config.batch_size=64"` first.', '',
      '    R=runs/x', '    for v in sdei stee; do',
      '      python -m secant_jax.main --config=configs/demo.py:variant=$v \\',
      '        --workdir=$R/$v $M [--config.seed=3] &', '    done; wait', '',
      'and `python -m secant_jax.bench.throughput ... --target h100 > log`.'])
  assert [(c.where, c.module, c.args) for c in documented_commands('x.md', text)] == [
      ('x.md:5', 'secant_jax.main', ('--config=configs/demo.py:variant=sdei',
                                     '--workdir=runs/x/sdei', '--config.batch_size=64',
                                     '--config.seed=3')),
      ('x.md:9', 'secant_jax.bench.throughput', ('--target', 'h100'))]


@pytest.mark.parametrize('command', COMMANDS, ids=lambda c: f'{c.where}:{c.module}')
def test_documented_command_parses(command, monkeypatch):
  assert importlib.util.find_spec(command.module), f'{command.where}: no module {command.module}'
  if not command.args:  # a mention of the program, not a command line
    return
  if command.module == 'secant_jax.main':
    try:
      main.parse_command_line([a.replace('configs/', f'{REPO}/configs/', 1)
                               if a.startswith('--config=configs/') else a
                               for a in command.args])
    except Exception as e:  # pylint: disable=broad-except  (flags errors, unknown settings)
      pytest.fail(f'{command.where}: python -m secant_jax.main {shlex.join(command.args)}: '
                  f'{type(e).__name__}: {e}')
    return
  try:
    _parse_argparse_command(command.module, command.args, monkeypatch)
  except ModuleNotFoundError as e:
    if e.name != 'torch':
      raise
    pytest.skip(f'{command.module} needs the torch extra')
  except SystemExit:
    pytest.fail(f'{command.where}: python -m {command.module} {shlex.join(command.args)} '
                'does not parse (usage above)')
