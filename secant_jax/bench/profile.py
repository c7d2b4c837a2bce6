"""Where a compiled program's device time goes: trace some calls with `jax.profiler`, sum
the kernel time of each HLO instruction (the `hlo_op` stat XLA puts on every kernel it
launches), and group the instructions by kind:

| kind        | HLO                                                                   |
|-------------|-----------------------------------------------------------------------|
| matmul      | dot, convolution, cuBLAS/cuDNN GEMM custom calls, fusions holding one |
| attention   | fused attention custom calls (cuDNN fmha), or fusions holding one     |
| elementwise | loop fusions and single elementwise ops                               |
| reduction   | fusions and ops that reduce (LayerNorm statistics, norms, losses)     |
| layout      | copy, transpose                                                       |
| collective  | all-reduce, all-gather, reduce-scatter, all-to-all, collective-permute |
| other       | the rest (RNG, scatter/gather, while loops' bookkeeping, ...)         |

The table says which kind of kernel is worth optimising next. The same time is also
summed by layer (`scope`: where JAX's name stack, kept in each instruction's op_name
metadata, puts it, e.g. `student/DiT/blocks_*/mlp/fc1 (backward)`), and the top
instructions name the HLO to look up in an `XLA_FLAGS=--xla_dump_to=...` dump with their
layer beside. Device busy time below the step's wall time is time the device waited for
the host.
"""

import collections
import glob
import os
import re
import tempfile

import jax

# XLA on GPUs records runs of kernels into command buffers (CUDA graphs), and a trace then
# names every kernel of one by the command buffer, not its HLO instruction (on an H200 a
# whole SiT-XL/2 step came out as four 'command_buffer_N' rows): the profiled program is
# compiled with each kernel launched on its own. A field of XLA's DebugOptions, which the
# CPU and TPU compilers accept and do not use.
COMPILER_OPTIONS = {'xla_gpu_enable_command_buffer': ''}

KINDS = ('matmul', 'attention', 'elementwise', 'reduction', 'layout', 'collective', 'other')
_COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all',
                'collective-permute')
_ELEMENTWISE = frozenset((
    'add', 'subtract', 'multiply', 'divide', 'maximum', 'minimum', 'exponential', 'log',
    'tanh', 'logistic', 'sqrt', 'rsqrt', 'negate', 'abs', 'convert', 'select', 'compare',
    'broadcast', 'power', 'sine', 'cosine', 'erf', 'bitcast-convert', 'and', 'or', 'not'))
_COMPUTATION = re.compile(r'^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*?\s([a-z][\w\-]*)\(')
CALLS = re.compile(r'\bcalls=%?([\w.\-]+)')
_OP_NAME = re.compile(r'\bop_name="([^"]*)"')
_WRAPPED = re.compile(r'^(\w+)\((.*)\)$')
# Name-stack entries of a transformation wrap the scopes traced under it (jvp(student));
# any other wrapper names a function (jit(train_step), jit(relu)), left out with it.
_TRANSFORMS = frozenset(('jvp', 'transpose', 'vmap'))
_PLUMBING = frozenset(('while', 'body', 'cond', 'closed_call', 'checkpoint', 'remat',
                       'rematted_computation', 'scan', 'shard_map'))
_LAYER = re.compile(r'[A-Za-z_]\w*')
# A numbered layer: DiT's blocks_13, EDM's U-Net's enc_32x32_block2 (not fc1, conv0, in0).
_NUMBERED = re.compile(r'(_|_block)\d+$')
SCOPE_ROWS = 16  # layers listed by the printed summaries; the rest are summed in one row


def parse_computations(hlo_text):
  """{computation: [(instruction, opcode, line)]} of HLO text."""
  computations, current = {}, None
  for line in hlo_text.splitlines():
    head = _COMPUTATION.match(line)
    if head and not line.startswith('HloModule'):
      current = computations.setdefault(head.group(1), [])
      continue
    body = _INSTRUCTION.match(line)
    if body and current is not None:
      current.append((body.group(1), body.group(2), line))
  return computations


def entry_computation(hlo_text):
  """The name of the ENTRY computation of HLO text."""
  match = re.search(r'^ENTRY %?([\w.\-]+) ', hlo_text, re.MULTILINE)
  if not match:
    raise ValueError('Expected HLO text with an ENTRY computation; pass compiled.as_text() '
                     'of a jax.jit(...).lower(...).compile().')
  return match.group(1)


def _own_kind(opcode, line):
  """The kind of one instruction from its own text, or None when only a fusion's body says."""
  text = line.lower()
  if 'fmha' in text or 'flash' in text:
    return 'attention'
  if opcode in ('dot', 'convolution') or (opcode == 'custom-call' and (
      'gemm' in text or 'matmul' in text)) or '__triton_gemm' in text:
    return 'matmul'
  if opcode.removesuffix('-start').removesuffix('-done') in _COLLECTIVES:
    return 'collective'
  if opcode in ('copy', 'transpose'):
    return 'layout'
  if opcode in ('reduce', 'reduce-window'):
    return 'reduction'
  return None


def instruction_kinds(hlo_text):
  """{instruction name: kind} for every instruction of compiled HLO text; a fusion takes
  the heaviest kind in its body (matmul > attention > collective > reduction > layout >
  elementwise)."""
  computations = parse_computations(hlo_text)
  order = ('matmul', 'attention', 'collective', 'reduction', 'layout')
  body_kinds = {}

  def body_kind(name, seen=()):
    if name in body_kinds:
      return body_kinds[name]
    found = set()
    for _, opcode, line in computations.get(name, ()):
      found.add(_own_kind(opcode, line))
      called = CALLS.search(line)
      if called and called.group(1) not in seen:
        found.add(body_kind(called.group(1), seen + (name,)))
    body_kinds[name] = next((kind for kind in order if kind in found), 'elementwise')
    return body_kinds[name]

  kinds = {}
  for instructions in computations.values():
    for name, opcode, line in instructions:
      kind = _own_kind(opcode, line)
      if kind is None and opcode == 'fusion':
        called = CALLS.search(line)
        kind = body_kind(called.group(1)) if called else 'elementwise'
      kinds[name] = kind or ('elementwise' if opcode in _ELEMENTWISE else 'other')
  return kinds


def scope(op_name):
  """The layer an instruction belongs to, from its op_name (JAX's name stack): the named
  scopes and Flax modules it was traced in, numbered layers merged (blocks_13 → blocks_*,
  enc_32x32_block2 → enc_32x32_block*), with ' (backward)' in a transposed pass and
  ' (forward)' in the pass it differentiates; 'top level' outside every scope (the
  optimizer, the EMA, the loss). Under remat the stack restarts at each transformation, and
  is read from the last restart:

      jit(train_step)/transpose(jvp(student))/DiT/blocks_13/mlp/fc1/dot_general
      → student/DiT/blocks_*/mlp/fc1 (backward)
  """
  names, restart, transforms = [], None, set()
  for part in op_name.split('/')[:-1]:  # the last is the primitive
    wrappers = []
    while wrapped := _WRAPPED.match(part):
      wrappers.append(wrapped.group(1))
      part = wrapped.group(2)
    if not _TRANSFORMS.issuperset(wrappers):
      continue
    if wrappers:
      transforms.update(wrappers)
      restart = len(names) if restart is None else restart
      names = names[:restart]
    if _LAYER.fullmatch(part) and part not in _PLUMBING:
      names.append(_NUMBERED.sub(r'\1*', part))
  layer = '/'.join(names) or 'top level'
  if 'transpose' in transforms:
    return f'{layer} (backward)'
  return f'{layer} (forward)' if 'jvp' in transforms else layer


def instruction_scopes(hlo_text):
  """{instruction name: its `scope`} for every instruction of compiled HLO text ('unnamed'
  without op_name metadata); a fusion carries the op_name of the op at its root."""
  scopes = {}
  for instructions in parse_computations(hlo_text).values():
    for name, _, line in instructions:
      op_name = _OP_NAME.search(line)
      scopes[name] = scope(op_name.group(1)) if op_name else 'unnamed'
  return scopes


def largest_scopes(totals, top=SCOPE_ROWS):
  """[(scope, total)] of the `top` largest of {scope: total}, then the rest in one row."""
  ranked = sorted(totals.items(), key=lambda item: -item[1])
  rest = ranked[top:]
  if len(rest) > 1:
    ranked = ranked[:top] + [(f'({len(rest)} more layers)', sum(v for _, v in rest))]
  return ranked


_DERIVED_LINES = ('XLA Modules', 'Steps', 'Framework Ops', 'Framework Name Scope',
                  'Source code', 'XLA TraceMe')


def _op_lines(plane):
  """A plane's lines that hold one event per kernel: its 'XLA Ops' line when it has one
  (TPU), else every line but the derived per-module/per-step ones (GPU streams, CPU)."""
  lines = list(plane.lines)
  ops = [line for line in lines if line.name == 'XLA Ops']
  return ops or [line for line in lines if line.name not in _DERIVED_LINES]


def hlo_op_times(xspace_file, module_name):
  """{hlo_op: (total ns, kernel count)} of the events of `module_name` in a trace file.

  Device planes when the trace has any (GPU, TPU): every kernel, named by its hlo_op stat
  (or its own name when it has none) and skipped only when it names another module.
  Otherwise the host's XLA events (CPU), which must name the module.
  """
  data = jax.profiler.ProfileData.from_file(xspace_file)
  # '/device:CUSTOM:...' planes are not devices: libtpu's profiler adds one for its
  # Megascale (cross-slice) events, also on a CPU machine where it is merely installed.
  devices = [p for p in data.planes if p.name.startswith('/device:')
             and not p.name.startswith('/device:CUSTOM:')]
  times = collections.defaultdict(lambda: [0.0, 0])
  for plane in devices or data.planes:
    for line in _op_lines(plane):
      for event in line.events:
        stats = dict(event.stats)
        module = stats.get('hlo_module')
        if module != module_name and (module is not None or not devices):
          continue
        entry = times[stats.get('hlo_op', event.name)]
        entry[0] += event.duration_ns
        entry[1] += 1
  return {op: tuple(value) for op, value in times.items()}


def trace(run, iterations, directory=None):
  """Calls run() `iterations` times under the profiler; returns the trace file's path.
  run returns what to block on."""
  directory = directory or tempfile.mkdtemp(prefix='secant-profile-')
  jax.block_until_ready(run())
  with jax.profiler.trace(directory):
    for _ in range(iterations):
      jax.block_until_ready(run())
  files = sorted(glob.glob(os.path.join(directory, '**', '*.xplane.pb'), recursive=True),
                 key=os.path.getmtime)
  if not files:
    raise RuntimeError(f'jax.profiler wrote no .xplane.pb under {directory}; check that '
                       'the directory is writable.')
  return files[-1]


def module_name(hlo_text):
  match = re.match(r'HloModule ([\w.\-]+)', hlo_text)
  if not match:
    raise ValueError('Expected compiled HLO text starting with "HloModule <name>"; pass '
                     'compiled.as_text() of a jax.jit(...).lower(...).compile().')
  return match.group(1)


def breakdown(run, hlo_text, iterations=3, directory=None, top=12):
  """Profiles `iterations` calls of run(), whose compiled program's HLO is `hlo_text`.

  Returns {'busy_ms': device ms per call, 'kinds': {kind: ms per call},
  'scopes': {layer (`scope`): ms per call},
  'top': [(instruction, kind, ms per call, kernels per call, layer)], 'trace': the trace file}.
  """
  path = trace(run, iterations, directory)
  times = hlo_op_times(path, module_name(hlo_text))
  if not times:
    raise RuntimeError(f'The trace {path} has no kernels of module '
                       f'{module_name(hlo_text)!r}: was run() the compiled program?')
  kinds, scopes = instruction_kinds(hlo_text), instruction_scopes(hlo_text)
  per_kind = dict.fromkeys(KINDS, 0.0)
  per_scope = collections.Counter()
  rows = []
  for op, (ns, count) in times.items():
    kind, layer = kinds.get(op, 'other'), scopes.get(op, 'unnamed')
    per_kind[kind] += ns / iterations / 1e6
    per_scope[layer] += ns / iterations / 1e6
    rows.append((op, kind, ns / iterations / 1e6, count / iterations, layer))
  rows.sort(key=lambda row: -row[2])
  return {'busy_ms': sum(per_kind.values()), 'kinds': per_kind, 'scopes': dict(per_scope),
          'top': rows[:top], 'trace': path}


def format_breakdown(result, step_ms=None):
  """The breakdown as printable lines."""
  busy = result['busy_ms']
  lines = [f'device busy {busy:.2f} ms per call'
           + ('' if step_ms is None else f' of {step_ms:.2f} ms wall '
              f'({100 * busy / step_ms:.0f}%)'), f'{"kind":>12}  {"ms":>9}  share']
  for kind, ms in sorted(result['kinds'].items(), key=lambda item: -item[1]):
    if ms:
      lines.append(f'{kind:>12}  {ms:9.3f}  {100 * ms / busy:5.1f}%')
  lines.append(f'{"ms":>9}  share  layer')
  for layer, ms in largest_scopes(result['scopes']):
    lines.append(f'{ms:9.3f}  {100 * ms / busy:5.1f}%  {layer}')
  lines.append(f'top instructions ({result["trace"]}):')
  for op, kind, ms, count, layer in result['top']:
    lines.append(f'  {op:<40} {kind:<12} {ms:9.3f} ms  {count:g} kernels  {layer}')
  return lines
