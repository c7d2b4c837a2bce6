"""Test setup: 8 emulated CPU devices for the parallelism tests (set before JAX starts);
torch-marked tests are skipped when PyTorch is not installed.

Triton (which torch imports lazily, e.g. for meta-device initialisation) crashes the
process with a segmentation fault when it is loaded after TensorFlow (which CLU and TFDS
load at collection); loaded first, both work. So it is imported here, before any test
module.
"""

import importlib.util
import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8')

import pytest

if importlib.util.find_spec('triton') is not None:
  import triton  # pylint: disable=unused-import


def pytest_collection_modifyitems(config, items):
  del config
  if importlib.util.find_spec('torch') is not None:
    return
  skip = pytest.mark.skip(reason='needs PyTorch: pip install -e .[torch]')
  for item in items:
    if 'torch' in item.keywords:
      item.add_marker(skip)
