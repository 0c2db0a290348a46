"""benchmarks/mosaic_probe.py runs its CPU part end to end: the Triton-vs-Mosaic-GPU lowering of every GPU kernel,
the CUDA export of the Mosaic-GPU-native STIS kernel, its tile plan and its interpreter check."""

from __future__ import annotations

import importlib.util
import json
import sys

import jax
import pytest

from conftest import REPO_ROOT

MOSAIC_TARGETS = ("mosaic_gpu_v2", "mosaic_gpu")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def probe_run(tmp_path_factory):
    if jax.default_backend() == "gpu":
        pytest.skip("the CPU part only: on a GPU the probe also times kernels")
    probe = _load("mosaic_probe")
    out = tmp_path_factory.mktemp("probe") / "probe.json"
    returned = probe.main(["--out", str(out)])
    return probe, json.loads(out.read_text()), returned


def test_lowering_entry_per_kernel_and_variant(probe_run):
    probe, data, _ = probe_run
    assert data["parts_failed"] == []
    assert data["jax"] == jax.__version__ and data["backend"] == "cpu" and data["date"]
    kernels = data["lowering"]["kernels"]
    assert set(kernels) == {"stis_attention_gpu", "select_blocks_gpu", "ltis_attention_gpu", "fused_attention_gpu"}
    for name, entry in kernels.items():
        assert set(probe.VARIANTS) <= set(entry), name
        # the unchanged kernels lower to exactly the Triton custom call
        assert entry["triton"]["ok"] and entry["triton"]["custom_call_targets"] == [probe.TRITON_TARGET], name
        for variant in ("mosaic_params", "no_params"):
            r = entry[variant]
            if r["ok"]:  # the patch took effect: Mosaic GPU, not a cached Triton lowering
                assert probe.TRITON_TARGET not in r["custom_call_targets"], (name, variant)
                assert set(r["custom_call_targets"]) & set(MOSAIC_TARGETS), (name, variant)
            else:
                assert r["error_type"] and r["error"] and len(r["error"]) <= probe.MSG_CHARS, (name, variant)
        audit = entry["primitive_audit"]
        assert audit["pallas_calls"] >= 1 and "masked_load" in audit["primitives"], name


def test_params_patch_is_restored(probe_run):
    probe, _, _ = probe_run
    from pallas_kernels import gpu_common, ltis_gpu, stis_gpu

    assert ltis_gpu._compiler_params is gpu_common.compiler_params
    with probe._params_patched("mosaic_params"):
        assert gpu_common.compiler_params(4) is not None and type(gpu_common.compiler_params(4)).__module__.find(
            "mosaic_gpu") >= 0
    assert ltis_gpu._compiler_params is gpu_common.compiler_params
    cfg = stis_gpu._Config(causal=True, window=8, sink=True, block_q=None, block_k=None, num_warps=4,
                           num_stages=2, unroll=False, scale=0.25, interpret=False)
    assert "triton" in type(cfg.params()).__module__


def test_native_kernel_lowers_for_cuda_and_matches_reference(probe_run):
    probe, data, _ = probe_run
    native = data["native"]
    assert native["cuda_export"]["ok"], native["cuda_export"]
    assert set(native["cuda_export"]["custom_call_targets"]) & set(MOSAIC_TARGETS)
    assert native["plan_check"] and all(v["exact"] for v in native["plan_check"].values())
    check = native["interpret_check"]
    if not check.get("ok") and check.get("error_type") in ("ImportError", "ModuleNotFoundError"):
        pytest.skip(f"no Mosaic GPU interpreter in this jax: {check['error']}")
    assert check["ok"] and check["finite"] and check["rel_err"] < 2e-2, check
    assert data["timings"]["skipped"]


def test_plan_check_catches_a_broken_plan(probe_run, monkeypatch):
    probe, _, _ = probe_run
    assert probe.plan_covers_offsets(512)
    plan = probe.tile_plan(512)
    monkeypatch.setattr(probe, "tile_plan", lambda n, window=8, bq=64: plan[:-1])  # drop the last power
    assert not probe.plan_covers_offsets(512)
