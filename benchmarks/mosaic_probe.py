"""Probe: can the Pallas GPU kernels move from the (deprecated) Triton lowering to Mosaic GPU?

Evidence for the backend choice, in three parts; every part catches and records its own failures, and the
JSON (``--out``) is rewritten after each part so that a crash late in a GPU run keeps what came before.

1. ``lowering``: the repository's GPU kernels (stis_gpu.stis_attention_gpu, ltis_gpu.select_blocks_gpu,
   ltis_gpu.ltis_attention_gpu, fused_gpu.fused_attention_gpu; forward only) with their unchanged Triton-style
   bodies, lowered with ``jax.export(..., platforms=["cuda"])`` in three variants:
     * ``triton``       the code as it is (baseline; must give the Triton custom call),
     * ``mosaic_params`` every pallas_call gets ``jax.experimental.pallas.mosaic_gpu.CompilerParams()``,
     * ``no_params``    every pallas_call gets ``compiler_params=None`` (the default backend, which is
                        Mosaic GPU while ``jax_pallas_use_mosaic_gpu`` is on, as in jax 0.10.x / 0.11.x).
   The params are swapped by monkeypatching ``gpu_common.compiler_params``, ``ltis_gpu._compiler_params``
   (bound at import) and ``stis_gpu._Config.params``. Recorded per kernel and variant: OK (and which custom
   call targets the module holds) or the exception type with the first ~300 characters of its message, plus
   any warnings. On a GPU the variants that lowered are also jitted and run once on random inputs.
2. ``native``: a Mosaic-GPU-native STIS forward (``stis_causal_mgpu``) written with ``plgpu.kernel``: TMA
   copies into swizzled shared memory, WGMMA tensor-core dots, online softmax in registers.
   Subset covered: causal, window 8, all rows valid (no padding), no sink (causal has none), N a multiple
   of 64, d * itemsize in {32, 64, 128} bytes (d = 16/32/64 for bf16), f16/bf16, any H/Hk. See
   ``stis_causal_mgpu`` for the algorithm. Checked on every machine:
     * ``cuda_export``: lowers for platform cuda (the Mosaic GPU module is built at export time, so shape,
       layout and swizzle errors of the kernel surface here; PTX compilation only happens on a GPU);
     * ``plan_check``: the static key-tile plan covers exactly the STIS offset set (pure Python);
     * ``interpret_check`` (CPU only, when the Mosaic GPU interpreter is present): the same kernel body run by
       the Mosaic GPU interpreter, with the two WGMMA dots replaced by ``lax.dot_general`` (the interpreter
       has no transposed-B or register-A WGMMA), against ``stis_attention_reference``.
3. On a GPU (``jax.default_backend() == "gpu"``): ``gpu_check`` (native kernel vs the reference on fresh
   random inputs, and the Triton kernel's error on the same inputs as a yardstick), then ``timings``: forward
   of the native kernel, ``stis_gpu.stis_attention_gpu`` (Triton) and the XLA reference at 65,536 tokens
   (B = 65536 // N) for N in 1024, 4096, 32768, bf16, H = 8, Hk = 2, d = 16 (jit, --warmup 3, --iters 20,
   ``block_until_ready``, median ms). On CPU the timing part is skipped with a message.

Usage (GPU):  python benchmarks/mosaic_probe.py --out mosaic_probe.json
CPU:          python benchmarks/mosaic_probe.py --out /tmp/probe.json   (lowering + export + interpreter)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import inspect
import json
import math
import os
import platform
import sys
import time
import traceback
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # kernels_ltis (timing), also when loaded by path

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402

try:  # the Mosaic GPU Pallas API; its absence is recorded, not fatal
    from jax.experimental.pallas import mosaic_gpu as plgpu_mosaic
    _MGPU_IMPORT_ERROR = None
except Exception as e:  # pragma: no cover - depends on the jax build
    plgpu_mosaic = None
    _MGPU_IMPORT_ERROR = f"{type(e).__name__}: {e}"

import kernels_ltis  # noqa: E402  (the benchmarks' timing loop)
from pallas_kernels import fused_gpu, gpu_common, ltis_gpu, stis_gpu  # noqa: E402
from pallas_kernels.stis_reference import stis_attention_reference, stis_reference_offsets  # noqa: E402

KERNELS = ("stis_attention_gpu", "select_blocks_gpu", "ltis_attention_gpu", "fused_attention_gpu")
VARIANTS = ("triton", "mosaic_params", "no_params")
# Small lowering shapes.
LB, LN, LH, LHK, LD, LNSEL, LBLOCK = 2, 256, 8, 2, 16, 4, 16
# Timing shapes.
TOKENS = 65536
LENGTHS = (1024, 4096, 32768)
H, HK, D = 8, 2, 16
MSG_CHARS = 300

TRITON_TARGET = gpu_common.TRITON_CUSTOM_CALL_TARGET
MOSAIC_TARGETS = ("mosaic_gpu_v2", "mosaic_gpu")


# ---------------------------------------------------------------------------------------------------
# Small helpers.

def _err(e: BaseException) -> dict:
    msg = str(e)
    key = next((ln.strip() for ln in msg.splitlines()
                if any(w in ln for w in ("Unimplemented", "not implemented", "NotImplemented", "not supported",
                                         "Unsupported", "unsupported"))), None)
    out = {"ok": False, "error_type": type(e).__name__, "error": msg[:MSG_CHARS]}
    if key and key not in out["error"]:
        out["error_key_line"] = key[:MSG_CHARS]
    return out


def _tb_tail(n=6) -> str:
    return "".join(traceback.format_exc().splitlines(keepends=True)[-n:])[-1500:]


def _disabled_checks():
    dsc = jax.export.DisabledSafetyCheck
    return [dsc.custom_call(t) for t in (TRITON_TARGET,) + MOSAIC_TARGETS]


def _targets(text: str) -> list[str]:
    found = []
    for t in (TRITON_TARGET,) + MOSAIC_TARGETS:
        # "mosaic_gpu" is a prefix of "mosaic_gpu_v2": count the exact call-target spellings.
        if f"@{t}(" in text or f'"{t}"' in text or f"@{t} " in text:
            found.append(t)
    if "mosaic_gpu_v2" in found and "mosaic_gpu" in found and "@mosaic_gpu(" not in text:
        found.remove("mosaic_gpu")
    return found


def _export_cuda(fn, args) -> dict:
    """jax.export for cuda; OK with the custom call targets and module size, or the error."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            exported = jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=_disabled_checks())(*args)
            text = exported.mlir_module()
            res = {"ok": True, "custom_call_targets": _targets(text), "module_chars": len(text)}
        except Exception as e:  # noqa: BLE001
            res = _err(e)
    msgs = sorted({str(w.message)[:200] for w in caught})
    if msgs:
        res["warnings"] = msgs
    return res


def _mosaic_params():
    if plgpu_mosaic is None:
        raise RuntimeError(f"jax.experimental.pallas.mosaic_gpu unavailable: {_MGPU_IMPORT_ERROR}")
    cls = getattr(plgpu_mosaic, "CompilerParams", None) or getattr(plgpu_mosaic, "GPUCompilerParams")
    return cls()


@contextlib.contextmanager
def _params_patched(variant: str):
    """Make every pallas_call of the GPU kernels get the variant's compiler params."""
    if variant == "triton":
        yield
        return
    value = _mosaic_params() if variant == "mosaic_params" else None
    saved = (gpu_common.compiler_params, ltis_gpu._compiler_params, stis_gpu._Config.params)
    gpu_common.compiler_params = lambda *a, **k: value
    ltis_gpu._compiler_params = lambda *a, **k: value
    stis_gpu._Config.params = lambda self: value
    try:
        yield
    finally:
        gpu_common.compiler_params, ltis_gpu._compiler_params, stis_gpu._Config.params = saved


def _median_ms(fn, args, warmup, iters):
    med, low = kernels_ltis.timeit(fn, args, warmup, iters)
    return round(med, 4), round(low, 4)


# ---------------------------------------------------------------------------------------------------
# Part 1: the existing kernels through Mosaic GPU.

def _kernel_cases(dtype=jnp.bfloat16):
    sds = jax.ShapeDtypeStruct
    nc = LN // LBLOCK
    attn = (sds((LB, LN, LH, LD), dtype), sds((LB, LN, LHK, LD), dtype), sds((LB, LN, LHK, LD), dtype),
            sds((LB, LN), jnp.bool_), sds((LB, LN, LHK, LNSEL), jnp.int32), sds((LB, LN, LHK, LNSEL), jnp.bool_))

    def stis(q, k, v, valid):
        return stis_gpu.stis_attention_gpu(q, k, v, valid, causal=True)

    def select(qm, ck, bv):
        return ltis_gpu.select_blocks_gpu(qm, ck, bv, causal=True, num_selected=LNSEL, block_size=LBLOCK,
                                          scale=1.0 / math.sqrt(LD))

    def ltis(q, k, v, valid, sel, kept):
        return ltis_gpu.ltis_attention_gpu(q, k, v, valid, sel, kept, causal=True, block_size=LBLOCK)

    def fused(q, k, v, valid, sel, kept):
        return fused_gpu.fused_attention_gpu(q, k, v, valid, sel, kept, causal=True, block_size=LBLOCK)

    return {
        "stis_attention_gpu": (stis, attn[:4]),
        "select_blocks_gpu": (select, (sds((LB, LN, LHK, LD), jnp.float32), sds((LB, LHK, nc, LD), dtype),
                                       sds((LB, nc), jnp.bool_))),
        "ltis_attention_gpu": (ltis, attn),
        "fused_attention_gpu": (fused, attn),
    }


def _fresh(fn):
    def wrapper(*args):
        return fn(*args)
    return wrapper


def _concrete(structs, seed=0):
    """Random inputs for the lowering shapes: normal floats, all-valid masks, in-range causal selections."""
    rng = np.random.default_rng(seed)
    out = []
    for s in structs:
        if s.dtype == jnp.bool_:
            out.append(jnp.ones(s.shape, bool))
        elif s.dtype == jnp.int32:  # selected blocks: index 0 (always before the own block for i >= 16)
            out.append(jnp.zeros(s.shape, jnp.int32))
        else:
            out.append(jnp.asarray(rng.standard_normal(s.shape), s.dtype))
    return out


def _sub_jaxprs(params):
    from jax.extend import core as _jex_core  # jax.core.ClosedJaxpr is gone in 0.10
    for v in params.values():
        for x in (v if isinstance(v, (tuple, list)) else (v,)):
            if isinstance(x, _jex_core.ClosedJaxpr):
                yield x.jaxpr
            elif isinstance(x, _jex_core.Jaxpr):
                yield x


def _primitive_audit(fn, structs) -> dict:
    """Static complement to the first-error export: every primitive inside the kernels' pallas_call bodies
    (recursively) that has no Mosaic GPU lowering rule (Lane semantics) in this jax. Only missing rules are
    found; a present rule may still reject the Triton-style operands (e.g. gathers through index arrays)."""
    from jax._src.pallas.mosaic_gpu import core as mgpu_core  # private, version-dependent
    from jax._src.pallas.mosaic_gpu import lowering as mgpu_lowering
    from jax.experimental.mosaic import gpu as mgpu

    rules = mgpu_lowering.mosaic_lowering_rules[(mgpu.LoweringSemantics.Lane, mgpu_core.PrimitiveSemantics.Warpgroup)]
    used, calls = {}, 0

    def walk(jaxpr, inside):
        nonlocal calls
        for eqn in jaxpr.eqns:
            is_call = eqn.primitive.name == "pallas_call"
            calls += is_call
            if inside:
                used[eqn.primitive.name] = eqn.primitive in rules
            for sub in _sub_jaxprs(eqn.params):
                walk(sub, inside or is_call)

    walk(jax.make_jaxpr(fn)(*structs).jaxpr, False)
    return {"pallas_calls": calls, "primitives": sorted(used),
            "without_mosaic_gpu_rule": sorted(k for k, ok in used.items() if not ok)}


def lowering_part(on_gpu: bool) -> dict:
    res = {"shapes": dict(B=LB, N=LN, H=LH, Hk=LHK, d=LD, num_selected=LNSEL, block_size=LBLOCK, dtype="bfloat16"),
           "jax_pallas_use_mosaic_gpu": getattr(jax.config, "jax_pallas_use_mosaic_gpu", None),
           "kernels": {}}
    cases = _kernel_cases()
    for name in KERNELS:
        entry = res["kernels"][name] = {}
        fn, structs = cases[name]
        for variant in VARIANTS:
            try:
                # jit/trace caches are keyed on the function object: a fresh wrapper (and cleared caches)
                # per variant, or the second variant silently reuses the first one's lowering.
                jax.clear_caches()
                with _params_patched(variant):
                    r = _export_cuda(_fresh(fn), structs)
            except Exception as e:  # noqa: BLE001  (e.g. mosaic_gpu import failure)
                r = _err(e)
            entry[variant] = r
            print(f"[lowering] {name:22s} {variant:14s} "
                  + ("OK " + ",".join(r["custom_call_targets"]) if r["ok"]
                     else f"FAIL {r['error_type']}: {r['error'][:150]!r}"), flush=True)
    for name in KERNELS:
        fn, structs = cases[name]
        try:
            res["kernels"][name]["primitive_audit"] = _primitive_audit(fn, structs)
        except Exception as e:  # noqa: BLE001
            res["kernels"][name]["primitive_audit"] = _err(e)
    if on_gpu:  # run what lowered; Mosaic variants last (a faulting kernel may poison the CUDA context)
        for variant in VARIANTS:
            for name in KERNELS:
                r = res["kernels"][name][variant]
                if not r["ok"]:
                    continue
                fn, structs = cases[name]
                try:
                    jax.clear_caches()
                    with _params_patched(variant):
                        out = jax.jit(_fresh(fn))(*_concrete(structs))
                        jax.block_until_ready(out)
                    leaves = jax.tree.leaves(out)
                    r["gpu_run"] = {"ok": True, "finite": bool(all(jnp.all(jnp.isfinite(x.astype(jnp.float32)))
                                                                   for x in leaves if x.dtype != jnp.bool_))}
                except Exception as e:  # noqa: BLE001
                    r["gpu_run"] = _err(e)
                print(f"[lowering] gpu run {name:22s} {variant:14s} "
                      + ("OK" if r["gpu_run"]["ok"] else f"FAIL {r['gpu_run']['error_type']}"), flush=True)
    return res


# ---------------------------------------------------------------------------------------------------
# Part 2: a Mosaic-GPU-native STIS forward (causal, all rows valid).

BQ = 64          # queries per program = WGMMA M (one warpgroup)
WINDOW = 8


def tile_plan(n: int, window: int = WINDOW, bq: int = BQ) -> tuple:
    """Static key tiles of the query tile ``t``: ``(k, has_window, powers)`` for key tile ``t - k``.

    For query ``i0 + r`` and key ``(t - k) * bq + c`` the offset is ``o = r - c + k * bq`` in
    ``[k*bq - (bq-1), k*bq + (bq-1)]``; a tile is kept iff that range meets the STIS offsets
    (``0..window-1`` and the powers of two ``>= window`` below ``n``). That is ``k = 0, 1`` (the window and
    the powers below ``2 * bq``) and ``k = 2, 4, 8, ...`` (one power each, on the tile's diagonal).
    """
    nt = n // bq
    window_offs = range(min(window, n))
    powers = []
    p = 1
    while p < n:
        if p >= window:
            powers.append(p)
        p *= 2
    plan = []
    for k in range(nt):
        lo, hi = k * bq - (bq - 1), k * bq + (bq - 1)
        has_w = any(lo <= o <= hi for o in window_offs)
        ps = tuple(o for o in powers if lo <= o <= hi)
        if has_w or ps:
            plan.append((k, has_w, ps))
    return tuple(plan)


def plan_covers_offsets(n: int, window: int = WINDOW, bq: int = BQ) -> bool:
    """The (query, key) pairs the plan's tile masks admit, over every query tile, are exactly the causal STIS
    pairs ``{(i, j): 0 <= j, i - j in stis_reference_offsets(n)}`` (numpy, no kernel)."""
    offs = np.asarray(stis_reference_offsets(n, window, True))
    r = np.arange(bq)[:, None]
    c = np.arange(bq)[None, :]
    for t in range(n // bq):
        want = np.zeros((bq, n), bool)                    # want[r, j]: query t*bq + r attends key j
        i = t * bq + np.arange(bq)
        for o in offs:
            j = i - o
            want[np.arange(bq)[j >= 0], j[j >= 0]] = True
        got = np.zeros((bq, n), int)
        for k, has_w, ps in tile_plan(n, window, bq):
            o = r - c + k * bq
            m = (has_w & (o >= 0) & (o < window)) | np.isin(o, ps)
            j = (t - k) * bq + c + 0 * r
            m &= j >= 0
            np.add.at(got, (np.broadcast_to(r, m.shape)[m], j[m]), 1)
        if got.max(initial=0) > 1 or not np.array_equal(got.astype(bool), want):
            return False
    return True


def _kernel_entry(body, out_type, **kw):
    """``plgpu.kernel`` with ``out_type`` (jax >= 0.10) or ``out_shape`` (older)."""
    params = inspect.signature(plgpu_mosaic.kernel).parameters
    key = "out_type" if "out_type" in params else "out_shape"
    return plgpu_mosaic.kernel(body, **{key: out_type}, **kw)


def stis_causal_mgpu(q, k, v, *, interpret=None):
    """Causal STIS attention forward (window 8, every row valid) as a Mosaic GPU kernel.

    q [B, N, H, d], k/v [B, N, Hk, d] (f16/bf16), N % 64 == 0 -> o [B, N, H, d]. One program (one
    warpgroup) per (query tile of 64, kv head, batch) walks the key tiles of ``tile_plan(N)`` -- tile t (the
    window and offsets 8/16/32), t-1 (offsets up to 64), and t-2, t-4, ... (one power each) -- all copied to
    swizzled SMEM by TMA up front (one barrier each; 10 tiles of K and V at N = 32768). For each of the
    G = H/Hk query heads of the kv head: S = q k^T by WGMMA (64 x 64, K = d), the static offset mask, online
    softmax (exp2, scale folded), and P v by WGMMA (A = P in registers). Tiles before row 0 are clamped to
    tile 0 and masked out. ``interpret``: run under the Mosaic GPU interpreter (CPU), with plain dots.
    """
    b, n, h, d = q.shape
    hk = k.shape[2]
    g = h // hk
    if n % BQ or h % hk:
        raise ValueError(f"need N % {BQ} == 0 and Hk | H, got {q.shape} {k.shape}")
    dtype = q.dtype
    itemsize = jnp.dtype(dtype).itemsize
    swizzle = d * itemsize
    if swizzle not in (32, 64, 128) or jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"need f16/bf16 with d * itemsize in (32, 64, 128), got d={d} {dtype}")
    nt = n // BQ
    plan = tile_plan(n)
    nk = len(plan)
    transforms = (plgpu_mosaic.TilingTransform((8, swizzle // itemsize)), plgpu_mosaic.SwizzleTransform(swizzle))
    scale_log2 = (1.0 / math.sqrt(d)) * math.log2(math.e)
    neg = -1e30
    acc_t = getattr(plgpu_mosaic, "ACC", None) or plgpu_mosaic.WGMMAAccumulatorRef

    def body(q_ref, k_ref, v_ref, o_ref, q_smem, k_smem, v_smem, o_smem, q_bar, k_bar, v_bar):
        t = lax.axis_index("t")
        kvh = lax.axis_index("kvh")
        bi = lax.axis_index("b")
        i0 = t * BQ
        for gi in range(g):
            plgpu_mosaic.copy_gmem_to_smem(q_ref.at[bi, pl.ds(i0, BQ), kvh * g + gi], q_smem.at[gi], q_bar.at[gi])
        for s, (kk, _, _) in enumerate(plan):
            start = jnp.maximum(t - kk, 0) * BQ
            plgpu_mosaic.copy_gmem_to_smem(k_ref.at[bi, pl.ds(start, BQ), kvh], k_smem.at[s], k_bar.at[s])
            plgpu_mosaic.copy_gmem_to_smem(v_ref.at[bi, pl.ds(start, BQ), kvh], v_smem.at[s], v_bar.at[s])

        if interpret is None:
            r = plgpu_mosaic.broadcasted_iota(jnp.int32, (BQ, BQ), 0, layout=plgpu_mosaic.Layout.WGMMA)
            c = plgpu_mosaic.broadcasted_iota(jnp.int32, (BQ, BQ), 1, layout=plgpu_mosaic.Layout.WGMMA)

            def mm_qk(q_s, k_s):
                def f(acc_ref):
                    plgpu_mosaic.wgmma(acc_ref, q_s, plgpu_mosaic.transpose_ref(k_s, (1, 0)))
                    return acc_ref[...]
                return pl.run_scoped(f, acc_t((BQ, BQ), jnp.float32))

            def mm_pv(p16, v_s):
                def f(acc_ref):
                    plgpu_mosaic.wgmma(acc_ref, p16, v_s)
                    return acc_ref[...]
                return pl.run_scoped(f, acc_t((BQ, d), jnp.float32))
        else:  # the interpreter has no layout casts and no transposed-B / register-A WGMMA
            r = lax.broadcasted_iota(jnp.int32, (BQ, BQ), 0)
            c = lax.broadcasted_iota(jnp.int32, (BQ, BQ), 1)

            def mm_qk(q_s, k_s):
                return lax.dot_general(q_s[...], k_s[...], (((1,), (1,)), ((), ())),
                                       preferred_element_type=jnp.float32)

            def mm_pv(p16, v_s):
                return lax.dot_general(p16, v_s[...], (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        diff = r - c

        def tile_mask(kk, has_w, ps):
            o = diff + kk * BQ                            # i - j for query i0 + r, key (t - kk) * BQ + c
            m = None
            if has_w:
                m = (o >= 0) & (o < WINDOW)
            for p in ps:
                m = (o == p) if m is None else (m | (o == p))
            if kk > 0:                                    # key tile before row 0: clamped copy, masked out
                m = m & ((c + (t - kk) * BQ) >= 0)
            return m

        for gi in range(g):
            plgpu_mosaic.barrier_wait(q_bar.at[gi])
        state = [None] * g
        for s, (kk, has_w, ps) in enumerate(plan):
            plgpu_mosaic.barrier_wait(k_bar.at[s])
            plgpu_mosaic.barrier_wait(v_bar.at[s])
            mask = tile_mask(kk, has_w, ps)
            for gi in range(g):
                qk = jnp.where(mask, mm_qk(q_smem.at[gi], k_smem.at[s]) * scale_log2, neg)
                if state[gi] is None:                     # tile t first: every row has its diagonal key
                    m_new = qk.max(axis=1)
                else:
                    m_i, l_i, acc = state[gi]
                    m_new = jnp.maximum(m_i, qk.max(axis=1))
                p = jnp.exp2(qk - lax.broadcast_in_dim(m_new, qk.shape, [0]))
                pv = mm_pv(p.astype(dtype), v_smem.at[s])
                if state[gi] is None:
                    l_new, acc = p.sum(axis=1), pv
                else:
                    alpha = jnp.exp2(m_i - m_new)
                    l_new = l_i * alpha + p.sum(axis=1)
                    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + pv
                state[gi] = (m_new, l_new, acc)
        for gi in range(g):
            _, l_i, acc = state[gi]
            o_smem.at[gi][...] = (acc / lax.broadcast_in_dim(l_i, acc.shape, [0])).astype(dtype)
        plgpu_mosaic.commit_smem()
        for gi in range(g):
            plgpu_mosaic.copy_smem_to_gmem(o_smem.at[gi], o_ref.at[bi, pl.ds(i0, BQ), kvh * g + gi])
        plgpu_mosaic.wait_smem_to_gmem(0)

    def entry(q_ref, k_ref, v_ref, o_ref):
        pl.run_scoped(
            functools.partial(body, q_ref, k_ref, v_ref, o_ref),
            plgpu_mosaic.SMEM((g, BQ, d), dtype, transforms=transforms),
            plgpu_mosaic.SMEM((nk, BQ, d), dtype, transforms=transforms),
            plgpu_mosaic.SMEM((nk, BQ, d), dtype, transforms=transforms),
            plgpu_mosaic.SMEM((g, BQ, d), dtype, transforms=transforms),
            plgpu_mosaic.Barrier(num_barriers=g),
            plgpu_mosaic.Barrier(num_barriers=nk),
            plgpu_mosaic.Barrier(num_barriers=nk),
        )

    kw = dict(grid=(nt, hk, b), grid_names=("t", "kvh", "b"), compiler_params=_mosaic_params())
    if interpret is not None:
        kw["interpret"] = interpret
    return _kernel_entry(entry, jax.ShapeDtypeStruct(q.shape, dtype), **kw)(q, k, v)


NATIVE_SUBSET = ("causal, window 8, all rows valid (valid == True everywhere; no padding), N % 64 == 0, "
                 "f16/bf16 with d * itemsize in {32, 64, 128} bytes, any H/Hk; forward only, no lse output")


def _interpret_params():
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # private, version-dependent
    return InterpretGPUParams()


def _rand_qkv(key, b, n, h, hk, d, dtype):
    kq, kk, kv = jax.random.split(key, 3)
    return (jax.random.normal(kq, (b, n, h, d), jnp.float32).astype(dtype),
            jax.random.normal(kk, (b, n, hk, d), jnp.float32).astype(dtype),
            jax.random.normal(kv, (b, n, hk, d), jnp.float32).astype(dtype))


def _rel_err(out, ref):
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    return float(np.max(np.abs(out - ref)) / max(1.0, float(np.max(np.abs(ref))))), bool(np.all(np.isfinite(out)))


def native_part(on_gpu: bool, interpret_check: bool) -> dict:
    res = {"subset": NATIVE_SUBSET, "block_q": BQ}
    if plgpu_mosaic is None:
        res["error"] = f"mosaic_gpu import failed: {_MGPU_IMPORT_ERROR}"
        return res
    try:
        res["plan_check"] = {str(n): {"tiles": [k for k, _, _ in tile_plan(n)], "exact": plan_covers_offsets(n)}
                             for n in (64, 128, 256, 1024, 4096)}
    except Exception as e:  # noqa: BLE001
        res["plan_check"] = _err(e)
    sds = jax.ShapeDtypeStruct
    structs = (sds((LB, LN, LH, LD), jnp.bfloat16), sds((LB, LN, LHK, LD), jnp.bfloat16),
               sds((LB, LN, LHK, LD), jnp.bfloat16))
    res["cuda_export"] = dict(_export_cuda(stis_causal_mgpu, structs),
                              shapes=dict(B=LB, N=LN, H=LH, Hk=LHK, d=LD, dtype="bfloat16"))
    print(f"[native] cuda export: {res['cuda_export'].get('custom_call_targets') or res['cuda_export']}", flush=True)
    if interpret_check and not on_gpu:
        try:
            b, n = 1, 256
            q, k, v = _rand_qkv(jax.random.key(1), b, n, LH, LHK, LD, jnp.bfloat16)
            t0 = time.perf_counter()
            out = stis_causal_mgpu(q, k, v, interpret=_interpret_params())
            ref = stis_attention_reference(q, k, v, jnp.ones((b, n), bool), causal=True)
            err, finite = _rel_err(out, ref)
            res["interpret_check"] = {"ok": finite and err < 2e-2, "rel_err": err, "finite": finite,
                                      "shape": dict(B=b, N=n, H=LH, Hk=LHK, d=LD, dtype="bfloat16"),
                                      "seconds": round(time.perf_counter() - t0, 2),
                                      "note": "Mosaic GPU interpreter; WGMMA dots replaced by lax.dot_general"}
        except Exception as e:  # noqa: BLE001
            res["interpret_check"] = dict(_err(e), traceback=_tb_tail())
        print(f"[native] interpreter check: {res['interpret_check']}", flush=True)
    return res


# ---------------------------------------------------------------------------------------------------
# Part 3: GPU check and timings.

def _triton_fwd(q, k, v, valid):
    return stis_gpu.stis_attention_gpu(q, k, v, valid, causal=True)


def _reference_fwd(q, k, v, valid):
    return stis_attention_reference(q, k, v, valid, causal=True)


def gpu_check_part() -> dict:
    out = {}
    native = jax.jit(stis_causal_mgpu)
    for b, n in ((2, 256), (1, 4096)):
        name = f"B{b}_N{n}"
        try:
            q, k, v = _rand_qkv(jax.random.key(100 + n), b, n, H, HK, D, jnp.bfloat16)
            valid = jnp.ones((b, n), bool)
            ref = jax.jit(_reference_fwd)(q, k, v, valid)
            err, finite = _rel_err(native(q, k, v), ref)
            entry = {"ok": finite and err < 2e-2, "rel_err_native": err, "finite": finite}
            try:
                entry["rel_err_triton"] = _rel_err(jax.jit(_triton_fwd)(q, k, v, valid), ref)[0]
            except Exception as e:  # noqa: BLE001
                entry["triton"] = _err(e)
            out[name] = entry
        except Exception as e:  # noqa: BLE001
            out[name] = dict(_err(e), traceback=_tb_tail())
        print(f"[gpu check] {name}: {out[name]}", flush=True)
    return out


def timing_part(warmup: int, iters: int, lengths, with_reference: bool) -> dict:
    fns = {"native_mosaic": lambda q, k, v, valid: stis_causal_mgpu(q, k, v),
           "triton": _triton_fwd}
    if with_reference:
        fns["xla_reference"] = _reference_fwd
    res = {"tokens": TOKENS, "H": H, "Hk": HK, "d": D, "dtype": "bfloat16", "causal": True,
           "warmup": warmup, "iters": iters, "unit": "ms (median, min)", "rows": []}
    for n in lengths:
        b = max(1, TOKENS // n)
        q, k, v = _rand_qkv(jax.random.key(n), b, n, H, HK, D, jnp.bfloat16)
        valid = jnp.ones((b, n), bool)
        row = {"N": n, "B": b}
        for name, fn in fns.items():
            try:
                med, mn = _median_ms(jax.jit(fn), (q, k, v, valid), warmup, iters)
                row[name] = {"median_ms": med, "min_ms": mn}
            except Exception as e:  # noqa: BLE001
                row[name] = _err(e)
            print(f"[timing] N={n:6d} B={b:3d} {name:14s} {row[name]}", flush=True)
        if all("median_ms" in row.get(x, {}) for x in ("native_mosaic", "triton")):
            row["triton_over_native"] = round(row["triton"]["median_ms"] / row["native_mosaic"]["median_ms"], 3)
        res["rows"].append(row)
    return res


def _table(timings: dict) -> str:
    names = [x for x in ("native_mosaic", "triton", "xla_reference") if any(x in r for r in timings["rows"])]
    lines = [f"{'N':>6} {'B':>4} " + " ".join(f"{x + ' ms':>18}" for x in names) + f" {'triton/native':>14}"]
    for r in timings["rows"]:
        cells = []
        for x in names:
            c = r.get(x, {})
            cells.append(f"{c['median_ms']:>18.4f}" if "median_ms" in c else f"{'FAIL ' + c.get('error_type', '?'):>18}")
        lines.append(f"{r['N']:>6} {r['B']:>4} " + " ".join(cells) + f" {r.get('triton_over_native', float('nan')):>14}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------

def _write(path, result):
    if path:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=2, default=str)
        os.replace(tmp, path)


def _cuda_runtime():
    """CUDA runtime version (e.g. 12080), or None. jax's own attention_mgpu refuses causal masking for
    12.8.0 <= version < 12.9.1 (a ptxas miscompilation); the native kernel masks the same way."""
    try:
        from jax._src.lib import cuda_versions
        return None if cuda_versions is None else int(cuda_versions.cuda_runtime_get_version())
    except Exception:  # noqa: BLE001
        return None


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.environ["OUT"], "mosaic_probe.json") if os.environ.get("OUT")
                    else None, help="JSON output path (default $OUT/mosaic_probe.json when $OUT is set)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--lengths", default=",".join(map(str, LENGTHS)), help="comma-separated N for the timings")
    ap.add_argument("--no-reference-timing", action="store_true", help="do not time the XLA reference")
    ap.add_argument("--no-interpret", action="store_true", help="skip the CPU interpreter check of the native kernel")
    ap.add_argument("--skip-lowering", action="store_true")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    on_gpu = jax.default_backend() == "gpu"
    dev = jax.devices()[0]
    result = {
        "probe": "mosaic_probe",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "jax": jax.__version__, "jaxlib": __import__("jaxlib").__version__,
        "python": platform.python_version(), "backend": jax.default_backend(),
        "device": str(dev), "device_kind": getattr(dev, "device_kind", str(dev)),
        "mosaic_gpu_import": _MGPU_IMPORT_ERROR or "ok",
        "cuda_runtime": _cuda_runtime(),
        "parts_failed": [],
    }
    print(f"jax {result['jax']} backend {result['backend']} device {result['device_kind']}", flush=True)

    def part(name, fn, *a):
        t0 = time.perf_counter()
        try:
            result[name] = fn(*a)
        except Exception as e:  # noqa: BLE001
            result[name] = dict(_err(e), traceback=_tb_tail())
            result["parts_failed"].append(name)
        if isinstance(result[name], dict):
            result[name]["part_seconds"] = round(time.perf_counter() - t0, 2)
        _write(args.out, result)

    if not args.skip_lowering:
        part("lowering", lowering_part, on_gpu)
    part("native", native_part, on_gpu, not args.no_interpret)
    if on_gpu:
        part("gpu_check", gpu_check_part)
        lengths = tuple(int(x) for x in args.lengths.split(",") if x)
        part("timings", timing_part, args.warmup, args.iters, lengths, not args.no_reference_timing)
        if "rows" in result.get("timings", {}):
            print(_table(result["timings"]), flush=True)
    else:
        result["timings"] = {"skipped": f"backend is {jax.default_backend()!r}, not 'gpu': no timing"}
        print(f"[timing] skipped: {result['timings']['skipped']}", flush=True)
    _write(args.out, result)
    if args.out:
        print(f"wrote {args.out}", flush=True)
    return result


if __name__ == "__main__":
    main()
