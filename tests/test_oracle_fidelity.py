"""The method works: MLP secant models trained on the analytic teacher beat the teacher's
own solvers at equal NFE (SDEI vs Heun; STEE, trained from samples alone, vs Euler)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import oracle as oracle_config
from secant_jax.bench import oracle

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def table():
  """The quick table, computed in a process of its own at XLA's default optimisation level
  (2, after the suite's 0 in XLA_FLAGS: the last wins). Level 0 suits the tests that
  compile more than they run; this one runs 9000 training steps, twice as slow there."""
  env = {**os.environ, 'XLA_FLAGS': os.environ.get('XLA_FLAGS', '') +
         ' --xla_backend_optimization_level=2'}
  script = ('import json; from configs import oracle as c; from secant_jax.bench import '
            "oracle; print(json.dumps(oracle.fidelity_table(c.get_config('quick')), "
            'default=float))')
  done = subprocess.run([sys.executable, '-c', script], cwd=REPO, env=env,
                        capture_output=True, text=True, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  rows = json.loads(done.stdout.strip().splitlines()[-1])
  print('\n' + oracle.format_table(rows))
  return rows


def test_table_covers_variants_and_steps(table):
  assert [(r['variant'], r['nfe']) for r in table] == [
      ('sdei', 1), ('sdei', 2), ('sdei', 4), ('stee', 1), ('stee', 2), ('stee', 4)]


def test_losses_fall(table):
  for row in table:
    assert row['last_loss'] < 0.9 * row['first_loss'], row


def test_sdei_beats_heun_at_equal_nfe(table):
  for row in (r for r in table if r['variant'] == 'sdei'):
    assert row['secant'] < row['heun'], row


def test_stee_beats_euler_at_equal_nfe(table):
  for row in (r for r in table if r['variant'] == 'stee'):
    assert row['secant'] < row['euler'], row


def test_secant_error_shrinks_with_steps(table):
  for variant in ('sdei', 'stee'):
    errors = [r['secant'] for r in table if r['variant'] == variant]
    assert errors[-1] < errors[0], errors
  assert np.isfinite([r['secant'] for r in table]).all()


def test_config_argument_is_checked():
  with pytest.raises(ValueError, match="takes no argument or 'quick', got 'fast'"):
    oracle_config.get_config('fast')
