"""The bytes a compiled program moves through device memory, counted from its HLO.

Every kernel-level instruction (one of the entry computation or of a while loop's body,
other than parameters, constants, tuples, bitcasts and the like) reads each operand once
and writes its output once, except that a fusion reads an operand its body only slices
(after bitcasts, reshapes or transposes) as the slices (q, k and v cut from one qkv product
read a third of it each); a loop body counts once per trip where XLA knows the trip count.
A custom call's scratch buffer, the rank-1 s8/u8 last element of its output tuple (the
workspace XLA gives each cuBLAS GEMM and cuDNN attention call: 4 MiB per GEMM compiled
without a GPU; cuBLAS asks for 32 MiB on Hopper GPUs), is not counted: the kernel uses
what its algorithm needs of it, often none.
For a step of M FLOPs and B bytes on a device of peak rate P and bandwidth W the two floors
are M/P and B/W: a fusion structure that moves fewer bytes shows here before any timing.
The count is static: it ignores caches (small operands re-read from L2 are counted as if
from memory) and a kernel's own re-reads (a matmul reading a tile twice).

Grouped by the kinds of `bench.profile` (matmul, attention, elementwise, ...) and by its
layers (`profile.scope`), so the static bytes and a measured profile line up kind by kind
and layer by layer.
"""

import collections
import re

from secant_jax.bench import profile

_ITEM_BYTES = {'pred': 1, 's4': 0.5, 'u4': 0.5, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2,
               'f16': 2, 'bf16': 2, 's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8,
               'f64': 8, 'c64': 8, 'c128': 16}
_ARRAY = re.compile(r'\b([a-z]\w*?)\[([\d,]*)\]')
# Instructions that launch no kernel of their own.
_FREE = frozenset(('parameter', 'constant', 'get-tuple-element', 'tuple', 'bitcast',
                   'while', 'conditional', 'call', 'after-all', 'partition-id',
                   'replica-id', 'opt-barrier', 'add-dependency'))
_SUBCOMPUTATIONS = re.compile(
    r'\b(?:body|to_apply|true_computation|false_computation)=%?([\w.\-]+)'
    r'|branch_computations=\{([^}]*)\}')
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_SLICES = frozenset(('slice', 'dynamic-slice'))
_REARRANGEMENTS = frozenset(('bitcast', 'reshape', 'transpose'))


def array_bytes(shape_text):
  """Bytes of every array in an HLO shape, e.g. '(bf16[64,256]{1,0}, f32[8])' → 32800."""
  total = 0
  for dtype, dims in _ARRAY.findall(shape_text):
    item = _ITEM_BYTES.get(dtype, 1 if dtype.startswith('f8') else None)
    if item is None:
      continue
    count = 1
    for dim in filter(None, dims.split(',')):
      count *= int(dim)
    total += count * item
  return int(total)


def _split_instruction(opcode, line):
  """(output shape text, operand names, attribute text) of one instruction's line."""
  rhs = line.split(' = ', 1)[1]
  at = rhs.index(f' {opcode}(')
  args_start = at + len(opcode) + 2
  args_end = rhs.index(')', args_start)
  operands = [arg.strip().lstrip('%') for arg in rhs[args_start:args_end].split(',')]
  return rhs[:at], [name for name in operands if name], rhs[args_end + 1:]


def _written_bytes(opcode, shape_text):
  """Bytes an instruction writes: its output, less a custom call's scratch buffer."""
  arrays = _ARRAY.findall(shape_text)
  if opcode == 'custom-call' and shape_text.startswith('(') and len(arrays) > 1:
    dtype, dims = arrays[-1]
    if dtype in ('s8', 'u8') and ',' not in dims:
      return array_bytes(shape_text) - array_bytes(f'{dtype}[{dims}]')
  return array_bytes(shape_text)


def _parsed(lines):
  """[(name, opcode, output shape, operands, attributes)] of a computation's lines."""
  return [(name, opcode, *_split_instruction(opcode, line)) for name, opcode, line in lines]


def _sliced_reads(fused):
  """{operand index: bytes read} for the parameters of a fused computation (its parsed
  lines) that are only ever sliced, directly or through bitcasts, reshapes and transposes
  (index arithmetic inside a fusion): such an operand is read as its slices."""
  parameters = {name: int(operands[0]) for name, opcode, _, operands, _ in fused
                if opcode == 'parameter'}
  source = {name: name for name in parameters}  # a parameter or a rearrangement of one
  reads, whole = {}, set()
  for name, opcode, shape, operands, _ in fused:
    for position, operand in enumerate(operands):
      if operand not in source:
        continue
      if opcode in _REARRANGEMENTS:
        source[name] = source[operand]
      elif opcode in _SLICES and position == 0:
        reads[source[operand]] = reads.get(source[operand], 0) + array_bytes(shape)
      else:
        whole.add(source[operand])
  return {parameters[name]: moved for name, moved in reads.items() if name not in whole}


def instruction_traffic(hlo_text):
  """[(instruction, opcode, kind, bytes per call, kernels per call, layer)] of compiled HLO
  text, heaviest first; kinds as `profile.instruction_kinds`, layers as `profile.scope`."""
  computations = profile.parse_computations(hlo_text)
  kinds = profile.instruction_kinds(hlo_text)
  scopes = profile.instruction_scopes(hlo_text)
  rows = []

  def walk(computation, trips):
    parsed = _parsed(computations.get(computation, ()))
    shapes = {name: shape for name, _, shape, _, _ in parsed}
    for name, opcode, shape, operands, attributes in parsed:
      if opcode in ('while', 'conditional', 'call'):
        count = _TRIP_COUNT.search(attributes) if opcode == 'while' else None
        inner = trips * (int(count.group(1)) if count else 1)
        for single, listed in _SUBCOMPUTATIONS.findall(attributes):
          for called in [single] if single else listed.replace('%', '').split(','):
            walk(called.strip(), inner)
      if opcode in _FREE or opcode.endswith('-done'):
        continue
      fused = profile.CALLS.search(attributes) if opcode == 'fusion' else None
      sliced = _sliced_reads(_parsed(computations.get(fused.group(1), ()))) if fused else {}
      full_reads = [array_bytes(shapes.get(op, '')) for op in operands]
      moved = _written_bytes(opcode, shape) + sum(min(sliced.get(i, full), full)
                                                  for i, full in enumerate(full_reads))
      rows.append((name, opcode, kinds.get(name, 'other'), moved * trips, trips,
                   scopes.get(name, 'unnamed')))

  walk(profile.entry_computation(hlo_text), 1)
  rows.sort(key=lambda row: -row[3])
  return rows


def summarize(hlo_text, top=12):
  """{'bytes': per call, 'kernels': per call, 'kinds': {kind: bytes},
  'scopes': {layer: bytes}, 'top': rows}."""
  rows = instruction_traffic(hlo_text)
  per_kind, per_scope = collections.Counter(), collections.Counter()
  for _, _, kind, moved, _, layer in rows:
    per_kind[kind] += moved
    per_scope[layer] += moved
  return {'bytes': sum(row[3] for row in rows), 'kernels': sum(row[4] for row in rows),
          'kinds': {kind: per_kind[kind] for kind in profile.KINDS if per_kind[kind]},
          'scopes': dict(per_scope), 'top': rows[:top]}


def format_summary(summary, bandwidth=None):
  """The summary as printable lines; with the device's bandwidth (bytes/s) in ms too."""
  ms = lambda moved: '' if not bandwidth else f'  {1e3 * moved / bandwidth:8.2f} ms'
  total = summary['bytes']
  lines = [f'static memory traffic {total / 1e9:.2f} GB per call in {summary["kernels"]} '
           f'kernels' + ('' if not bandwidth else
                         f', {1e3 * total / bandwidth:.2f} ms at {bandwidth / 1e12:.2f} TB/s'),
           f'{"kind":>12}  {"GB":>8}  share']
  for kind, moved in sorted(summary['kinds'].items(), key=lambda item: -item[1]):
    lines.append(f'{kind:>12}  {moved / 1e9:8.3f}  {100 * moved / total:5.1f}%{ms(moved)}')
  lines.append(f'{"GB":>8}  share  layer')
  for layer, moved in profile.largest_scopes(summary['scopes']):
    lines.append(f'{moved / 1e9:8.3f}  {100 * moved / total:5.1f}%{ms(moved)}  {layer}')
  lines.append('heaviest instructions:')
  for name, _, kind, moved, count, layer in summary['top']:
    lines.append(f'  {name:<40} {kind:<12} {moved / 1e9:8.3f} GB  {count:g} kernels  {layer}')
  return lines
