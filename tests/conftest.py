"""Test setup: torch-marked tests are skipped when PyTorch is not installed."""

import importlib.util

import pytest


def pytest_collection_modifyitems(config, items):
  del config
  if importlib.util.find_spec('torch') is not None:
    return
  skip = pytest.mark.skip(reason='needs PyTorch: pip install -e .[torch]')
  for item in items:
    if 'torch' in item.keywords:
      item.add_marker(skip)
