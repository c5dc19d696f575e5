"""Compile targets for ahead-of-time compilation without the hardware: NVIDIA H100 / H200 and fake CPU devices.

A GPU target is XLA's `GpuTargetConfig` (text protobuf) for a Hopper part (sm_90a), built here from the
device's published figures, plus the bandwidths the roofline bound uses. XLA compiles for it on a machine with
no GPU once the CUDA plugin is installed (`pip install -e '.[aot]'`) and JAX runs on the CPU platform.
"""
from __future__ import annotations

import dataclasses

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
    """A device to compile for and the figures of its roofline (per device)."""
    name: str
    platform: str                 # "cuda" or "cpu"
    hbm_bytes: int                # device memory
    peak_flops: float             # dense bf16 FLOP/s (datasheet)
    hbm_bytes_per_s: float
    intra_host_bytes_per_s: float  # one direction, per device: NVLink for GPUs
    inter_host_bytes_per_s: float  # per device across hosts: InfiniBand for GPUs
    mem_clock_khz: int = 0
    cudnn: tuple[int, int, int] = (9, 10, 0)

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
                   mem_clock_khz=2619000),
    "h200": Target("NVIDIA H200 141GB HBM3e", "cuda", hbm_bytes=151397597184, peak_flops=989e12,
                   hbm_bytes_per_s=4.8e12, intra_host_bytes_per_s=450e9, inter_host_bytes_per_s=50e9,
                   mem_clock_khz=3750000),
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
