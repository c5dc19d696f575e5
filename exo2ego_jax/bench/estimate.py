"""A per-kernel time estimate of a compiled program, from its optimized HLO, attributed to the model's parts.

The roofline bound in `report` (bench/aot.py) is the step's matrix FLOPs at the datasheet peak: a true lower
bound, not a prediction. This estimate walks the program as it runs, one kernel at a time:

* Kernels are the instructions of the computations that run as a schedule (the entry, `while` bodies, called
  and conditional computations), each executed as many times per step as its computation runs (loop trip
  counts): fusions, library calls (cuBLAS, cuDNN, Pallas), unfused instructions, and collectives. Fused
  computations are the kernels' bodies, not kernels.
* A kernel's FLOPs: the matrix work in it (`hlo.instruction_flops`, on its fused body) and its vector work (one
  operation per element each element-wise or reducing instruction produces). Its bytes: what it reads and
  writes in device memory: its operands and results, except that an operand only sliced inside the kernel
  counts the slices read (a scanned layer reads one layer of the stacked weights) and an in-place
  dynamic-update-slice counts the update written, not the whole buffer.
* Its time: max(matrix FLOPs / (matrix peak x efficiency) + vector FLOPs / vector peak, bytes / (HBM bandwidth x
  efficiency)) plus, on GPUs, a launch gap. The efficiencies are assumptions, named in `EFFICIENCY`.
* A collective's time: its bytes at the link bandwidth (the slow link when its groups cross hosts or slices).
  An asynchronous collective (`*-start` ... `*-done`) overlaps the kernels scheduled between its start and
  done; only what they do not cover is exposed. A synchronous one is exposed whole.
* The step: the kernels' times plus the exposed collective time. MFU: the model's useful FLOPs per device /
  (step x peak).

Every kernel is attributed by its `op_name` to a part (bench/parts.py) and a phase (forward, backward, update).
"""
from __future__ import annotations

import collections
import dataclasses
import re

from exo2ego_jax.bench import hlo
from exo2ego_jax.bench.parts import LABELS, OTHER, PARTS, part_of, phase_of
from exo2ego_jax.bench.targets import Target

# What fraction of a peak a kernel sustains (assumptions; README "How the estimate reads a program"):
#   gemm/dot/conv: large bf16 matmuls reach about 80% of the dense peak (cuBLAS on H100, XLA on TPU MXUs);
#   attention: flash kernels (cuDNN, Pallas splash) run their matmuls at about 60% of peak: softmax and
#     masking sit between the two matmuls of every block, and the backward kernels recompute scores;
#   memory: streaming kernels reach about 90% of the datasheet HBM bandwidth.
EFFICIENCY = {"gemm": 0.8, "dot": 0.8, "conv": 0.8, "attention": 0.6, "memory": 0.9}
# GPUs launch each kernel from the host side of a stream: about 2 us between back-to-back kernels in XLA
# traces of Hopper steps (no CUDA graph spans a while loop). A TPU program runs as one.
LAUNCH_S = {"cuda": 2e-6, "tpu": 0.0, "cpu": 0.0}

_NOT_KERNELS = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "call", "conditional",
                "after-all", "partition-id", "replica-id", "opt-barrier", "add-dependency", "copy-start",
                "copy-done", "send-done", "recv-done", "recv", "iota", "domain"}
_VECTOR_FREE = _NOT_KERNELS | {"reshape", "broadcast", "slice", "dynamic-slice", "concatenate", "pad",
                               "transpose", "copy", "convert", "dynamic-update-slice", "gather", "select",
                               "reverse", "dot", "convolution", "custom-call", "fusion"}
_SLICING = {"dynamic-slice", "slice", "gather"}
_VIEWS = {"bitcast", "reshape"}
_SKIPPED_CALLS = ("AllocateBuffer", "AssumeGatherIndicesInBound", "GatherScatterIndicesBitpacked")


@dataclasses.dataclass
class Kernel:
    name: str
    kind: str          # matrix kind (gemm, attention, conv, dot), "collective", or "memory"
    part: str
    phase: str
    runs: int
    flops: float       # matrix FLOPs per run
    vector_flops: float
    bytes: float
    seconds: float     # per run (collectives: the transfer, before overlap)
    memory_bound: bool
    exposed: float = 0.0   # collectives: seconds per run not hidden under compute
    slow: bool = False     # collectives: over the slow link (across hosts / slices)


def _op_name(ins: hlo.Instruction) -> str:
    m = re.search(r'op_name="([^"]*)"', ins.text)
    return m.group(1) if m else ""


def _callee(ins: hlo.Instruction) -> str | None:
    m = re.search(r"\bcalls=%?([\w.\-]+)", ins.text)
    return m.group(1) if m else None


class Estimator:
    def __init__(self, module: hlo.Module, target: Target, *, num_devices: int, host_of=None, num_slices: int = 1):
        self.module, self.target = module, target
        self.num_devices, self.host_of, self.num_slices = num_devices, host_of, num_slices
        self.runs = module.runs_per_step()
        self.fused = {name for instructions in module.computations.values() for ins in instructions
                      if ins.opcode in ("fusion", "async-start") for name in [_callee(ins)] if name}

    # ---------------------------------------------------------------------------------------- one kernel

    def _body(self, name: str | None) -> list[hlo.Instruction]:
        return self.module.computations.get(name or "", [])

    def _matrix_and_vector(self, ins: hlo.Instruction) -> tuple[str | None, float, float]:
        kind, flops = hlo.instruction_flops(ins, self.module)
        if ins.opcode != "fusion":
            vector = 0.0 if ins.opcode in _VECTOR_FREE else self._elements(ins)
            return kind, flops, vector
        kinds: collections.Counter = collections.Counter()
        vector = 0.0
        for inner in self._body(_callee(ins)):
            k, f, v = self._matrix_and_vector(inner)
            if k:
                kinds[k] += f
            vector += v
        if kinds:
            return kinds.most_common(1)[0][0], float(sum(kinds.values())), vector
        return None, 0.0, vector

    def _elements(self, ins: hlo.Instruction) -> float:
        if ins.opcode in ("reduce", "reduce-window"):  # one operation per element read
            return sum(float(hlo.nbytes([s]) / hlo.DTYPE_BYTES[s[0]]) for o in ins.operands[:1]
                       for s in self.module.symbols.get(o, []))
        return sum(float(hlo.nbytes([s]) / hlo.DTYPE_BYTES[s[0]]) for s in ins.result)

    def _bytes(self, ins: hlo.Instruction) -> float:
        """Device-memory bytes one run of a kernel reads and writes."""
        operands = [self.module.symbols.get(o, []) for o in ins.operands]
        results = ins.result
        if ins.opcode == "custom-call":  # library workspaces (s8/u8 results) are scratch, not traffic
            results = [s for s in results if s[0] not in ("s8", "u8")]
        if ins.opcode == "dynamic-update-slice" and len(operands) > 1:
            return 2.0 * hlo.nbytes(operands[1])
        if ins.opcode in _SLICING:
            return 2.0 * hlo.nbytes(results)
        if ins.opcode != "fusion":
            return hlo.nbytes([s for shapes in operands for s in shapes]) + hlo.nbytes(results)
        return self._fusion_bytes(ins, operands, results)

    def _fusion_bytes(self, ins: hlo.Instruction, operands: list, results: list) -> float:
        """A fusion's device-memory traffic. A parameter reached only through slices (also inside nested fusions)
        is read slice by slice; one updated in place (dynamic-update-slice on it, the output aliasing it) is not
        read, and only the update is written. Bitcasts and reshapes in between are views, not copies."""
        name = _callee(ins)
        body = self._body(name)
        by_name = {i.name: i for i in body}
        root = next((i for i in body if i.text.lstrip().startswith("ROOT")), None)
        outputs = list(root.operands) if root is not None and root.opcode == "tuple" else ([root.name] if root else [])
        params = self._params(name)
        in_place, written = set(), 0.0
        per_output = [[r] for r in results] if len(outputs) == len(results) else [results]
        for out_name, out_shapes in zip(outputs, per_output):
            update = by_name.get(self._source(by_name, out_name))
            if update is not None and update.opcode == "dynamic-update-slice" and \
                    self._source(by_name, update.operands[0]) in params:
                in_place.add(self._source(by_name, update.operands[0]))
                written += hlo.nbytes(self.module.symbols.get(update.operands[1], []))
            else:
                written += hlo.nbytes(out_shapes)
        read = 0.0
        for pname, index in params.items():
            if pname not in in_place:
                full = hlo.nbytes(operands[index]) if index < len(operands) else 0.0
                read += min(full, self._read(name, pname, full))
        return read + written

    def _params(self, computation: str) -> dict[str, int]:
        out = {}
        for inner in self._body(computation):
            if inner.opcode == "parameter":
                m = re.search(r"parameter\((\d+)\)", inner.text)
                if m:
                    out[inner.name] = int(m.group(1))
        return out

    @staticmethod
    def _source(by_name: dict, name: str) -> str:
        """A value seen through views (bitcast, reshape)."""
        while name in by_name and by_name[name].opcode in _VIEWS and by_name[name].operands:
            name = by_name[name].operands[0]
        return name

    def _read(self, computation: str, param: str, full: float) -> float:
        """Bytes a fused computation reads of its parameter: the slices it takes when slices are all it takes
        (following views and nested fusions), else the whole parameter."""
        body = self._body(computation)
        users = collections.defaultdict(list)
        for inner in body:
            for o in inner.operands:
                users[o].append(inner)
        total, todo = 0.0, [param]
        while todo:
            current = todo.pop()
            for u in users.get(current, []):
                if u.opcode in _VIEWS:
                    todo.append(u.name)
                elif u.opcode in _SLICING and u.operands[0] == current:
                    total += hlo.nbytes(u.result)
                elif u.opcode == "dynamic-update-slice" and u.operands[0] == current:
                    continue  # updated in place
                elif u.opcode == "fusion":
                    nested = _callee(u)
                    nested_params = {i: n for n, i in self._params(nested).items()}
                    for position, operand in enumerate(u.operands):
                        if operand == current and position in nested_params:
                            total += self._read(nested, nested_params[position], full)
                else:
                    return full
        return total

    def _collective(self, ins: hlo.Instruction) -> tuple[str, float, bool] | None:
        """(kind, bytes sent, over the slow link) of a collective instruction, else None."""
        dcn = hlo._megascale(ins, self.module, self.num_slices)
        if dcn is not None:
            return dcn[0], dcn[1], True
        base = ins.opcode[:-len("-start")] if ins.opcode.endswith("-start") else ins.opcode
        inner = None
        if ins.opcode == "async-start":  # an asynchronous wrapper around one collective
            inner = next((i for i in self._body(_callee(ins)) if i.opcode in hlo.COLLECTIVES), None)
            base = inner.opcode if inner is not None else base
        if ins.opcode == "fusion":  # TPU reduce-scatter fusions hold an all-reduce
            name = _callee(ins) or ""
            inner = next((i for i in self._body(name) if i.opcode in hlo.COLLECTIVES), None)
            if inner is None:
                return None
            base = "reduce-scatter" if name.startswith("all-reduce-scatter") else inner.opcode
        if base not in hlo.COLLECTIVES:
            return None
        source = inner if inner is not None else ins
        groups = hlo.replica_groups(source.text, self.num_devices)
        size = len(groups[0]) if groups else self.num_devices
        sent = hlo.collective_bytes(source, self.module, base, size)
        slow = self.host_of is not None and any(len({self.host_of(d) for d in g}) > 1 for g in groups)
        return base, sent, slow

    def kernel(self, ins: hlo.Instruction, runs: int) -> Kernel | None:
        if ins.opcode in _NOT_KERNELS or ins.opcode.endswith("-done"):
            return None
        if ins.opcode == "custom-call" and any(t in ins.text for t in _SKIPPED_CALLS):
            return None
        op_name = _op_name(ins)
        if ins.opcode == "fusion" and not op_name:  # TPU fusions often carry the name on their root only
            op_name = next((_op_name(i) for i in reversed(self._body(_callee(ins))) if _op_name(i)), "")
        part, phase = part_of(op_name), phase_of(op_name)
        coll = self._collective(ins)
        t = self.target
        if coll is not None:
            kind, sent, slow = coll
            bandwidth = t.inter_host_bytes_per_s if slow else t.intra_host_bytes_per_s
            return Kernel(ins.name, "collective", part, phase, runs, 0.0, 0.0, sent, sent / bandwidth, False,
                          slow=slow)
        kind, flops, vector = self._matrix_and_vector(ins)
        nbytes = self._bytes(ins)
        compute = (flops / (t.peak_flops * EFFICIENCY.get(kind or "", 1.0)) if flops else 0.0) + (
            vector / t.vector_flops if vector and t.vector_flops else 0.0)
        memory = nbytes / (t.hbm_bytes_per_s * EFFICIENCY["memory"])
        seconds = max(compute, memory) + LAUNCH_S.get(t.platform, 0.0)
        return Kernel(ins.name, kind or "memory", part, phase, runs, flops, vector, nbytes, seconds, memory > compute)

    # ------------------------------------------------------------------------------------------ schedule

    def kernels(self) -> list[Kernel]:
        out = []
        for name, instructions in self.module.computations.items():
            runs = self.runs.get(name, 0)
            if runs == 0 or name in self.fused:
                continue
            scheduled = []
            for ins in instructions:
                k = self.kernel(ins, runs)
                if k is not None:
                    scheduled.append((ins, k))
                    out.append(k)
            self._overlap(instructions, scheduled)
        return out

    def _overlap(self, instructions, scheduled) -> None:
        """Set each collective's exposed time: async ones overlap the kernels between their start and done."""
        position = {ins.name: i for i, ins in enumerate(instructions)}
        done_at = {}
        for i, ins in enumerate(instructions):
            if ins.opcode.endswith("-done") and ins.operands:
                done_at[ins.operands[0]] = i
        compute = [(position[ins.name], k.seconds) for ins, k in scheduled if k.kind != "collective"]
        for ins, k in scheduled:
            if k.kind != "collective":
                continue
            end = done_at.get(ins.name)
            if end is None:
                k.exposed = k.seconds
                continue
            start = position[ins.name]
            covered = sum(s for p, s in compute if start < p < end)
            k.exposed = max(0.0, k.seconds - covered)


def estimate(text: str, target: Target, *, num_devices: int, useful_flops: float, host_of=None,
             num_slices: int = 1, kernels_out: list | None = None) -> dict:
    """The estimate of one program (per device): {step_s, mfu, compute_s, memory_bound_s, exposed_collectives_s,
    collectives_s, launch_s, kernels, assumptions, by_part: {part: {flops, bytes, est_s, by_phase}}}.
    `useful_flops`: the model's FLOPs per device per step (the MFU's numerator)."""
    est = Estimator(hlo.parse_module(text), target, num_devices=num_devices, host_of=host_of, num_slices=num_slices)
    kernels = est.kernels()
    if kernels_out is not None:
        kernels_out.extend(kernels)
    parts = {p: dict(flops=0.0, bytes=0.0, est_s=0.0, by_phase={}) for p, _, _ in PARTS}
    parts[OTHER] = dict(flops=0.0, bytes=0.0, est_s=0.0, by_phase={})
    compute_s = memory_bound_s = exposed = collectives = 0.0
    per_link = collections.Counter()
    launch = LAUNCH_S.get(target.platform, 0.0)
    launches = 0
    for k in kernels:
        entry = parts[k.part]
        if k.kind == "collective":
            seconds = k.exposed * k.runs
            exposed += seconds
            collectives += k.seconds * k.runs
            per_link[k.slow] += k.seconds * k.runs
        else:
            seconds = k.seconds * k.runs
            compute_s += seconds
            memory_bound_s += seconds if k.memory_bound else 0.0
            launches += k.runs
            entry["flops"] += (k.flops + k.vector_flops) * k.runs
        entry["bytes"] += k.bytes * k.runs
        entry["est_s"] += seconds
        entry["by_phase"][k.phase] = entry["by_phase"].get(k.phase, 0.0) + seconds
    # a link moves one collective's bytes at a time: however much overlaps, the step is never shorter than the
    # busiest link's transfer time
    step_s = max(compute_s + exposed, *per_link.values(), 0.0)
    return dict(step_s=step_s, mfu=useful_flops / (step_s * target.peak_flops) if step_s else None,
                compute_s=compute_s, memory_bound_s=memory_bound_s, exposed_collectives_s=exposed,
                collectives_s=collectives, launch_s=launch * launches, kernels=len(kernels),
                kernel_runs=launches, by_part=parts,
                assumptions=dict(efficiency=EFFICIENCY, launch_s=launch, vector_flops=target.vector_flops,
                                 hbm_bytes_per_s=target.hbm_bytes_per_s, peak_flops=target.peak_flops))


def part_rows(by_part: dict, step_s: float, measured: dict | None = None) -> list[dict]:
    """Table rows of an estimate's parts (and a measured profile's seconds per part, when given)."""
    rows = []
    for part, v in by_part.items():
        if not v["est_s"] and not (measured or {}).get(part):
            continue
        phases = v.get("by_phase", {})
        rows.append(dict(part=LABELS.get(part, part), tflops=v["flops"] / 1e12, gb=v["bytes"] / 1e9,
                         est_ms=v["est_s"] * 1e3, share=100 * v["est_s"] / step_s if step_s else None,
                         fwd_ms=phases.get("forward", 0.0) * 1e3, bwd_ms=phases.get("backward", 0.0) * 1e3,
                         measured_ms=None if measured is None else measured.get(part, 0.0) * 1e3))
    return rows


PART_COLUMNS = [("part", "part", ""), ("tflops", "TFLOP", ".3f"), ("gb", "GB moved", ".2f"),
                ("est_ms", "est. ms", ".1f"), ("share", "% of est. step", ".1f"), ("fwd_ms", "forward ms", ".1f"),
                ("bwd_ms", "backward ms", ".1f")]
