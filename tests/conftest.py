"""Shared fixtures: random BlossomRec attention inputs and paths to the shared data."""

from __future__ import annotations

import functools
import os
import pathlib
import subprocess
import sys

# pytest-xdist workers each load libtpu (TPU AOT tests); without this, the second one fails on libtpu's
# single-process lockfile. Must be set before libtpu initialises.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# The suite is dominated by XLA compiling many small programs on the CPU, not by running them: without the
# backend's optimisation passes it takes ~30 % less time (measured on 28 of the slowest tests: 266 -> 187 s on two
# cores, the same results). What is checked is unaffected: outputs against oracles, lowering, AOT compilation.
# Through the environment so that the tests' subprocesses (CLI, reproduce, sharding) inherit it.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# XLA:CPU's previous (non-MLIR) fusion emitters compile these programs in less than half the CPU time (a model
# gradient test and the rows test on jax 0.10.2: 67 -> 28 CPU seconds, the same results).
CPU_COMPILE_FLAGS = "--xla_cpu_use_fusion_emitters=false"


def _known_cpu_compile_flags() -> str:
    """CPU_COMPILE_FLAGS if this jaxlib knows them, else "". XLA aborts the process on an unknown flag (jaxlib
    0.11 has no such flag), so a subprocess tries them first; the answer reaches pytest-xdist's workers and the
    tests' subprocesses through the environment, so the probe runs once per session."""
    known = os.environ.get("BLOSSOM_TESTS_CPU_COMPILE_FLAGS")
    if known is None:
        probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices('cpu')"], capture_output=True,
                               env=dict(os.environ, XLA_FLAGS=CPU_COMPILE_FLAGS, JAX_PLATFORMS="cpu"))
        known = CPU_COMPILE_FLAGS if probe.returncode == 0 else ""
        os.environ["BLOSSOM_TESTS_CPU_COMPILE_FLAGS"] = known
    return known


# Prepended, so that a flag the caller set wins; XLA reads them when the backend starts.
if _known_cpu_compile_flags() and CPU_COMPILE_FLAGS not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{CPU_COMPILE_FLAGS} {os.environ.get('XLA_FLAGS', '')}".strip()

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blossom_jax.ops.common import compress_param_shapes

if os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"].lower() in ("1", "true", "yes", "on"):
    jax.config.update("jax_disable_most_optimizations", True)  # in case a plugin imported jax before this file


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` (half a minute or more on a CI core) run first. With ``--maxschedchunk=1``
    (pyproject) pytest-xdist hands tests out one at a time, so the workers take the long ones first and
    finish together instead of one of them ending the run alone on a long test collected last."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: file order otherwise


REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("BLOSSOM_SHARED", REPO_ROOT.parent / "shared"))


def shared_path(relative: str) -> pathlib.Path:
    """Path under ../shared, or skip the test when that file is absent."""
    path = SHARED / relative
    if not path.exists():
        pytest.skip(f"shared file {path} not present")
    return path


def random_lengths(rng: np.random.Generator, batch: int, seq_len: int) -> np.ndarray:
    """Right-padding lengths: row 0 full, row 1 a single item (when batch > 1), the rest random."""
    lengths = rng.integers(1, seq_len + 1, size=batch)
    lengths[0] = seq_len
    if batch > 1:
        lengths[1] = 1
    return lengths


def random_attention_inputs(config, batch: int, seq_len: int, *, seed: int = 0, dtype=jnp.float32,
                            padded: bool = True, poison_padding: bool = False):
    """(q, k, v, gates, compress_params, valid) with shapes of ``blossom_attention``."""
    rng = np.random.default_rng(seed)
    heads, kv_heads, head_dim = config.num_heads, config.num_kv_heads, config.head_dim

    def normal(*shape, scale=1.0):
        return rng.normal(size=shape).astype(np.float32) * scale

    q = normal(batch, seq_len, heads, head_dim)
    k = normal(batch, seq_len, kv_heads, head_dim)
    v = normal(batch, seq_len, kv_heads, head_dim)
    gates = jax.nn.sigmoid(normal(batch, seq_len, heads, 2))
    params = {name: jnp.asarray(normal(*shape, scale=0.2)) for name, shape in
              compress_param_shapes(config).items()}
    lengths = random_lengths(rng, batch, seq_len) if padded else np.full(batch, seq_len)
    valid = np.arange(seq_len)[None, :] < lengths[:, None]
    if poison_padding:
        for x in (q, k, v):
            x[~valid] = np.nan
    cast = lambda x: jnp.asarray(x, dtype)  # noqa: E731
    return cast(q), cast(k), cast(v), cast(gates), params, jnp.asarray(valid)


def host_devices_xla_flags(devices: int) -> str:
    """XLA_FLAGS for a subprocess with ``devices`` CPU devices, keeping this session's flags."""
    return f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()


def jitted_apply(model, method="__call__", **static_kwargs):
    """``model.apply(variables, *args, method=method, **static_kwargs)`` compiled as one program. Called op by op,
    every jnp op would compile on its own: several times slower on the CPU."""
    return jax.jit(functools.partial(model.apply, method=method, **static_kwargs))


@pytest.fixture
def xla_optimizations(monkeypatch):
    """XLA's optimisation passes back on, in this process and the test's subprocesses, for a test that spends
    more time running its programs than compiling them (two epochs on a real dataset: 133 -> 88 s). The small
    training tests compile more than they run and are slower with the passes on (measured)."""
    monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "0")
    saved = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    yield
    jax.config.update("jax_disable_most_optimizations", saved)


@pytest.fixture(autouse=True)
def verify_triton_modules(monkeypatch):
    """Every Pallas-Triton kernel lowered in a test (CUDA export tests) has its Triton module run through
    the MLIR verifier, as the GPU's compiler would: a module it rejects (e.g. an ``scf.for`` whose bounds
    have different types) fails the test here on the CPU instead of at compile time on the GPU."""
    try:
        from jax._src.pallas.triton import lowering, pallas_call_registration
    except ImportError:  # a jax without the Triton lowering: nothing to check
        yield
        return
    original = lowering.lower_jaxpr_to_triton_module

    def lower_and_verify(*args, **kwargs):
        result = original(*args, **kwargs)
        try:
            result.module.operation.verify()
        except Exception as error:  # noqa: BLE001 - MLIRError; re-raised as a test failure
            raise AssertionError(f"Triton module fails MLIR verification: {str(error)[:2000]}") from error
        return result

    monkeypatch.setattr(pallas_call_registration.lowering, "lower_jaxpr_to_triton_module", lower_and_verify)
    yield
