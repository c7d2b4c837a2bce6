"""setup.cfg declares what the package imports: every module imported anywhere in
secant_jax is the package's own, the standard library's, or installed by a distribution
that install_requires names; torch alone comes from an extra (read only where a PyTorch
checkpoint is, and asked for by name there: `convert.common.import_torch`)."""

import ast
import configparser
import importlib.metadata
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
FROM_EXTRAS = {'torch'}


def _imported_modules():
  modules = set()
  for path in (ROOT / 'secant_jax').rglob('*.py'):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        modules.update(alias.name.split('.')[0] for alias in node.names)
      elif isinstance(node, ast.ImportFrom) and node.level == 0:
        modules.add(node.module.split('.')[0])
  return modules - set(sys.stdlib_module_names) - {'secant_jax'}


def _normalised(name):
  return re.sub(r'[-_.]+', '-', name).lower()


def _install_requires():
  config = configparser.ConfigParser()
  config.read(ROOT / 'setup.cfg')
  lines = filter(None, map(str.strip, config['options']['install_requires'].splitlines()))
  return {_normalised(re.match(r'[A-Za-z0-9_.-]+', line).group()) for line in lines}


def test_every_module_the_package_imports_is_installed_by_install_requires():
  distributions = importlib.metadata.packages_distributions()
  required = _install_requires()
  assert {'jax', 'flax', 'tensorflow-cpu'} <= required  # the parse reads setup.cfg's list
  undeclared = {}
  for module in sorted(_imported_modules() - FROM_EXTRAS):
    names = {_normalised(d) for d in distributions.get(module, [module])}
    if not names & required:
      undeclared[module] = sorted(names)
  assert not undeclared, ('secant_jax imports these, which no distribution in setup.cfg\'s '
                          f'install_requires installs: {undeclared}; add them there.')
