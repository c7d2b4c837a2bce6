"""argparse types that the command-line tools (benchmarks, the Fashion-MNIST classifier, the
latent encoders) share, so that a bad count is refused by name before anything loads."""

import argparse


def _integer_at_least(minimum, what):
  """An argparse type: a whole number written in digits, at least `minimum`."""

  def parse(text):
    if not text.isdigit() or int(text) < minimum:
      raise argparse.ArgumentTypeError(f'expected {what}, got {text!r}')
    return int(text)

  return parse


positive_int = _integer_at_least(1, 'a positive integer')  # a count: at least one
non_negative_int = _integer_at_least(0, 'a non-negative integer')  # a count that may be none
