"""Where a run executes, and the config choices that follow from it.

A stage config is written once for every machine: `model.attention_impl = "auto"` picks the attention kernel
of the platform (cuDNN flash attention on NVIDIA GPUs, Pallas splash attention on TPUs, XLA's einsums on the
CPU), and a preset's `hardware` section holds the settings it needs on a platform or TPU generation (scanned
layers on TPUs, sharded frozen weights on a 32-GiB chip, ...). `apply_hardware` resolves both in place, before
the config is validated; a field set on the command line always wins. An attention kernel that cannot run on
the platform is refused at start-up with a one-line reason.
"""
from __future__ import annotations

import dataclasses

import ml_collections

from exo2ego_jax.configfile import apply_overrides
from exo2ego_jax.errors import ConfigError

PLATFORMS = ("gpu", "tpu", "cpu")
TPU_GENERATIONS = ("v4", "v5e", "v5p", "v6e")
ATTENTION_BY_PLATFORM = {"gpu": "cudnn", "tpu": "splash", "cpu": "xla"}
# The platforms each attention kernel runs on (splash runs on a CPU in Pallas' interpret mode: exact, slow).
ATTENTION_PLATFORMS = {"xla": PLATFORMS, "cudnn": ("gpu",), "splash": ("tpu", "cpu")}


@dataclasses.dataclass(frozen=True)
class Hardware:
    platform: str          # gpu, tpu or cpu
    generation: str = ""   # TPU generation (v4, v5e, v5p, v6e); empty elsewhere

    def __str__(self) -> str:
        return f"{self.platform} {self.generation}".strip()


def tpu_generation(device_kind: str) -> str:
    """'TPU v5 lite' -> 'v5e', 'TPU v5' / 'TPU v5p' -> 'v5p', 'TPU v6 lite' / 'TPU v6e' -> 'v6e', 'TPU v4' -> 'v4'."""
    kind = device_kind.lower().replace("tpu", "").strip()
    lite = "lite" in kind or kind.endswith("e")
    if kind.startswith("v4"):
        return "v4"
    if kind.startswith("v5"):
        return "v5e" if lite else "v5p"
    if kind.startswith("v6"):
        return "v6e"
    return kind.split()[0] if kind else ""


def hardware_of(device) -> Hardware:
    """The hardware of a device (a real one, or a compile-only one from a topology description)."""
    platform = {"cuda": "gpu", "rocm": "gpu"}.get(device.platform, device.platform)
    generation = tpu_generation(device.device_kind) if platform == "tpu" else ""
    return Hardware(platform, generation)


def current_hardware() -> Hardware:
    import jax
    return hardware_of(jax.devices()[0])


def empty_hardware_section() -> ml_collections.ConfigDict:
    """A preset's per-hardware settings: for each platform and TPU generation, (dotted field, value) pairs."""
    return ml_collections.ConfigDict(dict.fromkeys(PLATFORMS + TPU_GENERATIONS, ()))


def _explicitly_set(field: str, explicit) -> bool:
    return bool(explicit) and any(field == e or field.startswith(e + ".") for e in explicit)


def apply_hardware(c: ml_collections.ConfigDict, hardware: Hardware, explicit=None) -> list[str]:
    """Resolve `c` for `hardware` in place and return what changed, one line each. `explicit`: the fields the
    command line set (never changed here)."""
    notes = []
    section = c.get("hardware")
    for key in (hardware.platform, hardware.generation):
        if not key or section is None or key not in section:
            continue
        for pair in section[key]:
            if len(pair) != 2 or not isinstance(pair[0], str):
                raise ConfigError(f"config field 'hardware.{key}': {pair!r} is not a (dotted field, value) pair")
            field, value = pair
            if _explicitly_set(field, explicit):
                continue
            apply_overrides(c, {field: value})
            notes.append(f"{field}={value!r} (hardware.{key})")
    impl = c.model.attention_impl
    if impl == "auto":
        c.model.attention_impl = ATTENTION_BY_PLATFORM[hardware.platform]
        notes.append(f"model.attention_impl={c.model.attention_impl!r} (auto on {hardware.platform})")
    check_attention(c.model.attention_impl, hardware)
    return notes


def check_attention(impl: str, hardware: Hardware) -> None:
    allowed = ATTENTION_PLATFORMS.get(impl)
    if allowed is None:
        raise ConfigError(f"config field 'model.attention_impl': {impl!r} is not one of "
                          f"{('auto',) + tuple(ATTENTION_PLATFORMS)}")
    if hardware.platform not in allowed:
        fits = ", ".join(k for k, v in ATTENTION_PLATFORMS.items() if hardware.platform in v)
        raise ConfigError(f"config field 'model.attention_impl': {impl!r} cannot run on {hardware} (it runs on "
                          f"{', '.join(allowed)}); set --config.model.attention_impl=auto or one of: {fits}")
