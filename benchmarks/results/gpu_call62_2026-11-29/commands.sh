#!/bin/bash
# call 62 (H200): constant sweep after round 11 (head-major K / V, 64-key groups, base-2 STIS): device profile per
# variant in one process, 1k / 4k (separate kernels) then 32k (gated kernels)
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
L=$OUT/logs; mkdir -p $L
T0=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python -c "import jax, jaxlib, triton; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'triton', triton.__version__)"; date -u; } > $L/device.txt 2>&1
cat $L/device.txt
V="default ltis_gpu.DKV_NUM_STAGES=3 ltis_gpu.DKV_ROWS=32 ltis_gpu.DKV_ROWS=128 ltis_gpu.DKV_FLAT_SORT_MIN_PAIRS=0 gated_gpu.MIN_LEN=1 ltis_gpu.ATTN_ROWS=32,ltis_gpu.ATTN_MAX_KEYS=128 ltis_gpu.DKV_NUM_WARPS=2 ltis_gpu.SEL_NUM_STAGES=3"
timeout 330 python benchmarks/attention.py --profile --skip-check --lengths 1024 4096 --impls blossom-pallas --variants $V --iters 10 --out $L/profile_a.json > $L/profile_a.log 2>&1
echo "profile a rc=$? t=$(( $(date +%s)-T0 ))"
V="default gated_gpu.DKV_NUM_STAGES=3 ltis_gpu.SEL_NUM_STAGES=3 ltis_gpu.SEL_CHUNK=16 ltis_gpu.DKV_ROWS=32"
timeout 200 python benchmarks/attention.py --profile --skip-check --lengths 32768 --impls blossom-pallas --variants $V --iters 10 --out $L/profile_b.json > $L/profile_b.log 2>&1
echo "profile b rc=$? t=$(( $(date +%s)-T0 ))"
python - $L/profile_a.json.rows.jsonl $L/profile_b.json.rows.jsonl <<'PY'
import json, sys
for path in sys.argv[1:]:
    for line in open(path):
        r = json.loads(line); p = r.get("fwdbwd_profile", {})
        k = {a.replace("ltis_attention", "L").replace("stis_bwd", "S").replace("gated_attention", "G"): b for a, b in p.get("by_kernel_ms", {}).items()}
        print(r.get("variant"), r["N"], "dev", p.get("device_ms"), "ops", p.get("events_per_call"), json.dumps(k), r.get("error", ""))
PY
cd $OUT && tar czf logs.tgz logs && cp logs/device.txt . && rm -rf logs
