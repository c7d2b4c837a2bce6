"""Test setup: 8 emulated CPU devices for the parallelism tests (set before JAX starts);
torch-marked tests are skipped when PyTorch is not installed.

XLA's CPU backend compiles at optimisation level 0: the suite compiles far more than it
computes (a tiny U-Net's train step: 33 s to compile at the default level, 17 s at 0, for
0.5 s → 1 s per step), so test_loop.py takes 7 minutes instead of 10. Subprocesses inherit
these flags; a test that needs another device count appends its own (the last of a
repeated XLA flag wins).

Triton (which torch imports lazily, e.g. for meta-device initialisation) crashes the
process with a segmentation fault when it is loaded after TensorFlow (which CLU and TFDS
load at collection); loaded first, both work. So it is imported here, before any test
module.
"""

import importlib.util
import os
import signal
import sys
import threading
import types

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8'
                           ' --xla_backend_optimization_level=0')

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


@pytest.fixture
def edit_benchmark_config(monkeypatch):
  """edit(change): for the rest of the test the benchmark's configs pass through
  change(config) (a model cut to CPU size); returns the edited loader."""
  from secant_jax.bench import throughput  # pylint: disable=import-outside-toplevel
  load = throughput.load_config

  def edit(change):
    def edited(args):
      config = load(args)
      change(config)
      return config

    monkeypatch.setattr(throughput, 'load_config', edited)
    return edited

  return edit


@pytest.fixture
def two_block_dit(edit_benchmark_config):
  """The benchmark's DiT (any --model) cut to two blocks: every path of the benchmark at a
  fraction of the compilation (a DiT's blocks are unrolled: DiT-S/8 has twelve)."""
  edit_benchmark_config(lambda config: config.model.update(depth=2))


@pytest.fixture
def from_a_terminal():
  """argv → the argv that runs it with SIGINT at its default, as a command started from a
  terminal has it, whatever this process ignores: a suite started in the background ignores
  SIGINT, and a child inherits that (Python then installs no KeyboardInterrupt, and bash
  cannot trap a signal ignored when it started)."""
  wrapper = ('import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); '
             'os.execvp(sys.argv[1], sys.argv[1:])')
  return lambda argv: [sys.executable, '-c', wrapper, *argv]


@pytest.fixture
def gcs_bucket(monkeypatch, request):
  """'gs://bucket-…' (named after the test), served for the duration of a test by a local
  emulator of Cloud Storage's JSON API (gcp-storage-emulator, in memory). Tensorstore
  (Orbax's array writes), epath's fsspec backend (gcsfs: Orbax's metadata, the run's
  files) and ArrayRecord's reader (google-cloud-cpp: the training data) are pointed at it; TensorFlow's GCS file system, which epath prefers where
  TensorFlow is installed, has no endpoint setting, so it is switched off for the test. The
  name differs per test because the clients cache listings by path across tests: a second
  test's gs://bucket/run/checkpoints listed the first test's steps."""
  import hashlib
  import socket
  import gcsfs
  from etils.epath import gpath
  from gcp_storage_emulator.server import create_server
  with socket.socket() as probe:
    probe.bind(('localhost', 0))
    port = probe.getsockname()[1]
  bucket = 'bucket-' + hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:12]
  server = create_server('localhost', port, in_memory=True, default_bucket=bucket)
  server.start()
  url = f'http://localhost:{port}'
  monkeypatch.setenv('TENSORSTORE_GCS_HTTP_URL', url)
  monkeypatch.setenv('GOOGLE_AUTH_TOKEN_FOR_TESTING', 'emulator')
  monkeypatch.setenv('STORAGE_EMULATOR_HOST', url)
  monkeypatch.setenv('CLOUD_STORAGE_EMULATOR_ENDPOINT', url)
  # gcsfs's default class first asks a gRPC API for the bucket's type (60 s timeouts here).
  monkeypatch.setattr(gcsfs, 'GCSFileSystem', gcsfs.core.GCSFileSystem)
  monkeypatch.setattr(gpath, '_is_tf_installed', lambda: False)
  import fsspec
  monkeypatch.setitem(fsspec.config.conf, 'gs', {'token': 'anon', 'skip_instance_cache': True})
  threads = set(threading.enumerate())
  yield f'gs://{bucket}'
  # The emulator serves one request at a time, so the read-ahead of a (closed) data iterator
  # can still be reading when the test ends; stopped under it, such a read retries for
  # minutes and holds the process at exit.
  readers = [t for t in set(threading.enumerate()) - threads if t.name.startswith('grain')]
  for thread in readers:
    thread.join(timeout=120)
  server.stop()
  assert not any(t.is_alive() for t in readers), 'a data iterator left open: its threads read on'


@pytest.fixture
def progress_saves(monkeypatch):
  """`.done`: the sample count of every evaluation.progress save, in order. `.signum`
  (SIGTERM unless set) reaches the process in the batch that ends at 8 samples (the first
  time), as a preemption would, to the handler the evaluation installed (stop_requests),
  which then saves and stops."""
  from secant_jax import stop_requests  # pylint: disable=import-outside-toplevel
  from secant_jax.evaluation import progress  # pylint: disable=import-outside-toplevel
  saves = types.SimpleNamespace(done=[], signum=signal.SIGTERM, sent=False)
  save, save_if_due = progress.Progress.save, progress.Progress.save_if_due

  def record(self, done, arrays):
    save(self, done, arrays)
    saves.done.append(done)

  def signal_at_8(self, done, total, arrays_of):
    if done == 8 and not saves.sent:
      handler = signal.getsignal(saves.signum)
      if not isinstance(getattr(handler, '__self__', None), stop_requests.StopRequests):
        pytest.fail(f'{signal.Signals(saves.signum).name} is not watched: it would end the '
                    'run (and this test) unsaved')
      saves.sent = True
      os.kill(os.getpid(), saves.signum)
    save_if_due(self, done, total, arrays_of)

  monkeypatch.setattr(progress.Progress, 'save', record)
  monkeypatch.setattr(progress.Progress, 'save_if_due', signal_at_8)
  return saves


@pytest.fixture
def set_sigint():
  """set(disposition) sets SIGINT's for the rest of the test (Python's KeyboardInterrupt, as
  in a terminal; SIG_IGN, as in a shell script's background job), whatever this process
  started with (a suite started in the background ignores SIGINT)."""
  before = signal.getsignal(signal.SIGINT)
  yield lambda disposition: signal.signal(signal.SIGINT, disposition)
  signal.signal(signal.SIGINT, before)
