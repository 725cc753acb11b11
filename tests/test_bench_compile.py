"""`jaxserve bench compile` (benchmarks/compile.py): every Pallas kernel of the quick set really
becomes sm_90 machine code on this GPU-less machine — registers in range, no spills, shared memory
within the limit — and a kernel that does spill is caught (exit status 1, named).

Needs the `triton` wheel (ptxas and cuobjdump inside) and jax's Pallas-Triton internals: skips
with the reason where either is missing.
"""
import importlib.util
import inspect
import json
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton", reason="the triton wheel (ptxas, cuobjdump) is not installed")
pytest.importorskip("triton.backends.compiler", reason="this triton has no GPUTarget")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning",
                                        "ignore:TRITON_DEFAULT_FP_FUSION:UserWarning")

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "compile.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("bench_compile", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


bench = load_benchmark()
try:
    bench.triton_lowering_module()
except ImportError as e:
    pytest.skip(f"jax's Pallas-Triton internals moved: {e}", allow_module_level=True)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """The quick set through main(), kernels and JSON kept: (exit status, result, kernel folder)."""
    out = tmp_path_factory.mktemp("compile")
    status = bench.main(["--quick", "--out", str(out / "kernels"), "--save-result", str(out / "result.json")])
    return status, json.loads((out / "result.json").read_text()), out / "kernels"


def test_quick_set_compiles_for_sm90_without_spills(quick_run):
    status, result, folder = quick_run
    rows = result["rows"]
    assert status == 0, result["failures"]
    assert result["archs"] == ["sm_90"] and {r["arch"] for r in rows} == {"sm_90"}
    names = {r["name"] for r in rows}
    assert {"lora_mbgmv_shrink", "lora_mbgmv_expand", "lora_sgmv_shrink", "lora_sgmv_expand"} <= names
    assert any(n.startswith("paged_attention") for n in names), names
    limit = bench.ARCHS[90].smem_per_block
    for r in rows:
        assert "error" not in r, r
        cubins = list(folder.glob(f"*/{r['name']}.sm_90.cubin"))
        assert cubins and all(c.read_bytes()[:4] == b"\x7fELF" for c in cubins), r["name"]
        assert 0 < r["regs"] <= 255, r
        assert r["ptxas_regs"] == r["regs"], "ptxas' log and cuobjdump disagree"
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        assert 0 <= r["smem"] <= limit and r["smem"] == r["static_smem"] + r["dynamic_smem"], r
        assert 0 < r["occupancy_pct"] <= 100, r
        assert r["problems"] == []


def test_launch_knobs_are_the_ones_the_kernels_set(quick_run):
    """num_warps / num_stages come from each pallas_call's compiler params: the kernels' defaults."""
    from jaxserve.pallas import lora, paged_attention
    _, result, _ = quick_run
    for r in result["rows"]:
        op = {"attention": paged_attention.paged_attention, "mbgmv": lora.lora_delta_mbgmv,
              "sgmv": lora.lora_delta_sgmv}[r["kernel"]]
        defaults = inspect.signature(op).parameters
        assert (r["num_warps"], r["num_stages"]) == (defaults["num_warps"].default, defaults["num_stages"].default)


def spilling_variant():
    """A one-warp kernel holding a [16, 32, 32] float32 product: 512 values per thread, far past
    255 registers, so ptxas must spill."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton

    def kernel(x_ref, y_ref, o_ref):
        o_ref[...] = (x_ref[...][:, :, None] * y_ref[...][None, :, :]).sum(axis=1)

    def fn(x, y):
        return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((16, 32), jnp.float32), name="spiller",
                              compiler_params=pltriton.CompilerParams(num_warps=1, num_stages=1))(x, y)
    args = (jax.ShapeDtypeStruct((16, 32), jnp.float32), jax.ShapeDtypeStruct((32, 32), jnp.float32))
    return bench.Variant("test", "none", "16x32 @ 32x32", fn, args)


def test_a_spilling_kernel_fails_the_run(monkeypatch, capsys):
    monkeypatch.setattr(bench, "build_variants", lambda *a: [spilling_variant()])
    assert bench.main(["--arch", "90"]) == 1
    out = capsys.readouterr().out
    assert "1 problem(s):" in out and "spiller: spills" in out


def test_occupancy_rules():
    sm90, sm80 = bench.ARCHS[90], bench.ARCHS[80]
    # 56 registers: 1,792 per warp -> 36 warps by registers, 9 blocks of 4 warps.
    assert bench.occupancy(56, 7872, 4, sm90) == {"occupancy_warps": 36, "occupancy_pct": 56.25,
                                                   "limiter": "registers"}
    assert bench.occupancy(32, 0, 4, sm90)["occupancy_pct"] == 100.0
    # 100 KiB of shared memory (+1 KiB reserved): 2 blocks fit in 228 KiB, 1 in 164 KiB.
    assert bench.occupancy(32, 100 * 1024, 4, sm90)["occupancy_warps"] == 8
    assert bench.occupancy(32, 100 * 1024, 4, sm80) == {"occupancy_warps": 4, "occupancy_pct": 6.25,
                                                         "limiter": "shared memory"}
    row = {"spill_stores": 0, "spill_loads": 0, "smem": 164 * 1024, "regs": 40}
    assert bench.problems(row, sm90) == [] and "per block on sm_80" in bench.problems(row, sm80)[0]


@pytest.mark.parametrize("flags,message", [
    (["--models", "gpt2"], "--models 'gpt2' is invalid; allowed: a comma-separated list of smollm2, llama-7b, "
                           "llama-13b"),
    (["--arch", "75"], "--arch '75' is invalid; allowed: a comma-separated list of 90, 80"),
    (["--pool-gib", "0"], "--pool-gib 0.0 is invalid; allowed: a size in GiB > 0"),
])
def test_bad_flags_name_what_is_allowed(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.main(flags)
    assert exit_.value.code == 2 and message in capsys.readouterr().err
