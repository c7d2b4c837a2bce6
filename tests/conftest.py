"""Test setup: 8 emulated CPU devices for the parallelism tests (set before JAX starts);
torch-marked tests are skipped when PyTorch is not installed."""

import importlib.util
import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8')

import pytest


def pytest_collection_modifyitems(config, items):
  del config
  if importlib.util.find_spec('torch') is not None:
    return
  skip = pytest.mark.skip(reason='needs PyTorch: pip install -e .[torch]')
  for item in items:
    if 'torch' in item.keywords:
      item.add_marker(skip)
