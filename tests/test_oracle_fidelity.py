"""The method works: MLP secant models trained on the analytic teacher beat the teacher's
own solvers at equal NFE (SDEI vs Heun; STEE, trained from samples alone, vs Euler)."""

import numpy as np
import pytest

from configs import oracle as oracle_config
from secant_jax.bench import oracle


@pytest.fixture(scope='module')
def table():
  rows = oracle.fidelity_table(oracle_config.get_config('quick'))
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
