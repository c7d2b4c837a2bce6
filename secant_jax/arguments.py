"""argparse types that the command-line tools (benchmarks, the Fashion-MNIST classifier)
share, so that a bad count is refused by name before anything loads."""

import argparse


def positive_int(text):
  """A count: a positive integer."""
  if not text.isdigit() or int(text) < 1:
    raise argparse.ArgumentTypeError(f'expected a positive integer, got {text!r}')
  return int(text)
