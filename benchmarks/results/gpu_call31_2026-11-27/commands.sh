#!/bin/bash
# call 31: dK/dV inverse selection as one 1-D sort (CUB) vs per-row sort: profiles; final table and checks
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
L=$OUT/logs; mkdir -p $L
T0=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python -c "import jax, jaxlib, triton; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'triton', triton.__version__)"; date -u; } > $L/device.txt 2>&1
timeout 80 python benchmarks/attention.py --profile --skip-check --lengths 1024 4096 32768 --impls blossom-pallas --iters 20 --out $L/profile_flat.json > $L/profile_flat.log 2>&1
echo "flat rc=$? t=$(( $(date +%s)-T0 ))"; grep "^profile" $L/profile_flat.log
timeout 80 python benchmarks/attention.py --profile --skip-check --lengths 1024 4096 32768 --impls blossom-pallas --iters 20 --set ltis_gpu.DKV_FLAT_SORT_MIN_PAIRS=2147483647 --out $L/profile_rows.json > $L/profile_rows.log 2>&1
echo "per-row rc=$? t=$(( $(date +%s)-T0 ))"; grep "^profile" $L/profile_rows.log
python - <<'PY'
import json, os
L = os.environ["OUT"] + "/logs"
for f in ("profile_flat.json", "profile_rows.json"):
    d = json.load(open(f"{L}/{f}"))
    for t in d["timings"]:
        ops = [(o["op"], o["ms"]) for o in t["fwdbwd_profile"]["top_ops_ms"] if "sort" in o["name_stack"] or "sort" in o["op"].lower()]
        print(f, t["N"], round(t["fwdbwd_ms"], 3), t["fwdbwd_profile"]["device_ms"], t["fwdbwd_profile"]["events_per_call"], ops)
PY
timeout 220 python benchmarks/attention.py --lengths 256 1024 4096 8192 16384 32768 65536 --impls dense-cudnn blossom-pallas --check-lengths 17 300 1024 4096 --iters 20 --out $OUT/attention_table.json > $L/table.log 2>&1
echo "table rc=$? t=$(( $(date +%s)-T0 ))"; grep -i "fail" $L/table.log | head -3; tail -16 $L/table.log
timeout 110 python benchmarks/kernels_ltis.py --check-only --lengths 1024,32768 > $L/check.log 2>&1; echo "check rc=$? t=$(( $(date +%s)-T0 ))"
grep -h '"ok"' $L/check.log | python -c "import sys,json; [print(r['name'],r['N'],r['kept_set_mismatch'],r['rel_err'],r['ok']) for r in map(json.loads,sys.stdin)]" 2>/dev/null | tail -12
cd $OUT && tar czf logs.tgz logs && cp logs/device.txt . && rm -rf logs
