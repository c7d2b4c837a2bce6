"""The Orbax options of every checkpoint the package writes (a run's checkpoints, an
exported or converted model).

Replica-parallel saving cuts a replicated array into one slice per replica, each written
from its own device. Below 1 MiB per slice the cutting costs more than it saves: one
dispatched op per replica and array, each compiled once per shape (a tiny U-Net's
checkpoint on 8 CPU devices: 5,700 slices, 15 s). Larger arrays, where splitting the write
pays, are still split.
"""

MIN_REPLICA_SLICE_BYTES = 1 << 20


def context():
  """An ocp.Context (Orbax v1) with the options above: pass it to a Checkpointer, or enter it
  around ocp.save."""
  from orbax.checkpoint import v1 as ocp  # pylint: disable=import-outside-toplevel
  context = ocp.Context()
  context.array.saving.min_slice_bytes_for_replica_parallel = MIN_REPLICA_SLICE_BYTES
  return context
