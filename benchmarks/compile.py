"""GPU machine code for every Pallas kernel the engine uses, built on a machine without a GPU.

    python benchmarks/compile.py [--quick] [--models smollm2,llama-7b,llama-13b] [--arch 90,80]
                                 [--pool-gib 64] [--out DIR] [--save-result FILE.json]
    (or: jaxserve bench compile ...)

Each kernel variant — paged attention (pallas/paged_attention.py) at a decode batch (max_num_seqs
tokens) and a prefill batch (max_num_batched_tokens), MBGMV at the largest decode batch it serves
(lora.DECODE_MAX_TOKENS) and SGMV at a prefill batch, both at every distinct (fan_in, fan_out) of
q/k/v/o/gate/up/down — is called exactly as the `pallas` backend calls it (default knobs, the
engine's page size, max_loras, max_lora_rank), in bfloat16, with the shapes of SmolLM2-135M,
Llama-2-7B and Llama-2-13B, the unified pool sized to --pool-gib (past 2^31 elements the lowering
switches the pool's offsets to 64 bits, which changes the register count: size it as served).
Only shapes are traced; nothing runs.

Per variant: jax.export lowers it for CUDA through the Pallas Triton backend; the Triton module
of each pallas_call is captured (jax internals: `lower_jaxpr_to_triton_module`), written as .ttir
and compiled by the `triton` wheel (`triton.compile`, which runs its own ptxas) for each --arch,
with the num_warps / num_stages the kernel asks for (read from the pallas_call's compiler params).
Read back: registers per thread and spill bytes (ptxas' log), static shared memory (`cuobjdump
--dump-resource-usage` on the cubin; the cuobjdump shipped in the wheel) plus the dynamic shared
memory Triton requests, against the architecture's limits, and the occupancy those allow.

Occupancy (as CUDA's occupancy calculator): resident blocks per SM = the least of 64 warps /
warps per block, 32 blocks, 65,536 registers / (registers per warp rounded up to 256) / warps per
block, and shared memory per SM / (the block's shared memory + the 1 KiB the CUDA runtime reserves
per block); occupancy = resident warps / 64.

Caveat: XLA compiles the same Triton IR with the Triton it links, not this wheel's: the figures
are this Triton's view of the kernels, close to but not identical with what runs under jax.

Exit status 1 when any variant fails to lower or compile, spills, or needs more shared memory
than a block may have (each is named in the summary).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import io
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
import types
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(REPO))

warnings.filterwarnings("ignore", message=r"The Pallas Triton backend is deprecated", category=DeprecationWarning)

# HF config.json fields of the models whose shapes the kernels are compiled at (no hub needed).
MODELS = {
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                    num_hidden_layers=30, vocab_size=49152, max_position_embeddings=8192),
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                     num_hidden_layers=32, vocab_size=32000, max_position_embeddings=4096),
    "llama-13b": dict(hidden_size=5120, intermediate_size=13824, num_attention_heads=40, num_key_value_heads=40,
                      num_hidden_layers=40, vocab_size=32000, max_position_embeddings=4096),
}
DTYPE = "bfloat16"
KIB = 1024


@dataclasses.dataclass(frozen=True)
class Arch:
    """An NVIDIA architecture's per-SM limits (CUDA programming guide, compute capabilities table)."""
    capability: int
    smem_per_block: int
    smem_per_sm: int
    regs_per_sm: int = 65536
    max_regs_per_thread: int = 255
    reg_granularity: int = 256      # registers are allocated per warp in units of 256
    max_warps: int = 64
    max_blocks: int = 32
    reserved_smem_per_block: int = KIB  # the CUDA runtime's own shared memory per resident block

    @property
    def name(self) -> str:
        return f"sm_{self.capability}"


ARCHS = {90: Arch(90, 227 * KIB, 228 * KIB), 80: Arch(80, 163 * KIB, 164 * KIB)}


# ---------------------------------------------------------------------------------------------
# What to compile: the engine's kernel calls at each model's shapes
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Variant:
    """One op call to lower: fn(*args) with args given as shapes only."""
    kernel: str        # "attention", "mbgmv", "sgmv"
    model: str
    shape: str         # what distinguishes this call, for the table
    fn: object
    args: tuple


def engine_knobs() -> dict:
    """The engine's defaults that shape the kernels' arguments."""
    from jaxserve.config import EngineConfig
    e = EngineConfig()
    return dict(page_size=e.page_size, max_loras=e.max_loras, max_lora_rank=e.max_lora_rank,
                max_num_seqs=e.max_num_seqs, max_num_batched_tokens=e.max_num_batched_tokens)


def pool_shape(cfg, page_size: int, pool_gib: float) -> tuple[int, ...]:
    """The unified pool [L, 2, pages, page_size, kv_heads * head_dim] filling pool_gib of bf16."""
    page_bytes = cfg.num_layers * 2 * page_size * cfg.kv_size * 2
    return (cfg.num_layers, 2, max(1, int(pool_gib * 2**30) // page_bytes), page_size, cfg.kv_size)


def lora_fans(cfg) -> dict[tuple[int, int], list[str]]:
    """Distinct (fan_in, fan_out) of the LoRA-targetable projections -> the modules that have it."""
    from jaxserve.config import LORA_MODULES
    fans: dict[tuple[int, int], list[str]] = {}
    for module in LORA_MODULES:
        fans.setdefault(cfg.module_shape(module), []).append(module.removesuffix("_proj"))
    return fans


def attention_variants(name, cfg, knobs, pool, num_tokens_by_phase) -> list[Variant]:
    import jax
    import jax.numpy as jnp
    from jaxserve.pallas.paged_attention import paged_attention
    S = jax.ShapeDtypeStruct
    max_pages = -(-cfg.max_position_embeddings // knobs["page_size"])   # the largest page bucket
    scale = cfg.head_dim ** -0.5
    out = []
    for phase, tokens in num_tokens_by_phase.items():
        ints = S((tokens,), jnp.int32)
        args = (S((tokens, cfg.num_heads, cfg.head_dim), DTYPE), S((tokens, cfg.kv_size), DTYPE),
                S((tokens, cfg.kv_size), DTYPE), S(pool, DTYPE), S((), jnp.int32),
                S((knobs["max_num_seqs"], max_pages), jnp.int32), ints, ints, ints, S((tokens,), jnp.bool_))
        fn = functools.partial(paged_attention, scale=scale)
        shape = f"{phase} T={tokens} {cfg.num_heads}/{cfg.num_kv_heads}x{cfg.head_dim} ctx {max_pages * knobs['page_size']}"
        out.append(Variant("attention", name, shape, fn, args))
    return out


def lora_variants(name, cfg, knobs, pool, num_tokens_by_kernel, fans) -> list[Variant]:
    import jax
    import jax.numpy as jnp
    from jaxserve.lora.layout import chunks
    from jaxserve.pallas import lora
    S = jax.ShapeDtypeStruct
    ops = {"mbgmv": lora.lora_delta_mbgmv, "sgmv": lora.lora_delta_sgmv}
    n, rank, width = knobs["max_loras"], knobs["max_lora_rank"], pool[-1]
    out = []
    for kernel, tokens in num_tokens_by_kernel.items():
        for (fan_in, fan_out), modules in fans.items():
            args = (S((tokens, fan_in), DTYPE), S(pool, DTYPE), S((), jnp.int32),
                    S((n, rank, chunks(fan_in, width)), jnp.int32), S((n, rank, chunks(fan_out, width)), jnp.int32),
                    S((n,), jnp.int32), S((tokens,), jnp.int32))
            fn = functools.partial(ops[kernel], out_features=fan_out)
            out.append(Variant(kernel, name, f"{fan_in}x{fan_out} ({','.join(modules)}) T={tokens}", fn, args))
    return out


def build_variants(models: list[str], pool_gib: float, quick: bool) -> list[Variant]:
    """Every variant for the models; quick: one shape per kernel (the first model's q projection,
    attention at decode)."""
    from jaxserve.config import ModelConfig
    from jaxserve.pallas import lora
    knobs = engine_knobs()
    variants = []
    for name in models:
        cfg = ModelConfig.from_hf(MODELS[name])
        pool = pool_shape(cfg, knobs["page_size"], pool_gib)
        attention_tokens = {"decode": knobs["max_num_seqs"], "prefill": knobs["max_num_batched_tokens"]}
        lora_tokens = {"mbgmv": lora.DECODE_MAX_TOKENS, "sgmv": knobs["max_num_batched_tokens"]}
        fans = lora_fans(cfg)
        if quick:
            attention_tokens = {"decode": attention_tokens["decode"]}
            fans = dict([next(iter(fans.items()))])
        variants += attention_variants(name, cfg, knobs, pool, attention_tokens)
        variants += lora_variants(name, cfg, knobs, pool, lora_tokens, fans)
        if quick:
            break
    return variants


# ---------------------------------------------------------------------------------------------
# Lowering: the Triton module of each pallas_call (jax internals)
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class TritonKernel:
    name: str
    ttir: str
    grid: tuple
    num_warps: int
    num_stages: int


def triton_lowering_module():
    """jax's Pallas-Triton lowering module, or an ImportError naming what moved."""
    from jax._src.pallas.triton import pallas_call_registration as registration
    lowering = getattr(registration, "lowering", None)
    if lowering is None or not hasattr(lowering, "lower_jaxpr_to_triton_module"):
        raise ImportError("this jax lowers Pallas-Triton differently: no "
                          "pallas_call_registration.lowering.lower_jaxpr_to_triton_module")
    return registration


@contextlib.contextmanager
def capture_triton_modules(capability: int = 90):
    """Yields a list that collects (name, LoweringResult) of every Triton module lowered inside.
    jax >= 0.11 asks the (absent) GPU its compute capability: answer for it (only fp8 casts
    depend on it, so one lowering serves every --arch)."""
    registration = triton_lowering_module()
    lowering = registration.lowering
    original = lowering.lower_jaxpr_to_triton_module
    captured = []

    def capture(*args, **kwargs):
        result = original(*args, **kwargs)
        captured.append((str(result.module.operation.attributes["sym_name"]).strip('"'), result))
        return result
    gpu_info = getattr(registration, "gpu_info_lib", None)
    original_info = gpu_info.get_gpu_info if gpu_info is not None else None
    lowering.lower_jaxpr_to_triton_module = capture
    if gpu_info is not None:
        gpu_info.get_gpu_info = lambda: types.SimpleNamespace(compute_capability=capability)
    try:
        yield captured
    finally:
        lowering.lower_jaxpr_to_triton_module = original
        if gpu_info is not None:
            gpu_info.get_gpu_info = original_info


def pallas_call_params(fn, args) -> dict[str, tuple[int, int]]:
    """{kernel name: (num_warps, num_stages)} of every pallas_call fn makes, from its jaxpr; an
    unset value takes the Triton lowering's CUDA default (4 warps, 3 stages)."""
    import jax
    found = {}

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                params = eqn.params.get("compiler_params")
                params = params.get("triton", params) if isinstance(params, dict) else params
                warps, stages = getattr(params, "num_warps", None), getattr(params, "num_stages", None)
                found[eqn.params["name"]] = (4 if warps is None else warps, 3 if stages is None else stages)
                continue
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        walk(inner)
    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def lower_variant(variant: Variant) -> list[TritonKernel]:
    """Lower for CUDA (shapes only) and return each pallas_call's Triton module and launch knobs."""
    import jax
    params = pallas_call_params(variant.fn, variant.args)
    skip = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    with capture_triton_modules() as captured:
        jax.export.export(jax.jit(variant.fn), platforms=["cuda"], disabled_checks=skip)(*variant.args)
    if sorted(name for name, _ in captured) != sorted(params):
        raise RuntimeError(f"lowered Triton modules {[n for n, _ in captured]} do not match the pallas_calls "
                           f"{sorted(params)}")
    return [TritonKernel(name, str(result.module), tuple(result.grid), *params[name]) for name, result in captured]


# ---------------------------------------------------------------------------------------------
# Compiling: triton.compile per architecture, resources read back
# ---------------------------------------------------------------------------------------------

def cuobjdump_path() -> str:
    """cuobjdump shipped inside the triton wheel (TRITON_CUOBJDUMP_PATH overrides, as in Triton)."""
    import triton
    path = os.environ.get("TRITON_CUOBJDUMP_PATH") or str(Path(triton.__file__).parent / "backends" / "nvidia"
                                                           / "bin" / "cuobjdump")
    if not os.access(path, os.X_OK):
        raise FileNotFoundError(f"cuobjdump not found at {path}; allowed: the triton wheel's own, or "
                                f"TRITON_CUOBJDUMP_PATH")
    return path


@contextlib.contextmanager
def triton_environment(cache_dir: Path):
    """A fresh Triton cache (every kernel really compiles: honest times, and ptxas' log exists),
    ptxas' log printed (we capture it), fp fusion on (Triton 3.9's default, stated to silence its
    warning about the 3.10 change)."""
    settings = {"TRITON_CACHE_DIR": str(cache_dir), "TRITON_ALWAYS_COMPILE": "1", "TRITON_DUMP_PTXAS_LOG": "1",
                "TRITON_DEFAULT_FP_FUSION": os.environ.get("TRITON_DEFAULT_FP_FUSION", "1")}
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def parse_ptxas_log(log: str) -> dict:
    """Registers and spill bytes from `ptxas -v`'s log (None where a line is missing)."""
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {"ptxas_regs": int(regs.group(1)) if regs else None,
            "spill_stores": int(spills.group(1)) if spills else None,
            "spill_loads": int(spills.group(2)) if spills else None}


def parse_resource_usage(text: str) -> dict:
    """REG / SHARED / LOCAL of the one function in `cuobjdump --dump-resource-usage` output."""
    found = {k: int(v) for k, v in re.findall(r"\b(REG|SHARED|LOCAL|STACK):(\d+)", text)}
    if "REG" not in found:
        raise RuntimeError(f"no REG in cuobjdump's resource usage:\n{text}")
    return {"regs": found["REG"], "static_smem": found.get("SHARED", 0), "local_bytes": found.get("LOCAL", 0),
            "stack_bytes": found.get("STACK", 0)}


def compile_kernel(kernel: TritonKernel, arch: Arch, out_dir: Path) -> dict:
    """.ttir -> cubin for arch; the resources it needs."""
    import triton
    from triton.backends.compiler import GPUTarget
    stem = f"{kernel.name}.{arch.name}"   # one .ttir, then .cubin / .ptx / .ptxas.log per arch
    ttir = out_dir / f"{kernel.name}.ttir"
    ttir.write_text(kernel.ttir)
    log = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(log):       # Triton prints ptxas' log (TRITON_DUMP_PTXAS_LOG)
        compiled = triton.compile(str(ttir), target=GPUTarget("cuda", arch.capability, 32),
                                  options={"num_warps": kernel.num_warps, "num_stages": kernel.num_stages})
    seconds = time.perf_counter() - start
    cubin = out_dir / f"{stem}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    (out_dir / f"{stem}.ptx").write_text(compiled.asm["ptx"])
    (out_dir / f"{stem}.ptxas.log").write_text(log.getvalue())
    usage = subprocess.run([cuobjdump_path(), "--dump-resource-usage", str(cubin)], capture_output=True,
                           text=True, check=True).stdout
    row = {"compile_s": seconds, "dynamic_smem": int(compiled.metadata.shared), **parse_resource_usage(usage),
           **parse_ptxas_log(log.getvalue())}
    row["smem"] = row["static_smem"] + row["dynamic_smem"]
    if row["spill_stores"] is None:   # no ptxas log (a Triton without the knob): local memory is the sign
        row["spill_stores"] = row["spill_loads"] = row["local_bytes"]
    return row


def occupancy(regs: int, smem: int, num_warps: int, arch: Arch) -> dict:
    """Resident warps per SM and what limits them (CUDA's occupancy calculator's rules)."""
    regs_per_warp = -(-max(regs, 1) * 32 // arch.reg_granularity) * arch.reg_granularity
    limits = {
        "warps": arch.max_warps // num_warps,
        "blocks": arch.max_blocks,
        "registers": (arch.regs_per_sm // regs_per_warp) // num_warps,
        "shared memory": arch.smem_per_sm // (smem + arch.reserved_smem_per_block),
    }
    limiter = min(limits, key=limits.get)
    warps = limits[limiter] * num_warps
    return {"occupancy_warps": warps, "occupancy_pct": 100.0 * warps / arch.max_warps, "limiter": limiter}


def problems(row: dict, arch: Arch) -> list[str]:
    """Why a compiled kernel would not run well (or at all) on arch; empty when fine."""
    found = []
    if row["spill_stores"] or row["spill_loads"]:
        found.append(f"spills {row['spill_stores']} B stores / {row['spill_loads']} B loads")
    if row["smem"] > arch.smem_per_block:
        found.append(f"shared memory {row['smem']} B > {arch.smem_per_block} B per block on {arch.name}")
    if not 0 < row["regs"] <= arch.max_regs_per_thread:
        found.append(f"registers {row['regs']} outside 1..{arch.max_regs_per_thread}")
    return found


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

def run_variant(variant: Variant, archs: list[Arch], out_dir: Path) -> list[dict]:
    """Rows (one per pallas_call x arch) for one variant; a failure becomes a row with `error`."""
    base = {"kernel": variant.kernel, "model": variant.model, "shape": variant.shape}
    try:
        start = time.perf_counter()
        kernels = lower_variant(variant)
        lower_s = time.perf_counter() - start
    except Exception as e:  # noqa: BLE001 - report it and go on with the other variants
        traceback.print_exc()
        return [{**base, "arch": arch.name, "name": "(lowering)", "error": f"{type(e).__name__}: {e}"[:300]}
                for arch in archs]
    rows = []
    for kernel in kernels:
        for arch in archs:
            row = {**base, "arch": arch.name, "name": kernel.name, "grid": list(kernel.grid),
                   "num_warps": kernel.num_warps, "num_stages": kernel.num_stages, "lower_s": lower_s}
            try:
                row.update(compile_kernel(kernel, arch, out_dir))
                row.update(occupancy(row["regs"], row["smem"], kernel.num_warps, arch))
                row["problems"] = problems(row, arch)
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
            rows.append(row)
    return rows


def compile_all(variants: list[Variant], archs: list[Arch], out_dir: Path, progress=print) -> list[dict]:
    """Every variant on every arch, each kernel into its own folder of out_dir."""
    rows = []
    with triton_environment(out_dir / "triton-cache"):
        for i, variant in enumerate(variants):
            folder = out_dir / f"{i:02d}-{variant.model}-{variant.kernel}"
            folder.mkdir(parents=True, exist_ok=True)
            new = run_variant(variant, archs, folder)
            progress(f"  [{i + 1}/{len(variants)}] {variant.model} {variant.kernel} {variant.shape}: "
                     f"{len({r['name'] for r in new})} kernel(s), "
                     f"{sum(r.get('compile_s', 0.0) for r in new):.1f} s compile")
            rows += new
    return rows


def failures(rows: list[dict]) -> list[str]:
    return [f"{r['arch']} {r['model']} {r['kernel']} {r['shape']} {r['name']}: "
            + (r["error"] if "error" in r else "; ".join(r["problems"]))
            for r in rows if "error" in r or r.get("problems")]


def print_table(rows: list[dict], arch: Arch) -> None:
    print(f"\n== {arch.name}: limits {arch.max_regs_per_thread} registers/thread, {arch.regs_per_sm} per SM; "
          f"shared memory {arch.smem_per_block // KIB} KiB per block, {arch.smem_per_sm // KIB} KiB per SM; "
          f"{arch.max_warps} warps / {arch.max_blocks} blocks per SM ==")
    print(f"{'model':<9} {'kernel':<9} {'shape':<44} {'pallas_call':<34} {'warps':>5} {'stages':>6} {'regs':>4} "
          f"{'spill st/ld B':>13} {'smem B':>7} {'% limit':>7} {'occupancy':>9}  limited by")
    for r in rows:
        head = f"{r['model']:<9} {r['kernel']:<9} {r['shape']:<44} {r['name']:<34}"
        if "error" in r:
            print(f"{head} FAILED: {r['error']}")
            continue
        spills = f"{r['spill_stores']}/{r['spill_loads']}"
        print(f"{head} {r['num_warps']:>5} {r['num_stages']:>6} {r['regs']:>4} {spills:>13} {r['smem']:>7} "
              f"{100 * r['smem'] / arch.smem_per_block:>6.1f}% {r['occupancy_pct']:>8.1f}%  {r['limiter']}"
              + ("  <- " + "; ".join(r["problems"]) if r["problems"] else ""))


def parse_choices(parser, text: str, allowed, what: str) -> list:
    """A comma-separated subset of allowed; anything else is argparse's error (exit status 2)."""
    picked = [x.strip() for x in text.split(",") if x.strip()]
    if not picked or any(x not in allowed for x in picked):
        parser.error(f"--{what} {text!r} is invalid; allowed: a comma-separated list of {', '.join(allowed)}")
    return picked


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one shape per kernel (SmolLM2), sm_90 only")
    p.add_argument("--models", default=",".join(MODELS), help=f"among {','.join(MODELS)} (default: all)")
    p.add_argument("--arch", help="compute capabilities among 90,80 (default 90,80; --quick: 90)")
    p.add_argument("--pool-gib", type=float, default=64.0,
                   help="unified pool size the kernels index (default 64 GiB, as on an 80-141 GB GPU)")
    p.add_argument("--out", help="keep .ttir / .ptx / .cubin / ptxas logs here (default: a temporary folder)")
    p.add_argument("--save-result", help="write every row as JSON here")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    models = parse_choices(parser, args.models, list(MODELS), "models")
    archs = [ARCHS[int(a)] for a in parse_choices(parser, args.arch or ("90" if args.quick else "90,80"),
                                                   [str(a) for a in ARCHS], "arch")]
    if not args.pool_gib > 0:
        parser.error(f"--pool-gib {args.pool_gib} is invalid; allowed: a size in GiB > 0")
    start = time.perf_counter()
    import jax
    import triton

    from jaxserve import runtime
    runtime.setup_process()
    variants = build_variants(models, args.pool_gib, args.quick)
    print(f"jaxserve bench compile | jax {jax.__version__} | triton {triton.__version__} | {DTYPE} | "
          f"models {','.join(models)} | {', '.join(a.name for a in archs)} | pool {args.pool_gib:g} GiB | "
          f"{len(variants)} variants" + (" (quick)" if args.quick else ""), flush=True)
    with contextlib.ExitStack() as stack:
        out_dir = Path(args.out) if args.out else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        rows = compile_all(variants, archs, out_dir, progress=functools.partial(print, flush=True))
    for arch in archs:
        print_table([r for r in rows if r["arch"] == arch.name], arch)
    failed = failures(rows)
    total = time.perf_counter() - start
    kernels = sum(1 for r in rows if "error" not in r)
    print(f"\n{kernels} kernel compiles in {total:.1f} s total ("
          f"lowering + Triton + ptxas; {sum(r.get('compile_s', 0.0) for r in rows):.1f} s in triton.compile)")
    if failed:
        print(f"{len(failed)} problem(s):")
        for line in failed:
            print("  " + line)
    else:
        print("every variant compiled, no spills, shared memory within the limits")
    if args.out:
        print(f"kernels kept in {args.out}")
    if args.save_result:
        result = {"jax": jax.__version__, "triton": triton.__version__, "python": platform.python_version(),
                  "dtype": DTYPE, "models": models, "archs": [a.name for a in archs], "pool_gib": args.pool_gib,
                  "engine": engine_knobs(), "quick": args.quick, "total_s": total, "rows": rows, "failures": failed}
        Path(args.save_result).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.save_result}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
