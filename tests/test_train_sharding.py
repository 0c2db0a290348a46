"""Data-parallel training over several devices gives the single-device losses (train/steps.py).

Runs in subprocesses because the host device count is fixed when jax initialises
(``XLA_FLAGS=--xla_force_host_platform_device_count=4``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT, host_devices_xla_flags

REPO = str(REPO_ROOT)

SCRIPT = r"""
import json, os, sys
from train.config import TrainConfig
from train.loop import fit

out = sys.argv[1]
# 30 examples a step: 30 rows on 1 device, 32 rows (2 of weight 0) on 4. Dropout masks agree because
# threefry-partitionable random bits depend on the element index, not on the array's sharding or size.
cfg = TrainConfig(hidden_size=32, inner_size=64, num_layers=1, num_heads=2, num_kv_heads=1, max_len=20,
                  attention_impl="xla", learning_rate=0.005, synthetic_users=150, synthetic_items=100,
                  batch_size=30, dropout=0.1, max_steps=5, log_every=1, eval_batch_size=64,
                  popularity_baseline=False, tensorboard=False, progress=False)
r = fit(cfg, out)
lines = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
print("RESULT " + json.dumps({"losses": [x["loss"] for x in lines if x["type"] == "train"],
                              "test": r["test"], "devices": len(r["devices"])}))
"""


def _run(tmp_path, devices: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
               XLA_FLAGS=host_devices_xla_flags(devices))
    out = tmp_path / f"d{devices}"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(out)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.mark.slow
def test_four_devices_match_one(tmp_path):
    one, four = _run(tmp_path, 1), _run(tmp_path, 4)
    assert one["devices"] == 1 and four["devices"] == 4
    assert len(one["losses"]) == 5
    np.testing.assert_allclose(four["losses"], one["losses"], rtol=1e-4)
    for key, value in one["test"].items():  # sharded evaluation (150 users padded to 152 rows) agrees too
        assert four["test"][key] == pytest.approx(value, abs=2e-3), key
