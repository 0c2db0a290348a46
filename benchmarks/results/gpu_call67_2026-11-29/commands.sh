#!/bin/bash
# call 67 (H200): with the dK/dV launch order of call 66, do the dK/dV tile constants move? Device profile at 1k / 4k /
# 32k of the default against: LTIS dK/dV rows 32 / 128, 3 pipeline stages, 2 warps; the gated kernels from N = 1
# (their dK/dV kernel is now balanced too); gated dK/dV 2 stages; a second default (no-op override) last
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
L=$OUT/logs; mkdir -p $L
T0=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python -c "import jax, jaxlib, triton; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'triton', triton.__version__)"; date -u; } > $L/device.txt 2>&1
cat $L/device.txt
V="default ltis_gpu.DKV_ROWS=32 ltis_gpu.DKV_ROWS=128 ltis_gpu.DKV_NUM_STAGES=3 ltis_gpu.DKV_NUM_WARPS=2 gated_gpu.MIN_LEN=1 gated_gpu.DKV_NUM_STAGES=2 ltis_gpu.SEL_LONGEST_FIRST=1"
timeout 400 python benchmarks/attention.py --profile --skip-check --lengths 1024 4096 32768 --impls blossom-pallas --variants $V --iters 10 --out $L/profile.json > $L/profile.log 2>&1
echo "profile rc=$? t=$(( $(date +%s)-T0 ))"
python - $L/profile.json.rows.jsonl <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line); p = r.get("fwdbwd_profile", {})
    k = {a: b for a, b in p.get("by_kernel_ms", {}).items() if a.endswith("dkv") or a.startswith("gated")}
    print(r.get("variant"), r["N"], "dev", p.get("device_ms"), json.dumps(k), r.get("error", ""))
PY
cd $OUT && tar czf logs.tgz logs && cp logs/device.txt . && rm -rf logs
