import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
from orbax.checkpoint._src.serialization import replica_slices

from configs import demo as demo_config

from secant_jax.convert import common
from secant_jax.models import registry
from secant_jax.train import checkpoint
from secant_jax.train import loop
from secant_jax.train import parallel
from secant_jax.train import state as state_lib


def _state(step):
  variables = {'params': {'w': jnp.arange(4096.0).reshape(64, 64) + step, 'b': jnp.ones(3)}}
  st = state_lib.create(variables, optax.adam(1e-3), jax.random.key(0))
  return st.replace(step=jnp.asarray(step, jnp.int32))


class _Iterator:
  """Stands in for the data iterator: its state, and how often it was asked for it."""

  def __init__(self, position):
    self.position, self.reads = position, 0

  def get_state(self):
    self.reads += 1
    return {'position': self.position}


def _sharded(step, mesh):
  st = _state(step)
  shardings = parallel.tree_sharding(st, mesh, fsdp=True, min_size=1024)
  return jax.device_put(st, shardings), shardings


def test_interval_keep_n_and_sharded_restore(tmp_path):
  mesh = parallel.make_mesh(4)
  ckpts = checkpoint.Checkpoints(tmp_path, every=2, keep=2)
  reads = 0
  for step in range(7):
    st, shardings = _sharded(step, mesh)
    data_iter = _Iterator(step * 16)
    assert not ckpts.save_if_due(step, st, data_iter)
    reads += data_iter.reads
  ckpts.wait()
  assert reads == 4  # steps 0, 2, 4, 6: nothing is read between saves
  assert sorted(int(d) for d in os.listdir(tmp_path) if d.isdigit()) == [4, 6]
  restored, data = ckpts.restore_latest(checkpoint.abstract_like(_state(0), shardings))
  ckpts.close()
  assert int(restored.step) == 6 and data == {'position': 96}
  np.testing.assert_array_equal(restored.params['params']['w'], _state(6).params['params']['w'])
  assert restored.params['params']['w'].sharding.spec == shardings.params['params']['w'].spec
  assert 'fsdp' in restored.params['params']['w'].sharding.spec


def test_sigterm_forces_a_save_and_asks_to_stop(tmp_path):
  before = signal.getsignal(signal.SIGTERM)
  ckpts = checkpoint.Checkpoints(tmp_path, every=100, keep=3)
  assert not ckpts.save_if_due(1, _state(1), _Iterator(1))
  os.kill(os.getpid(), signal.SIGTERM)
  assert ckpts.stop.requested
  assert ckpts.save_if_due(3, _state(3), _Iterator(3))
  assert ckpts.latest_step == 3
  ckpts.close()
  reopened = checkpoint.Checkpoints(tmp_path, every=100, keep=3)
  state, data = reopened.restore_latest(
      checkpoint.abstract_like(_state(0), jax.sharding.SingleDeviceSharding(jax.devices()[0])))
  reopened.close()
  assert int(state.step) == 3 and data == {'position': 3}
  assert signal.getsignal(signal.SIGTERM) is before  # close() gives the handler back


def test_ctrl_c_forces_a_save_and_asks_to_stop_and_a_second_stops_now(tmp_path, set_sigint,
                                                                       capfd):
  """Ctrl-C raised KeyboardInterrupt wherever the step was, losing the steps since the
  last save."""
  set_sigint(signal.default_int_handler)
  ckpts = checkpoint.Checkpoints(tmp_path, every=100, keep=3)
  assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
  os.kill(os.getpid(), signal.SIGINT)
  assert ckpts.stop.requested and ckpts.stop.by == 'Ctrl-C'
  assert ('Ctrl-C: the run stops after this step, with a checkpoint. Ctrl-C again: it '
          'stops now (a save under way still commits).') in capfd.readouterr().err
  assert ckpts.save_if_due(3, _state(3), _Iterator(3)) and ckpts.latest_step == 3
  with pytest.raises(KeyboardInterrupt):
    os.kill(os.getpid(), signal.SIGINT)
  ckpts.close()
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # given back


def test_a_process_that_ignores_sigint_keeps_ignoring_it(tmp_path, set_sigint):
  """A script's background stage (launch/fashion_mnist.sh), which the script stops with
  SIGTERM."""
  set_sigint(signal.SIG_IGN)
  ckpts = checkpoint.Checkpoints(tmp_path, every=100, keep=3)
  assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
  os.kill(os.getpid(), signal.SIGINT)
  assert not ckpts.stop.requested
  ckpts.close()
  assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_a_checkpoint_of_another_model_is_refused_naming_the_arrays_and_kept(tmp_path):
  ckpts = checkpoint.Checkpoints(tmp_path, every=1, keep=3)
  ckpts.save(1, _state(1), _Iterator(1))
  ckpts.wait()
  more = {'params': {'w': jnp.zeros((64, 64)), 'b': jnp.ones(3), 'extra': jnp.zeros(2)}}
  other = state_lib.create(more, optax.adam(1e-3), jax.random.key(0))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with pytest.raises(ValueError, match=(
      r'checkpoint at step 1 in .* does not fit the configured run \(4 arrays differ: '
      r'params/params/extra is not in the checkpoint; ema_params/params/extra is not in the '
      r'checkpoint; opt_state/0/mu/extra is not in the checkpoint; ...\): the config changed')):
    ckpts.restore_latest(checkpoint.abstract_like(other, device))
  narrower = {'params': {'w': jnp.zeros((64, 32))}}
  with pytest.raises(ValueError, match=(
      r'\(8 arrays differ: params/params/w is \(64, 64\) float32 in the checkpoint, \(64, 32\) '
      r'float32 in the run; ema_params/params/w is')):
    ckpts.restore_latest(checkpoint.abstract_like(
        state_lib.create(narrower, optax.adam(1e-3), jax.random.key(0)), device))
  state, _ = ckpts.restore_latest(checkpoint.abstract_like(_state(0), device))
  ckpts.close()
  assert int(state.step) == 1 and sorted(os.listdir(tmp_path)) == ['1']


def test_restore_without_checkpoints_is_none(tmp_path):
  ckpts = checkpoint.Checkpoints(tmp_path / 'fresh', every=10, keep=1)
  assert ckpts.restore_latest(None) is None
  ckpts.close()


def test_checkpoints_on_a_bucket_keep_restore_and_survive_a_stop(gcs_bucket):
  """A pod's workdir is gs://…: object stores have no atomic rename, so Orbax commits there
  differently than on a local disk. Same schedule as above plus a SIGTERM, on an emulated
  bucket: saves at 0, 2, 4 and the forced 5, the latest two kept, FSDP-sharded restore."""
  from etils import epath
  mesh = parallel.make_mesh(4)
  directory = f'{gcs_bucket}/run/checkpoints'
  ckpts = checkpoint.Checkpoints(directory, every=2, keep=2)
  for step in range(6):
    if step == 5:
      os.kill(os.getpid(), signal.SIGTERM)
    st, shardings = _sharded(step, mesh)
    assert ckpts.save_if_due(step, st, _Iterator(step * 16)) == (step == 5)
  ckpts.close()
  assert sorted(p.name for p in epath.Path(directory).iterdir()) == ['4', '5']
  reopened = checkpoint.Checkpoints(directory, every=2, keep=2)
  restored, data = reopened.restore_latest(checkpoint.abstract_like(_state(0), shardings))
  reopened.close()
  assert int(restored.step) == 5 and data == {'position': 80}
  np.testing.assert_array_equal(restored.params['params']['w'], _state(5).params['params']['w'])
  assert 'fsdp' in restored.params['params']['w'].sharding.spec


def test_replicated_arrays_are_split_over_replicas_only_from_1_mib_a_part(tmp_path,
                                                                          monkeypatch):
  """Orbax's replica-parallel save (orbax_context): in the trainer's checkpoints and in
  exports, a small replicated array is written whole by one replica; one whose part per
  replica is 1 MiB or more is still split over the 8 replicas."""
  pieces = {}
  get = replica_slices.get_replica_slices

  def recording(arr, *args, **kwargs):
    result = get(arr, *args, **kwargs)
    pieces[arr.size] = len(result.replica_slices)
    return result

  monkeypatch.setattr(replica_slices, 'get_replica_slices', recording)
  replicated = parallel.replicated(parallel.make_mesh())
  small, large = 64, 8 * (1 << 20) // 4  # float32: 32 B and 1 MiB a replica
  tree = jax.device_put({'small': jnp.ones(small), 'large': jnp.ones(large)}, replicated)
  common.save(tree, tmp_path / 'export')
  assert pieces == {small: 1, large: 8}
  pieces.clear()
  with checkpoint.Checkpoints(tmp_path / 'run', every=1, keep=1) as ckpts:
    ckpts.save(1, jax.device_put(_state(1), replicated), _Iterator(0))
  assert pieces[4096] == 1  # w (16 KiB: 8 parts of 2 KiB at the default), in params and EMA


def test_a_teacher_fills_a_secant_model_and_only_what_it_lacks_is_initialised(tmp_path,
                                                                               monkeypatch):
  """A teacher's checkpoint into a guided secant model: the guidance embedder is the secant
  model's init from the key given, the rest the teacher's. A checkpoint that holds every module is fitted without fresh variables (SiT-XL/2's: 9 s
  and 2.7 GB on a CPU, for values then thrown away)."""
  model = demo_config.get_config().model
  model.update(dict(hidden_size=32, depth=1, num_heads=2))
  teacher, secant_model = (registry.build(model, guided=g) for g in (False, True))
  teacher_variables = teacher.init(jax.random.key(1))
  common.save(teacher_variables, tmp_path / 'teacher')
  loaded = traverse_util.flatten_dict(loop.load_into(secant_model, tmp_path / 'teacher',
                                                     jax.random.key(2)))
  fresh = traverse_util.flatten_dict(secant_model.init(jax.random.key(2)))
  held = traverse_util.flatten_dict(teacher_variables)
  assert loaded.keys() == fresh.keys()
  assert {p[1] for p in loaded.keys() - held.keys()} == {'cfg_embedder'}
  for path, value in loaded.items():
    np.testing.assert_array_equal(value, held.get(path, fresh[path]), err_msg=str(path))
  common.save(traverse_util.unflatten_dict(loaded), tmp_path / 'secant')
  monkeypatch.setattr(registry.Network, 'init',
                      lambda *a: pytest.fail('fresh variables made for a whole checkpoint'))
  again = traverse_util.flatten_dict(loop.load_into(secant_model, tmp_path / 'secant',
                                                    jax.random.key(3)))
  assert again.keys() == loaded.keys()
  for path, value in loaded.items():
    np.testing.assert_array_equal(again[path], value, err_msg=str(path))
