"""Compile targets for ahead-of-time compilation without the hardware: NVIDIA H100 / H200, Cloud TPU v4, v5e,
v5p and v6e slices, and fake CPU devices.

A GPU target is XLA's `GpuTargetConfig` (text protobuf) for a Hopper part (sm_90a), built here from the
device's published figures, plus the bandwidths the roofline bound uses. XLA compiles for it on a machine with
no GPU once the CUDA plugin is installed (`pip install -e '.[aot]'`) and JAX runs on the CPU platform.

A TPU target is a libtpu topology description (`pip install -e '.[tpu]'`): the generation's name in libtpu, its
chip configuration, the slice's chip grid and which of its axes wrap around (a torus from 64 chips on v4/v5p,
128 on v5e/v6e). The compiler enforces each chip's HBM (the capacities below are the ones libtpu uses) and
fails a program that does not fit; `hbm_bytes` is also what the report measures headroom against.
"""
from __future__ import annotations

import dataclasses
import re

GiB = 2 ** 30

# Hopper SM figures shared by H100 SXM and H200 (132 SMs at 1.98 GHz boost); XLA's cost model reads them.
_HOPPER_SM = dict(
    threads_per_block_limit=1024, threads_per_warp=32, shared_memory_per_block=49152,
    shared_memory_per_core=233472, threads_per_core_limit=2048, core_count=132, fpus_per_core=128,
    block_dim_limit_x=2147483647, block_dim_limit_y=65535, block_dim_limit_z=65535, l2_cache_size=52428800,
    clock_rate_ghz=1.98, shared_memory_per_block_optin=232448, registers_per_core_limit=65536,
    registers_per_block_limit=65536, thread_dim_limit_x=1024, thread_dim_limit_y=1024, thread_dim_limit_z=64,
)
# Per-SM throughput by XLA PrimitiveType number: (units per SM, ops per clock) on the scalar (CUDA-core)
# and matrix (tensor-core) units; the tensor cores run at 1.83 GHz under load.
_SCALAR_UNITS = {4: (64, 1), 8: (64, 1), 10: (128, 2), 11: (128, 1), 12: (64, 1), 16: (128, 2)}
_MATRIX_UNITS = {2: 1024, 6: 1024, 10: 512, 11: 256, 12: 32, 16: 512, 19: 1024, 20: 1024, 23: 1024, 24: 1024,
                 25: 1024, 28: 1024, 29: 1024, 33: 1024, 35: 1024, 36: 1024}
_TENSOR_CLOCK_GHZ = 1.8295201


@dataclasses.dataclass(frozen=True)
class Target:
    """A device to compile for and the figures of its roofline (per device: a GPU, or a TPU chip)."""
    name: str
    platform: str                 # "cuda", "tpu" or "cpu"
    hbm_bytes: int                # device memory (TPU: the capacity libtpu's compiler enforces)
    peak_flops: float             # dense bf16 FLOP/s (datasheet)
    hbm_bytes_per_s: float
    # The fast and the slow link, one direction, per device: NVLink within a host and InfiniBand across hosts
    # for GPUs; ICI within a slice (hosts included) and DCN across slices for TPUs.
    intra_host_bytes_per_s: float
    inter_host_bytes_per_s: float
    mem_clock_khz: int = 0
    cudnn: tuple[int, int, int] = (9, 10, 0)
    generation: str = ""          # hopper, v4, v5e, v5p, v6e
    # Element-wise FLOP/s outside the matrix units (the per-op estimate, bench/estimate.py): Hopper's FP32 CUDA
    # cores, 67 TFLOP/s (datasheet). 0: not modelled (TPU vector units: no published figure), so element-wise
    # kernels are timed by their bytes alone.
    vector_flops: float = 0.0
    # TPU only: libtpu's topology prefix and chip config, the grid's rank, TensorCores per chip (v4-N and
    # v5p-N count cores), and the chip count from which the slice's axes wrap around.
    tpu_prefix: str = ""
    chip_config: str = ""
    grid_rank: int = 0
    cores_per_chip: int = 1
    wrap_from: int = 0

    @property
    def fast_link(self) -> str:
        return {"tpu": "ICI", "cuda": "NVLink"}.get(self.platform, "intra-host")

    @property
    def slow_link(self) -> str:
        return {"tpu": "DCN", "cuda": "InfiniBand"}.get(self.platform, "inter-host")

    def describe(self) -> dict:
        """The target as the JSON report records it."""
        return dict(name=self.name, platform=self.platform, generation=self.generation, hbm_bytes=self.hbm_bytes,
                    peak_flops=self.peak_flops, hbm_bytes_per_s=self.hbm_bytes_per_s,
                    fast_link=self.fast_link, fast_link_bytes_per_s=self.intra_host_bytes_per_s,
                    slow_link=self.slow_link, slow_link_bytes_per_s=self.inter_host_bytes_per_s)

    def gpu_target_config(self) -> str:
        """XLA's GpuTargetConfig text for this device (sm_90a: accelerated Hopper features on)."""
        if self.platform != "cuda":
            raise ValueError(f"{self.name} is not a GPU target")
        lines = ["gpu_device_info {"]
        lines += [f"  {k}: {v}" for k, v in _HOPPER_SM.items()]
        lines += [f"  memory_bandwidth: {int(self.hbm_bytes_per_s)}", f"  device_memory_size: {self.hbm_bytes}",
                  "  cuda_compute_capability { major: 9 feature_extension: ACCELERATED_FEATURES }",
                  "  scalar_unit_description {"]
        lines += [f"    rate_infos {{ key: {k} value {{ clock_rate_ghz: 1.98 units_per_core: {u} "
                  f"ops_per_clock: {o} }} }}" for k, (u, o) in _SCALAR_UNITS.items()]
        lines += ["  }", "  matrix_unit_description {"]
        lines += [f"    rate_infos {{ key: {k} value {{ clock_rate_ghz: "
                  f"{1.98 if k == 12 else _TENSOR_CLOCK_GHZ} units_per_core: 4 ops_per_clock: {o} }} }}"
                  for k, o in _MATRIX_UNITS.items()]
        lines += ["  }", '  device_vendor: "NVIDIA Corporation"', '  platform_version: "Compute Capability 9.0a"',
                  f'  model_str: "sm_9.0a with {self.hbm_bytes}B RAM, 132 cores, 1980000KHz clock, '
                  f'{self.mem_clock_khz}KHz mem clock, 52428800B L2$"',
                  "  device_address_bits: 64", "  pcie_bandwidth: 34359738368", "  ecc_enabled: true",
                  f'  name: "{self.name}"', '  driver_version: "13.0.0"', '  runtime_version: "12.8.0"',
                  '  compile_time_toolkit_version: "12.8.0"', '  dnn_version: "9.10.0"', '  cub_version: "3.1.2"',
                  "  device_interconnect_info { active_links: 18 }", "}", 'platform_name: "CUDA"',
                  f"dnn_version_info {{ major: {self.cudnn[0]} minor: {self.cudnn[1]} patch: {self.cudnn[2]} }}",
                  f'device_description_str: "{self.name}"']
        return "\n".join(lines) + "\n"


# Datasheet figures: 989 TFLOP/s dense bf16 (1979 is the 2:4-sparse figure); NVLink 4 moves 450 GB/s per
# direction per GPU; a typical H100/H200 host has 8 x 400 Gb/s InfiniBand, 50 GB/s per GPU across hosts.
TARGETS = {
    "h100": Target("NVIDIA H100 80GB HBM3", "cuda", hbm_bytes=84942979072, peak_flops=989e12,
                   hbm_bytes_per_s=3.35e12, intra_host_bytes_per_s=450e9, inter_host_bytes_per_s=50e9,
                   mem_clock_khz=2619000, generation="hopper", vector_flops=67e12),
    "h200": Target("NVIDIA H200 141GB HBM3e", "cuda", hbm_bytes=151397597184, peak_flops=989e12,
                   hbm_bytes_per_s=4.8e12, intra_host_bytes_per_s=450e9, inter_host_bytes_per_s=50e9,
                   mem_clock_khz=3750000, generation="hopper", vector_flops=67e12),
    # Cloud TPU chips (Google's published per-chip figures): bf16 peak, HBM bandwidth, ICI as half the
    # bidirectional per-chip figure, DCN per chip (v5p: 50 Gb/s published; v5e: its 6.4 Tb/s per 256-chip pod;
    # v4 and v6e: not published per chip, v5p's figure assumed). HBM: the capacity libtpu compiles against.
    "v4": Target("TPU v4", "tpu", hbm_bytes=int(30.75 * GiB), peak_flops=275e12, hbm_bytes_per_s=1.2e12,
                 intra_host_bytes_per_s=150e9, inter_host_bytes_per_s=6.25e9, generation="v4", tpu_prefix="v4",
                 chip_config="megacore", grid_rank=3, cores_per_chip=2, wrap_from=64),
    "v5e": Target("TPU v5e", "tpu", hbm_bytes=int(15.75 * GiB), peak_flops=197e12, hbm_bytes_per_s=819e9,
                  intra_host_bytes_per_s=200e9, inter_host_bytes_per_s=3.125e9, generation="v5e", tpu_prefix="v5e",
                  chip_config="default", grid_rank=2, wrap_from=128),
    "v5p": Target("TPU v5p", "tpu", hbm_bytes=int(95.74 * GiB), peak_flops=459e12, hbm_bytes_per_s=2.765e12,
                  intra_host_bytes_per_s=600e9, inter_host_bytes_per_s=6.25e9, generation="v5p", tpu_prefix="v5",
                  chip_config="megacore", grid_rank=3, cores_per_chip=2, wrap_from=64),
    "v6e": Target("TPU v6e", "tpu", hbm_bytes=int(31.25 * GiB), peak_flops=918e12, hbm_bytes_per_s=1.638e12,
                  intra_host_bytes_per_s=400e9, inter_host_bytes_per_s=6.25e9, generation="v6e", tpu_prefix="v6e",
                  chip_config="default", grid_rank=2, wrap_from=128),
    # Fake CPU devices: the tool's logic on any machine. The figures are nominal, not a CPU's.
    "cpu": Target("CPU (fake devices)", "cpu", hbm_bytes=16 * GiB, peak_flops=1e12, hbm_bytes_per_s=100e9,
                  intra_host_bytes_per_s=50e9, inter_host_bytes_per_s=10e9),
}


@dataclasses.dataclass(frozen=True)
class Topology:
    """`SxHxG`: S slices x H hosts x G devices per host."""
    slices: int
    hosts: int
    per_host: int

    @classmethod
    def parse(cls, text: str) -> Topology:
        parts = text.lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"--topology {text!r}: use SxHxG (slices x hosts x devices per host), e.g. 1x1x8")
        return cls(*(int(p) for p in parts))

    @property
    def num_devices(self) -> int:
        return self.slices * self.hosts * self.per_host

    @property
    def num_hosts(self) -> int:
        return self.slices * self.hosts

    def __str__(self) -> str:
        return f"{self.slices}x{self.hosts}x{self.per_host}"


# ------------------------------------------------------------------------------------------------ TPU slices

# Cloud TPU's slice shapes by chip count: 2D tori for v5e/v6e, 3D for v4/v5p.
_GRIDS = {2: {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)},
          3: {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
              256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16)}}


def tpu_slice(target: Target, topology: Topology) -> dict:
    """The `get_topology_desc` arguments for `topology` (S slices x H hosts x G chips per host) of `target`."""
    chips = topology.hosts * topology.per_host
    grids = _GRIDS[target.grid_rank]
    if chips not in grids:
        raise ValueError(f"--topology {topology}: a {target.generation} slice has one of {sorted(grids)} chips, "
                         f"not {chips}")
    grid = grids[chips]
    per_host = {1: (1, 1, 1), 4: (2, 2, 1), 8: (2, 4, 1)}.get(topology.per_host)
    if per_host is None or topology.per_host > chips:
        raise ValueError(f"--topology {topology}: a TPU host has 1, 4 or 8 chips (at most the slice's {chips})")
    # An axis wraps around (a torus ring) once the slice is large enough: every axis of 4+ chips from 64 chips
    # on v4/v5p; on v5e/v6e only full-pod axes of 16 chips (8x16: the 16 axis; 16x16: both).
    if chips < target.wrap_from:
        wrap = (False,) * len(grid)
    elif target.grid_rank == 3:
        wrap = tuple(d >= 4 for d in grid)
    else:
        wrap = tuple(d == 16 for d in grid)
    return dict(platform="tpu", topology_name=f"{target.tpu_prefix}:{'x'.join(map(str, grid))}",
                chip_config_name=target.chip_config, chips_per_host_bounds=per_host,
                num_slices=topology.slices, wrap=wrap + (False,) * (3 - len(wrap)))


_SLICE_NAME = re.compile(r"^(v4|v5e|v5p|v6e)-(\d+)$")


def parse_target(name: str, topology: str | None) -> tuple[Target, Topology]:
    """A --target (h100, h200, cpu, v4, v5e, v5p, v6e, or a slice name like v5p-64) and its topology.

    Slice names follow Cloud TPU's accelerator types: v5e-N and v6e-N count chips, v4-N and v5p-N count
    TensorCores (two per chip: v5p-64 is 32 chips). Their hosts hold 4 chips (8 for v5e-8 and v6e-8).
    `topology` (SxHxG) may add slices (2x8x4 with v5p-64: two 32-chip slices) but must keep the chip count.
    """
    m = _SLICE_NAME.match(name.lower())
    if m is None:
        if name not in TARGETS:
            raise ValueError(f"--target {name!r}: use one of {', '.join(sorted(TARGETS))} or a TPU slice name "
                             "like v5p-64, v6e-64, v5e-256")
        target = TARGETS[name]
        if topology is None:
            if target.platform == "tpu":
                raise ValueError(f"--target {name} needs --topology SxHxG (e.g. 1x8x4: 32 chips on 8 hosts) or "
                                 f"a slice name like {name}-64")
            topology = "1x1x8"
        return target, Topology.parse(topology)
    target = TARGETS[m.group(1)]
    count = int(m.group(2))
    if count % target.cores_per_chip:
        raise ValueError(f"--target {name}: {m.group(1)}-N counts TensorCores, {target.cores_per_chip} per chip")
    chips = count // target.cores_per_chip
    per_host = 8 if chips == 8 and target.grid_rank == 2 else min(4, chips)
    named = Topology(1, max(1, chips // per_host), per_host)
    if topology is None:
        return target, named
    given = Topology.parse(topology)
    if given.hosts * given.per_host != chips:
        raise ValueError(f"--topology {topology} has {given.hosts * given.per_host} chips per slice but {name} "
                         f"has {chips}; use {named} (or Sx{named.hosts}x{named.per_host} for S slices)")
    return target, given
