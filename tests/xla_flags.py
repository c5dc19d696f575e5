"""XLA flags of the test processes (this module imports nothing, so conftest can use it before JAX loads).

The tests compile many small programs and run each a few times, so on CPUs compiling dominates: LLVM's cheap
pipeline (`--xla_backend_optimization_level=0`, no expensive passes) makes a tiny stage run's process about 40%
faster. It changes code generation only (the HLO the accounting tests read is the same), and every comparison
in the tests is between programs compiled alike. Benchmarks and launch scripts never set these.
"""
FAST_CPU_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def cpu_devices(n: int = 1) -> str:
    """XLA_FLAGS for a test process (or a process a test launches) with `n` CPU devices."""
    return FAST_CPU_COMPILE + (f" --xla_force_host_platform_device_count={n}" if n > 1 else "")
