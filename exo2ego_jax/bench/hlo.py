"""Reading a compiled (optimized, SPMD-partitioned) HLO module: executed FLOPs, collectives, custom calls.

Compile-only executables give no cost analysis, so the figures come from the module text:
  * every computation's runs per step: `while` bodies x their trip count (scanned layers, gradient
    accumulation; `known_trip_count` on GPUs, the loop condition's bound on TPUs), fusions and calls x 1;
  * FLOPs of the matrix work: cuBLAS gemms (`__cublas$*`), cuDNN flash attention (`__cudnn$fmha*`: 2 matmuls
    forward, 5 backward; causal masks skip half), cuDNN convolutions, and plain `dot` / `convolution`
    instructions (CPU and TPU targets; TPU convolutions count only the window taps on real input elements);
    element-wise work is not counted;
  * collectives: executions per step and the bytes each device sends with ring algorithms: all-gather and
    all-to-all (n-1)/n of the gathered / exchanged data, reduce-scatter (n-1)/n of its input, all-reduce
    2(n-1)/n, collective-permute its operand; whether a collective's replica groups span hosts;
  * bytes the matrix kernels read and write (a lower bound of HBM traffic).
All figures are per device (the module is the per-device SPMD program).
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import json
import math
import re
from collections.abc import Callable, Sequence

import numpy as np

DTYPE_BYTES = dict(pred=1, s4=0.5, u4=0.5, s8=1, u8=1, f8e4m3fn=1, f8e5m2=1, s16=2, u16=2, bf16=2, f16=2, s32=4,
                   u32=4, f32=4, s64=8, u64=8, f64=8, c64=8, c128=16)
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_SHAPE = re.compile(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*(?:\((.*)\)\s*->.*)?\{\s*$")


def shapes_in(text: str) -> list[tuple[str, tuple[int, ...]]]:
    """(dtype, dims) of every array shape written in `text` (tuples flattened)."""
    return [(t, tuple(int(d) for d in dims.split(",") if d)) for t, dims in _SHAPE.findall(text)
            if t in DTYPE_BYTES]


def nbytes(shapes) -> float:
    return sum(DTYPE_BYTES[t] * math.prod(d) for t, d in shapes)


@dataclasses.dataclass
class Instruction:
    name: str
    computation: str
    result: list          # [(dtype, dims)] (a tuple result lists every element)
    opcode: str
    operands: list[str]   # operand instruction names
    text: str


@dataclasses.dataclass
class Module:
    computations: dict[str, list[Instruction]]
    entry: str
    symbols: dict[str, list]   # instruction / parameter name -> its shapes

    def runs_per_step(self) -> dict[str, int]:
        """How many times each computation runs per execution of the entry computation."""
        runs: collections.Counter = collections.Counter()

        def visit(name: str, k: int) -> None:
            runs[name] += k
            for ins in self.computations.get(name, []):
                trip = self.trip_count(ins) if ins.opcode == "while" else 1
                for attr, names in re.findall(r"\b(body|condition|calls|to_apply|true_computation|"
                                              r"false_computation|branch_computations)=(\{[^}]*\}|%?[\w.\-]+)",
                                              ins.text):
                    if attr == "to_apply" and ins.opcode != "call":
                        continue  # reductions' scalar bodies run per element: no matrix work there
                    for callee in re.findall(r"%?([\w.\-]+)", names):
                        if callee in self.computations and callee != name:
                            visit(callee, k * (trip if attr in ("body", "condition") else 1))
        visit(self.entry, 1)
        return runs

    def trip_count(self, loop: Instruction) -> int:
        """A `while` loop's iterations: GPU modules say so (`known_trip_count`); TPU modules do not, and the count
        is the constant the condition compares the induction variable with (`i < N`, from the start value the
        loop's init tuple gives, 0 if it is not a constant)."""
        m = re.search(r'"known_trip_count":\{"n":"(\d+)"', loop.text)
        if m:
            return int(m.group(1))
        cond = re.search(r"\bcondition=%?([\w.\-]+)", loop.text)
        body = self.computations.get(cond.group(1), []) if cond else []
        by_name = {ins.name: ins for ins in body}
        root = next((ins for ins in body if ins.text.lstrip().startswith("ROOT")), None)
        if root is None or root.opcode != "compare" or len(root.operands) != 2:
            return 1
        direction = re.search(r"direction=(\w+)", root.text)
        direction = direction.group(1) if direction else "LT"
        left, right = (by_name.get(o) for o in root.operands)
        if direction in ("GT", "GE"):  # N > i
            left, right, direction = right, left, {"GT": "LT", "GE": "LE"}[direction]
        bound = _constant_value(right)
        index = re.search(r"index=(\d+)", left.text) if left is not None and left.opcode == "get-tuple-element" else None
        if bound is None or index is None or direction not in ("LT", "LE", "NE"):
            return 1
        start = self._init_value(loop, int(index.group(1)))
        step = self._increment(loop, int(index.group(1)))
        return max(0, -(-(int(bound) - start + (direction == "LE")) // step))

    def _increment(self, loop: Instruction, index: int) -> int:
        """How much the body adds to the induction variable per iteration (1 unless it says otherwise: XLA's
        windowed-einsum loops for FSDP matmuls step by 2)."""
        body = re.search(r"\bbody=%?([\w.\-]+)", loop.text)
        instructions = self.computations.get(body.group(1), []) if body else []
        by_name = {ins.name: ins for ins in instructions}
        root = next((ins for ins in instructions if ins.text.lstrip().startswith("ROOT")), None)
        if root is None or root.opcode != "tuple" or index >= len(root.operands):
            return 1
        update = by_name.get(root.operands[index])
        while update is not None and update.opcode in ("copy", "bitcast", "convert") and update.operands:
            update = by_name.get(update.operands[0])
        if update is None or update.opcode != "add":
            return 1
        values = [_constant_value(by_name.get(o)) for o in update.operands]
        step = next((v for v in values if v is not None), 1)
        return max(1, int(step))

    def _init_value(self, loop: Instruction, index: int) -> int:
        """The start value of element `index` of a loop's state, when the init tuple holds a constant there."""
        scope = {ins.name: ins for ins in self.computations.get(loop.computation, [])}
        init = scope.get(loop.operands[0]) if loop.operands else None
        if init is None or init.opcode != "tuple" or index >= len(init.operands):
            return 0
        value = _constant_value(scope.get(init.operands[index]))
        return int(value) if value is not None else 0


def _constant_value(ins: Instruction | None) -> float | None:
    if ins is None or ins.opcode != "constant":
        return None
    m = re.search(r"constant\((-?[\d.]+)\)", ins.text)
    return float(m.group(1)) if m else None


def _matching_paren(text: str) -> int:
    """Index of the ')' closing an already-open '(' at the start of `text`."""
    depth = 1
    for i, ch in enumerate(text):
        depth += (ch == "(") - (ch == ")")
        if depth == 0:
            return i
    return len(text)


def _top_level_split(text: str) -> list[str]:
    """Split an operand list at the commas outside brackets (shapes carry commas too)."""
    pieces, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            pieces.append(text[start:i])
            start = i + 1
    pieces.append(text[start:])
    return pieces


def _split_type(rest: str) -> tuple[str, str]:
    """(result type, the rest) of an instruction's right-hand side; tuple types are parenthesised."""
    if rest.startswith("("):
        end = _matching_paren(rest[1:]) + 1
        return rest[:end + 1], rest[end + 1:]
    head, _, tail = rest.partition(" ")
    return head, tail


def parse_module(text: str) -> Module:
    computations: dict[str, list[Instruction]] = {}
    symbols: dict[str, list] = {}
    entry, current = "", None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header and not line.startswith(" "):
            current = header.group(2)
            computations[current] = []
            if header.group(1):
                entry = current
            for pname, ptype in re.findall(r"([\w.\-]+):\s*((?:\([^)]*\))|[^,()]+)", header.group(3) or ""):
                symbols[pname] = shapes_in(ptype)
            continue
        if line.rstrip() == "}":
            current = None
            continue
        m = _INSTR.match(line)
        if current is None:
            continue
        if not m:  # an attribute spanning lines (TPU kernels' metadata): part of the instruction above
            if computations[current]:
                computations[current][-1].text += "\n" + line
            continue
        name, rest = m.groups()
        result_text, tail = _split_type(rest)
        op = re.match(r"\s*([\w\-$]+)\(", tail)
        if not op:
            continue
        opcode, args = op.group(1), re.sub(r"/\*.*?\*/", "", tail[op.end():])  # drop /*index=5*/ comments
        end = _matching_paren(args)
        operands = [piece.split()[-1].lstrip("%") for piece in _top_level_split(args[:end]) if piece.strip()]
        ins = Instruction(name, current, shapes_in(result_text), opcode, operands, line)
        computations[current].append(ins)
        symbols[name] = ins.result
    if not entry:
        raise ValueError("no ENTRY computation in the HLO text")
    return Module(computations, entry, symbols)


# ------------------------------------------------------------------------------------------------ FLOPs

def _json_backend_config(text: str) -> dict:
    m = re.search(r"backend_config=(\{.*\})\s*$", text)
    if not m:
        return {}
    try:
        return json.loads(m.group(1))
    except json.JSONDecodeError:
        return {}


def _gemm_flops(ins: Instruction, module: Module, contracting: Sequence[int]) -> float:
    lhs = module.symbols.get(ins.operands[0], [])
    if not lhs or not ins.result:
        return 0.0
    k = math.prod(lhs[0][1][d] for d in contracting)
    return 2.0 * math.prod(ins.result[0][1]) * k


def _fmha_flops(ins: Instruction, module: Module, backward: bool) -> float:
    config = _json_backend_config(ins.text).get("cudnn_fmha_backend_config", {})
    dims = [int(d) for d in config.get("intermediate_tensor_shape", {}).get("dimensions", [])]
    q = module.symbols.get(ins.operands[0], []) if ins.operands else []
    if len(dims) != 4 or not q:
        return 0.0
    head_dim = q[0][1][-1]
    causal = 0.5 if "CAUSAL" in str(config.get("mask_type", "")) else 1.0
    return (5 if backward else 2) * 2.0 * math.prod(dims) * head_dim * causal


def _conv_flops(ins: Instruction, module: Module, kind: str) -> float:
    """2 x (forward output elements) x (filter elements per output feature)."""
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", ins.text)
    ops = [module.symbols.get(o, [[None, ()]])[0] for o in ins.operands[:2]]
    if not labels or len(ops) < 2 or not ins.result:
        return 0.0
    _, kernel_labels, _ = labels.groups()
    if kind == "backward_filter":
        forward_out, kernel = ops[1][1], ins.result[0][1]
    elif kind == "backward_input":
        forward_out, kernel = ops[0][1], ops[1][1]
    else:
        forward_out, kernel = ins.result[0][1], ops[1][1]
    if not kernel or len(kernel) != len(kernel_labels):
        return 0.0
    return 2.0 * math.prod(forward_out) * math.prod(kernel) / kernel[kernel_labels.index("o")]


# Matmuls per kernel of Pallas splash attention: forward QK^T and PV; the dq kernel recomputes QK^T and forms
# dO V^T and dS K; the dkv kernel recomputes QK^T and forms P^T dO, dO V^T and dS^T Q.
SPLASH_MATMULS = {"fwd": 2, "dq": 3, "dkv": 4}
_SPLASH_MASK = re.compile(r"splash_mask_(causal|full|window(\d+))")


def active_blocks(length: int, block_q: int, block_kv: int, mask: str, window: int = 0) -> int:
    """Score blocks splash attention computes for a static mask (the ones not entirely masked out)."""
    q0 = np.arange(0, length, block_q)[:, None]
    k0 = np.arange(0, length, block_kv)[None, :]
    q1, k1 = q0 + block_q - 1, k0 + block_kv - 1
    if mask == "full":
        keep = np.ones((q0.size, k0.size), bool)
    else:
        keep = k0 <= q1  # some key at or before some query
        if mask == "window":
            keep &= k1 >= q0 - (window - 1)
    return int(keep.sum())


def _splash_flops(ins: Instruction, module: Module) -> float:
    """FLOPs of a splash attention kernel (`splash_mha_{fwd,dq,dkv}_*`), from its q/k shapes, block sizes and the
    mask kind models/splash.py writes into its name scope."""
    kernel = re.search(r"splash_mha_(fwd|dq|dkv)", ins.name) or re.search(r"splash_mha_(fwd|dq|dkv)", ins.text)
    if kernel is None:
        return 0.0
    shapes = [module.symbols.get(o, [[None, ()]])[0] for o in ins.operands]
    tensors = [dims for dtype, dims in shapes if dtype in ("f32", "bf16", "f16") and len(dims) >= 3]
    if len(tensors) < 2:
        return 0.0
    q = tensors[0]  # [(batch,) heads, T, head_dim]
    length, head_dim = q[-2], q[-1]
    rows = math.prod(q[:-2])
    blocks = dict(re.findall(r'\\"(block_q|block_kv)\\": (\d+)', ins.text))
    block_q, block_kv = int(blocks.get("block_q", 128)), int(blocks.get("block_kv", 128))
    m = _SPLASH_MASK.search(ins.text)
    mask = "full" if m is None else ("window" if m.group(1).startswith("window") else m.group(1))
    window = int(m.group(2)) if m is not None and m.group(2) else 0
    scores = active_blocks(length, block_q, block_kv, mask, window) * block_q * block_kv
    return SPLASH_MATMULS[kernel.group(1)] * 2.0 * rows * scores * head_dim


def instruction_flops(ins: Instruction, module: Module) -> tuple[str | None, float]:
    """(kind, FLOPs) of one instruction's matrix work, or (None, 0)."""
    if ins.opcode == "custom-call":
        target = re.search(r'custom_call_target="([^"]+)"', ins.text)
        target = target.group(1) if target else ""
        if target == "tpu_custom_call":
            flops = _splash_flops(ins, module)
            return ("attention", flops) if flops else (None, 0.0)
        if target.startswith("__cublas$"):
            config = _json_backend_config(ins.text).get("gemm_backend_config", {})
            dims = config.get("dot_dimension_numbers", {}).get("lhs_contracting_dimensions", [])
            return "gemm", _gemm_flops(ins, module, [int(d) for d in dims])
        if target.startswith("__cudnn$fmha"):
            return "attention", _fmha_flops(ins, module, "Backward" in target)
        if target.startswith("__cudnn$conv"):
            kind = ("backward_filter" if "BackwardFilter" in target else
                    "backward_input" if "BackwardInput" in target else "forward")
            return "conv", _conv_flops(ins, module, kind)
        return None, 0.0
    if ins.opcode == "dot":
        m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.text)
        dims = [int(d) for d in m.group(1).split(",") if d] if m else []
        return "dot", _gemm_flops(ins, module, dims)
    if ins.opcode == "convolution":
        return "conv", convolution_flops(ins, module)
    return None, 0.0


def _window(text: str) -> dict[str, list]:
    """`window={size=3x3 stride=2x2 pad=1_1x1_1 lhs_dilate=.. rhs_dilate=..}` as lists per spatial dimension."""
    m = re.search(r"window=\{([^}]*)\}", text)
    fields = dict(item.split("=", 1) for item in m.group(1).split()) if m else {}
    per_dim = lambda key: [int(v) for v in fields[key].split("x")] if key in fields else None
    pads = [tuple(int(v) for v in p.split("_")) for p in fields["pad"].split("x")] if "pad" in fields else None
    return dict(size=per_dim("size"), stride=per_dim("stride"), pad=pads, lhs_dilate=per_dim("lhs_dilate"),
                rhs_dilate=per_dim("rhs_dilate"))


@functools.lru_cache(maxsize=4096)
def _valid_taps(inputs: int, outputs: int, taps: int, stride: int, pad_low: int, lhs_dilate: int,
                rhs_dilate: int) -> int:
    """(output position, kernel tap) pairs of one spatial dimension that land on a real input element: not in
    the padding and not in a hole of a dilated input."""
    o = np.arange(outputs)[:, None]
    k = np.arange(taps)[None, :]
    position = o * stride + k * rhs_dilate - pad_low
    real = (position >= 0) & (position <= (inputs - 1) * lhs_dilate) & (position % lhs_dilate == 0)
    return int(real.sum())


def convolution_flops(ins: Instruction, module: Module) -> float:
    """2 x output batch x output features x input features per group x the (output, tap) pairs that read a real
    input element. TPU modules write matmuls as convolutions whose batch or contraction dimensions are folded
    into dilated, padded windows: counting every tap (output size x window size) would count the zeros too."""
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", ins.text)
    if not labels or len(ins.operands) < 2 or not ins.result:
        return 0.0
    lhs_labels, rhs_labels, out_labels = labels.groups()
    lhs = module.symbols.get(ins.operands[0], [[None, ()]])[0][1]
    rhs = module.symbols.get(ins.operands[1], [[None, ()]])[0][1]
    out = ins.result[0][1]
    if len(lhs) != len(lhs_labels) or len(rhs) != len(rhs_labels) or len(out) != len(out_labels):
        return 0.0
    window = _window(ins.text)
    spatial = [ch for ch in out_labels if ch.isdigit()]
    pairs = 1
    for i, dim in enumerate(sorted(spatial)):
        get = lambda key, default, i=i: (window[key][i] if window[key] else default)
        pad_low = window["pad"][i][0] if window["pad"] else 0
        pairs *= _valid_taps(lhs[lhs_labels.index(dim)], out[out_labels.index(dim)], rhs[rhs_labels.index(dim)],
                             get("stride", 1), pad_low, get("lhs_dilate", 1), get("rhs_dilate", 1))
    batch, features = out[out_labels.index("b")], out[out_labels.index("f")]
    return 2.0 * batch * features * rhs[rhs_labels.index("i")] * pairs


# ---------------------------------------------------------------------------------------------- collectives

def replica_groups(text: str, num_devices: int) -> list[list[int]]:
    """Device groups of a collective from any of XLA's three notations."""
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", text)
    if m:
        axes = re.findall(r"'(\w+)'=(\d+)", m.group(1))
        names, sizes = [a for a, _ in axes], [int(s) for _, s in axes]
        grouped = re.findall(r"'(\w+)'", m.group(2))
        ids = np.arange(math.prod(sizes)).reshape(sizes)
        keep = [names.index(g) for g in grouped]
        rest = [i for i in range(len(sizes)) if i not in keep]
        ids = np.transpose(ids, rest + keep).reshape(-1, math.prod(sizes[i] for i in keep) if keep else 1)
        return ids.tolist()
    m = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", text)
    if m:
        shape = [int(v) for v in m.group(1).split(",")]
        dims = [int(v) for v in m.group(2).split(",")]
        ids = np.arange(math.prod(dims)).reshape(dims)
        if m.group(3):
            ids = np.transpose(ids, [int(v) for v in m.group(3).split(",")])
        return ids.reshape(shape).tolist()
    m = re.search(r"replica_groups=\{(\{[\d,{} ]*\})\}", text)
    if m:
        groups = [[int(v) for v in g.split(",") if v.strip()] for g in re.findall(r"\{([\d, ]*)\}", m.group(1))]
        if groups and groups[0]:
            return groups
    m = re.search(r"source_target_pairs=\{(.*?)\}\}", text)
    if m:
        return [[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)", m.group(1) + "}")]
    return [list(range(num_devices))]


def collective_bytes(ins: Instruction, module: Module, kind: str, group_size: int) -> float:
    """Bytes one device sends for this collective (ring algorithms)."""
    operands = [s for o in ins.operands for s in module.symbols.get(o, [])]
    n = max(group_size, 1)
    if kind == "collective-permute":
        return nbytes(operands)
    if kind == "all-gather":
        gathered = ins.result[len(ins.result) // 2:] if ins.opcode.endswith("-start") else ins.result
        return nbytes(gathered) * (n - 1) / n
    if kind == "all-reduce":
        return 2.0 * nbytes(operands) * (n - 1) / n
    return nbytes(operands) * (n - 1) / n  # reduce-scatter, all-to-all


# ------------------------------------------------------------------------------------------------ summary

@dataclasses.dataclass
class Analysis:
    flops: dict              # kind -> executed FLOPs per device per step
    collectives: dict        # kind -> {"count", "bytes", "cross_host_bytes"}
    custom_calls: dict       # target -> static count in the module
    kernel_bytes: float      # bytes read + written by the matrix kernels (a lower bound of HBM traffic)

    @property
    def total_flops(self) -> float:
        return float(sum(self.flops.values()))


_MEGASCALE = re.compile(r'_xla_megascale_transfer_type="(\w+)"')


def _megascale(ins: Instruction, module: Module, num_slices: int) -> tuple[str, float] | None:
    """(kind, bytes sent) of a multi-slice TPU transfer: XLA sends the cross-slice (DCN) part of a collective
    as a host-transfer `send` the megascale runtime carries out."""
    m = _MEGASCALE.search(ins.text) if ins.opcode == "send" else None
    if m is None:
        return None
    kind = m.group(1).lower().replace("_", "-")
    data = nbytes(module.symbols.get(ins.operands[0], [])) if ins.operands else 0.0
    s = max(num_slices, 2)
    return kind, data * (2.0 if kind == "all-reduce" else 1.0) * (s - 1) / s


def analyze(text: str, *, num_devices: int, host_of: Callable[[int], int] | None = None,
            num_slices: int = 1) -> Analysis:
    """Per-device figures of one step from the compiled module text. `host_of(partition id) -> host index`
    tells which collectives cross hosts (on TPUs: slices); `num_slices` sizes the cross-slice transfers.

    TPU specifics: a reduce-scatter is an `all-reduce-scatter` fusion around an all-reduce (counted as the
    reduce-scatter it is), and the cross-slice part of a collective is a megascale host-transfer `send`
    (counted on the slow link)."""
    module = parse_module(text)
    runs = module.runs_per_step()
    flops: collections.Counter = collections.Counter()
    coll: dict = {}
    custom: collections.Counter = collections.Counter()
    kernel_bytes = 0.0
    for name, instructions in module.computations.items():
        k = runs.get(name, 0)
        for ins in instructions:
            if ins.opcode == "custom-call":
                target = re.search(r'custom_call_target="([^"]+)"', ins.text)
                if target:
                    custom[target.group(1)] += 1
            if k == 0:
                continue
            kind, f = instruction_flops(ins, module)
            if kind:
                flops[kind] += f * k
                if ins.opcode == "custom-call":
                    operands = [s for o in ins.operands for s in module.symbols.get(o, [])]
                    kernel_bytes += (nbytes(operands) + nbytes(ins.result[:1])) * k
            base = ins.opcode[:-len("-start")] if ins.opcode.endswith("-start") else ins.opcode
            dcn = _megascale(ins, module, num_slices)
            if dcn is not None:
                entry = coll.setdefault(dcn[0], {"count": 0, "bytes": 0.0, "cross_host_bytes": 0.0})
                entry["count"] += k
                entry["bytes"] += dcn[1] * k
                entry["cross_host_bytes"] += dcn[1] * k
            elif base in COLLECTIVES:
                groups = replica_groups(ins.text, num_devices)
                size = len(groups[0]) if groups else num_devices
                if base == "all-reduce" and name.startswith("all-reduce-scatter"):
                    base = "reduce-scatter"
                sent = collective_bytes(ins, module, base, size) * k
                entry = coll.setdefault(base, {"count": 0, "bytes": 0.0, "cross_host_bytes": 0.0})
                entry["count"] += k
                entry["bytes"] += sent
                if host_of is not None and any(len({host_of(d) for d in g}) > 1 for g in groups):
                    entry["cross_host_bytes"] += sent
    return Analysis(dict(flops), coll, dict(custom), kernel_bytes)
