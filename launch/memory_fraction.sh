# Sourced by the GPU launchers. `default_memory_fraction F` lets each JAX process take the
# share F of every GPU's memory, unless the caller chose a share already, under
# XLA_CLIENT_MEM_FRACTION (read by every jaxlib since 0.7; this project needs 0.8.2) or its
# deprecated name XLA_PYTHON_CLIENT_MEM_FRACTION: jaxlib refuses to start with both set,
# so a default under the other name would break the caller's run.
default_memory_fraction() {
  [ -n "${XLA_CLIENT_MEM_FRACTION:-}${XLA_PYTHON_CLIENT_MEM_FRACTION:-}" ] ||
    export XLA_CLIENT_MEM_FRACTION="$1"
}
