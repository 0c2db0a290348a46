#!/bin/bash
# call 69 (H200): the separate LTIS dK/dV kernel after round 13 (32-row chunks, long lists first): 16-row chunks, 3
# pipeline stages, 2 warps; device profile at 1k / 4k, the default twice (second = no-op override)
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
L=$OUT/logs; mkdir -p $L
T0=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python -c "import jax, jaxlib, triton; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'triton', triton.__version__)"; date -u; } > $L/device.txt 2>&1
cat $L/device.txt
V="default ltis_gpu.DKV_ROWS=16 ltis_gpu.DKV_NUM_STAGES=3 ltis_gpu.DKV_NUM_WARPS=2 ltis_gpu.SEL_LONGEST_FIRST=1"
timeout 200 python benchmarks/attention.py --profile --check-lengths 4096 --lengths 1024 4096 --impls blossom-pallas --variants $V --iters 10 --out $L/profile.json > $L/profile.log 2>&1
echo "profile rc=$? t=$(( $(date +%s)-T0 ))"
grep '"ok"' $L/profile.log | python -c "import sys,json; [print(r.get('variant'),r['N'],r['ok'],round(r['out_rel_err'],5),round(r['max_grad_rel_err'],5)) for r in (json.loads(l.split(' ',1)[1]) for l in sys.stdin)]"
python - $L/profile.json.rows.jsonl <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line); p = r.get("fwdbwd_profile", {})
    k = {a: b for a, b in p.get("by_kernel_ms", {}).items() if a.endswith("dkv")}
    print(r.get("variant"), r["N"], "dev", p.get("device_ms"), json.dumps(k), r.get("error", ""))
PY
cd $OUT && tar czf logs.tgz logs && cp logs/device.txt . && rm -rf logs
