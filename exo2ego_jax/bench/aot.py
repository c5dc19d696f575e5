"""Ahead-of-time compilation of a stage's train step for a device topology it does not run on.

The step is the one `launch/stageN.py` runs (`train.loop.build_step`), built from abstract shapes only: no
weights are allocated and no checkpoint is read (the architecture comes from the config's model section, which
for the 7b presets is VideoLLaMA2-7B-16F's). It is lowered with `ShapeDtypeStruct` arguments sharded on a mesh
of the target's devices and compiled; `report` turns the executable into the figures `launch/aot_compile.py`
prints: memory per device, executed vs model FLOPs, collectives, custom calls and a roofline bound.
"""
from __future__ import annotations

import dataclasses
import re
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from exo2ego_jax.bench import estimate as estimate_lib
from exo2ego_jax.bench import hlo
from exo2ego_jax.bench.targets import Target, Topology, tpu_slice
from exo2ego_jax import device_memory
from exo2ego_jax.errors import ConfigError
from exo2ego_jax.models import registry
from exo2ego_jax.models.exo2ego import Exo2Ego
from exo2ego_jax.models.params import flatten, path_matcher
from exo2ego_jax.train import state as state_lib
from exo2ego_jax.train.config import Run
from exo2ego_jax.train.loop import StepBuild, build_step, make_mesh

GiB = 2 ** 30


def target_devices(target: Target, topology: Topology) -> list:
    """Compile-only devices of a GPU or TPU topology, or this process's (fake) CPU devices."""
    if target.platform == "tpu":
        from jax.experimental import topologies
        try:
            desc = topologies.get_topology_desc(**tpu_slice(target, topology))
        except ValueError:
            raise
        except Exception as e:  # libtpu is missing, or JAX started on another platform
            raise ConfigError(f"cannot describe {target.name} x {topology} ({type(e).__name__}: {str(e)[:200]}); "
                              "install the TPU compiler with `pip install -e '.[tpu]'` and run with JAX_PLATFORMS=cpu "
                              "(launch/aot_compile.py sets it)") from e
        return list(desc.devices)
    if target.platform == "cpu":
        devices = jax.devices("cpu")
        if len(devices) < topology.num_devices:
            raise ConfigError(f"--topology {topology} needs {topology.num_devices} CPU devices but JAX has "
                              f"{len(devices)}; launch/aot_compile.py sets XLA_FLAGS="
                              f"--xla_force_host_platform_device_count before JAX starts")
        return devices[:topology.num_devices]
    from jax.experimental import topologies
    try:
        desc = topologies.get_topology_desc(platform="cuda", target_config=target.gpu_target_config(),
                                            topology=str(topology))
    except Exception as e:  # the plugin is missing, or JAX started on another platform
        raise ConfigError(f"cannot describe {target.name} x {topology} ({type(e).__name__}: {str(e)[:200]}); "
                          "install the compiler with `pip install -e '.[aot]'` and run with JAX_PLATFORMS=cpu "
                          "(launch/aot_compile.py sets it)") from e
    return list(desc.devices)


def text_width(run: Run) -> int:
    """The widest text batch the loader produces (the largest bucket, or the sequence cap)."""
    buckets = [int(b) for b in run.config.data.text_buckets if int(b) <= run.config.data.seq_len]
    return max(buckets) if buckets else int(run.config.data.seq_len)


def abstract_batch(run: Run, sharding, width: int) -> dict:
    c, m = run.config, run.model
    b, t, s = c.batch_size, m.num_frames, m.clip.image_size
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    batch = dict(input_ids=spec((b, width), jnp.int32), attention_mask=spec((b, width), jnp.bool_),
                 labels=spec((b, width), jnp.int32))
    for view in run.views:
        batch[f"{view}_pixels"] = spec((b, t, s, s, 3), jnp.dtype(c.compute_dtype))
    return batch


def abstract_state(run: Run, build: StepBuild) -> tuple[dict, dict]:
    """(train state, frozen params) as sharded ShapeDtypeStructs: what `init_params` + `new_state` would make."""
    c = run.config
    trainable, frozen = state_lib.abstract_trainable_frozen(build.module, run.stage, c.frozen_dtype)
    state_like = jax.eval_shape(lambda t: dict(step=jnp.zeros((), jnp.int32), trainable=t, opt_state=build.tx.init(t),
                                               rng=jax.random.key_data(jax.random.key(0))), trainable)
    frozen = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), frozen,
                          build.layout.frozen)
    return state_lib.abstract_state(state_like, build.layout), frozen


@dataclasses.dataclass
class Compiled:
    run: Run
    mesh: object
    build: StepBuild
    executable: object     # None when the compiler refused the program for lack of device memory
    width: int
    lower_s: float
    compile_s: float
    out_of_memory: dict | None = None   # {"required_bytes", "available_bytes", "message"} from the compiler


_SIZE = r"([\d.]+)\s*([KMGT]?)i?B?"
_UNITS = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def out_of_memory(error: Exception) -> dict | None:
    """The figures of a compiler's out-of-memory refusal (TPU: 'RESOURCE_EXHAUSTED: Ran out of memory on HBM,
    the total memory required for HLO temporaries (28.00G) exceeds available HBM (15.75G)'), else None."""
    text = str(error)
    if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
        return None
    size = lambda m: float(m.group(1)) * _UNITS[m.group(2)] if m else None
    required = re.search(r"required for [^(]*\(" + _SIZE + r"\)", text) or re.search(r"Used " + _SIZE + " of", text)
    available = re.search(r"available HBM \(" + _SIZE + r"\)", text) or re.search(r"of " + _SIZE + " hbm", text)
    line = next((ln.strip() for ln in text.splitlines() if "memory" in ln.lower()), text.strip()[:300])
    return dict(required_bytes=size(required), available_bytes=size(available), message=line[:500])


def compile_step(run: Run, devices: list, *, steps: int = 1000, num_hosts: int = 1) -> Compiled:
    """Lower and compile the stage's train step for `devices` (the mesh comes from the config's mesh.shape)."""
    mesh = make_mesh(run.config, devices)
    build = build_step(run, mesh, steps, process_count=num_hosts)
    state, frozen = abstract_state(run, build)
    width = text_width(run)
    batch = abstract_batch(run, build.layout.batch, width)
    t = time.perf_counter()
    with jax.set_mesh(mesh):
        lowered = build.step_fn.lower(state, frozen, batch)
    lower_s = time.perf_counter() - t
    t = time.perf_counter()
    try:
        executable, oom = lowered.compile(), None
    except Exception as e:  # the TPU compiler enforces the chip's HBM: a refusal is a result, not a crash
        oom = out_of_memory(e)
        if oom is None:
            raise
        executable = None
    return Compiled(run, mesh, build, executable, width, lower_s, time.perf_counter() - t, oom)


# ------------------------------------------------------------------------------------------- model FLOPs

def _forward_flops(fn, *args) -> float:
    """Matrix FLOPs (dots and convolutions, as in the executed count) of one forward pass, from its HLO."""
    text = jax.jit(fn).lower(*args).compiler_ir("hlo").as_hlo_text()
    return hlo.analyze(text, num_devices=1).total_flops


def model_flops(run: Run, width: int) -> dict:
    """The useful FLOPs of one optimizer step (all devices): each module's forward FLOPs at the step's shapes
    times 1 (forward) + 1 (weight gradients, when it trains) + 1 (input gradients, when anything upstream
    trains); causal attention counts half its score matrices; recomputation never counts."""
    c, cfg, spec = run.config, run.model, run.stage
    plain = dict(attention_impl="xla", remat_policy="none", scan_layers=False)  # every matmul written out once
    counting = dataclasses.replace(cfg, clip=dataclasses.replace(cfg.clip, **plain),
                                   llm=dataclasses.replace(cfg.llm, **plain))
    module = Exo2Ego(counting)
    params = nn.meta.unbox(registry.abstract_params("exo2ego", module))
    trains = path_matcher(spec.trainable)
    flat = flatten(params)
    trained = lambda prefix: any(trains(p) for p in flat if p.startswith(prefix + "/"))
    b, t, g, d = c.batch_size, cfg.num_frames, cfg.grid, cfg.clip.hidden_size
    dtype = jnp.dtype(c.compute_dtype)
    pixels = jax.ShapeDtypeStruct((b, t, cfg.clip.image_size, cfg.clip.image_size, 3), dtype)
    feats = jax.ShapeDtypeStruct((b, t, g * g, d), dtype)
    apply = lambda method, **kw: (lambda p, *a: module.apply({"params": p}, *a, method=method, **kw))

    out: dict = {}

    def add(name, fwd, weight_grads, input_grads):
        out[name] = fwd * (1 + weight_grads + input_grads)

    fusion = spec.fusion
    uses_f = fusion != "none" or spec.guidance
    x_grad = False
    if spec.guidance:  # stage 2: x and y, F and G both ways
        enc = _forward_flops(apply("encode", view="ego"), params, pixels)
        add("ego_encoder", enc, trained("ego_encoder"), False)
        add("exo_encoder", enc, trained("exo_encoder"), False)
        x_grad = trained("ego_encoder")
        f_fwd = _forward_flops(apply("map_f"), params, feats)
        g_fwd = _forward_flops(apply("map_g"), params, feats)
        cycle = run.loss.cycle
        f_calls = 1 + (cycle == "both")
        g_calls = (cycle != "none") + (cycle == "both")
        add("mapper_f", f_fwd * f_calls, trained("mapper_f"), x_grad or trained("mapper_g"))
        add("mapper_g", g_fwd * g_calls, trained("mapper_g"), x_grad or trained("mapper_f"))
    else:
        view = spec.view
        enc = _forward_flops(apply("encode", view=view), params, pixels)
        add(f"{view}_encoder", enc, trained(f"{view}_encoder"), False)
        x_grad = trained(f"{view}_encoder")
        if uses_f and view == "ego":
            add("mapper_f", _forward_flops(apply("map_f"), params, feats), trained("mapper_f"), x_grad)
    clips = 2 * b if (uses_f and spec.view == "ego" and fusion == "tokens") else b
    frames = 2 * t if fusion == "frames" and spec.view == "ego" else t
    connector_in = jax.ShapeDtypeStruct((clips, frames, g * g, d), dtype)
    visual_grad = x_grad or (uses_f and trained("mapper_f"))
    add("connector", _forward_flops(apply("connect", fusion="none"), params, connector_in), trained("connector"),
        visual_grad)
    n_visual = cfg.num_visual_tokens(fusion if spec.view == "ego" else "none")
    length = _bucket(width - 1 + n_visual, cfg.length_buckets)
    llm = cfg.llm
    ids = jax.ShapeDtypeStruct((b, length), jnp.int32)
    llm_fwd = _forward_flops(lambda p, i: module.apply({"params": p}, i, method=lambda m, i: m.llm(i)), params, ids)
    attention = 2 * 2 * b * llm.num_layers * llm.num_heads * llm.head_dim * length * length
    llm_fwd -= attention / 2  # causal: the upper half of every score matrix is masked, not useful
    lora = 0.0
    if llm.lora is not None:
        per_layer = sum(llm.lora.rank * (i + o) for i, o in _lora_shapes(llm))
        lora = 2.0 * b * length * llm.num_layers * per_layer
    upstream = visual_grad or trained("connector")
    add("llm", llm_fwd - lora, False, upstream or lora > 0)
    if lora:
        add("lora", lora, True, upstream or True)
    out["total"] = float(sum(out.values()))
    out["llm_tokens"] = b * length
    return out


def _bucket(length: int, buckets) -> int:
    return next((bk for bk in sorted(buckets) if bk >= length), length)


def _lora_shapes(llm) -> list[tuple[int, int]]:
    q, kv, d, f = llm.num_heads * llm.head_dim, llm.num_kv_heads * llm.head_dim, llm.hidden_size, llm.intermediate_size
    shapes = dict(q=(d, q), k=(d, kv), v=(d, kv), o=(q, d), gate=(d, f), up=(d, f), down=(f, d))
    return [shapes[t] for t in llm.lora.targets]


# ------------------------------------------------------------------------------------------------- report

def _memory(exe) -> dict:
    mem = exe.memory_analysis()
    memory = dict(argument=int(mem.argument_size_in_bytes), output=int(mem.output_size_in_bytes),
                  alias=int(mem.alias_size_in_bytes), temp=int(mem.temp_size_in_bytes))
    memory["total"] = memory["argument"] + memory["output"] - memory["alias"] + memory["temp"]
    peak = getattr(mem, "peak_memory_in_bytes", 0) or 0  # TPU executables report their peak too
    if peak:
        memory["peak"] = int(peak)
        memory["total"] = max(memory["total"], int(peak))
    return memory


def usable_bytes(target: Target) -> int:
    """What the step may use per device: GPUs leave a share to the runtime (device_memory.py); a TPU program
    gets the HBM the compiler enforces."""
    return device_memory.usable_bytes(target.hbm_bytes) if target.platform == "cuda" else target.hbm_bytes


def report(compiled: Compiled, target: Target, topology: Topology, *, with_model_flops: bool = True) -> dict:
    """The figures of a compiled step (per device unless named otherwise). A step the compiler refused for lack
    of memory gets `fits: false` and the compiler's figures in `out_of_memory`, nothing else measured."""
    run, mesh = compiled.run, compiled.mesh
    c = run.config
    n = mesh.devices.size
    usable = usable_bytes(target)
    head = dict(stage=c.stage, preset=c.preset, target=target.describe(), topology=str(topology), devices=n,
                mesh=dict(mesh.shape), batch_size=c.batch_size, microbatches=compiled.build.microbatches,
                per_device_batch=c.batch_size // compiled.build.microbatches // (mesh.shape["data"] * mesh.shape["fsdp"]),
                text_width=compiled.width, hbm_bytes=target.hbm_bytes, usable_bytes=usable,
                attention=run.model.llm.attention_impl, frozen_layout=c.sharding.frozen,
                remat=dict(llm=c.model.remat_policy, clip=c.model.clip_remat_policy),
                scan_layers=bool(c.model.scan_layers), hardware_notes=list(run.notes),
                compile_s=compiled.compile_s, lower_s=compiled.lower_s, jax=jax.__version__)
    if compiled.executable is None:
        oom = compiled.out_of_memory
        return dict(head, fits=False, out_of_memory=oom,
                    memory=dict(total=oom["required_bytes"]) if oom["required_bytes"] else {})
    exe = compiled.executable
    memory = _memory(exe)
    devices = list(mesh.devices.flat)
    if target.platform == "cpu":  # fake devices share one process: hosts by position in the topology
        host_of = lambda i: i // topology.per_host
    elif target.platform == "tpu":  # every chip of a slice is on ICI, hosts included: only slices use DCN
        host_of = lambda i: getattr(devices[i], "slice_index", 0) or 0
    else:
        host_of = lambda i: devices[i].process_index
    analysis = hlo.analyze(exe.as_text(), num_devices=len(devices), host_of=host_of, num_slices=topology.slices)
    executed = analysis.total_flops
    model = model_flops(run, compiled.width) if with_model_flops else {"total": 0.0, "llm_tokens": 0}
    model_per_device = model["total"] / n
    compute_s = executed / target.peak_flops
    hbm_s = analysis.kernel_bytes / target.hbm_bytes_per_s
    slow = sum(v["cross_host_bytes"] for v in analysis.collectives.values())
    fast = sum(v["bytes"] for v in analysis.collectives.values()) - slow
    comm_s = fast / target.intra_host_bytes_per_s + slow / target.inter_host_bytes_per_s
    step_s = max(compute_s, hbm_s, comm_s)
    est = estimate_lib.estimate(exe.as_text(), target, num_devices=n, useful_flops=model_per_device,
                                host_of=host_of, num_slices=topology.slices)
    return dict(
        head, llm_tokens_per_step=model["llm_tokens"],
        fits=bool(memory["total"] <= usable), memory=memory, headroom=1.0 - memory["total"] / usable,
        flops=dict(executed=executed, model=model_per_device, by_kind=analysis.flops,
                   model_by_module={k: v / n for k, v in model.items() if k not in ("total", "llm_tokens")}),
        recompute_ratio=executed / model_per_device if model_per_device else None,
        collectives=analysis.collectives, custom_calls=analysis.custom_calls,
        # per device per step; cross_host_bytes in `collectives` is the slow link's share (GPUs: across hosts,
        # TPUs: across slices)
        collective_bytes={target.fast_link: fast, target.slow_link: slow},
        bound=dict(step_s=step_s, clips_per_s=c.batch_size / step_s if step_s else None,
                   clips_per_s_per_device=c.batch_size / step_s / n if step_s else None,
                   tokens_per_s=model["llm_tokens"] / n / step_s if step_s else None,
                   compute_s=compute_s, hbm_s=hbm_s, comm_s=comm_s,
                   comm_hidden_at_60pct=comm_s <= executed / (0.6 * target.peak_flops),
                   peak_flops=target.peak_flops, hbm_bytes_per_s=target.hbm_bytes_per_s,
                   intra_host_bytes_per_s=target.intra_host_bytes_per_s,
                   inter_host_bytes_per_s=target.inter_host_bytes_per_s),
        estimate=dict(step_s=est["step_s"], mfu=est["mfu"] if model_per_device else None,
                      exposed_collectives_s=est["exposed_collectives_s"], compute_s=est["compute_s"],
                      memory_bound_s=est["memory_bound_s"], collectives_s=est["collectives_s"],
                      launch_s=est["launch_s"], kernels=est["kernels"], kernel_runs=est["kernel_runs"],
                      clips_per_s=c.batch_size / est["step_s"] if est["step_s"] else None,
                      tokens_per_s=model["llm_tokens"] / n / est["step_s"] if est["step_s"] else None,
                      by_part=est["by_part"], assumptions=est["assumptions"]),
    )
