#!/bin/bash
# call 58 (H200): LTIS selected-slot groups as a loop (cp.async prefetch by Triton's pipeliner) and 64-key groups,
# on top of head-major K / V: checks, device profile of 4 variants at 1k / 4k / 32k, timed table of the best
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
L=$OUT/logs; mkdir -p $L
T0=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python -c "import jax, jaxlib, triton; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'triton', triton.__version__)"; date -u; } > $L/device.txt 2>&1
cat $L/device.txt
NOLOOP="ltis_gpu.ATTN_GROUP_LOOP=0"; K64="ltis_gpu.ATTN_MAX_KEYS=64"; K64NOLOOP="ltis_gpu.ATTN_MAX_KEYS=64,ltis_gpu.ATTN_GROUP_LOOP=0"
OLD="ltis_gpu.KV_HEAD_MAJOR=0,stis_gpu.KV_HEAD_MAJOR=0,ltis_gpu.ATTN_GROUP_LOOP=0"
timeout 110 python benchmarks/attention.py --check-lengths 17 300 1024 4096 8192 --lengths 1024 --impls blossom-pallas --iters 2 --variants default $K64 --out $L/check.json > $L/check.log 2>&1
echo "check rc=$? t=$(( $(date +%s)-T0 ))"
grep '"ok"' $L/check.log | python -c "import sys,json; [print(r['N'],r.get('variant'),r['ok'],round(r['out_rel_err'],5),round(r['max_grad_rel_err'],5)) for r in (json.loads(l.split(' ',1)[1]) for l in sys.stdin)]"; grep -i "fail\|Traceback\|Error" $L/check.log | head -5
timeout 200 python benchmarks/attention.py --profile --skip-check --lengths 1024 4096 32768 --impls blossom-pallas --iters 10 --variants default $NOLOOP $K64 $K64NOLOOP --out $L/profile.json > $L/profile.log 2>&1
echo "profile rc=$? t=$(( $(date +%s)-T0 ))"
python - $L/profile.json.rows.jsonl > $L/best.txt <<'PY'
import json, sys, collections
tot = collections.defaultdict(float)
for line in open(sys.argv[1]):
    r = json.loads(line); p = r.get("fwdbwd_profile", {})
    k = {a.replace("ltis_attention", "L").replace("stis_bwd", "S").replace("gated_attention", "G"): b for a, b in p.get("by_kernel_ms", {}).items()}
    print(r.get("variant"), r["N"], "dev", p.get("device_ms"), "ops", p.get("events_per_call"), json.dumps(k), r.get("error", ""), file=sys.stderr)
    if p.get("device_ms"): tot[r.get("variant")] += p["device_ms"]
print(min(tot, key=tot.get) if tot else "default")
PY
BEST=$(tail -1 $L/best.txt); echo "best: $BEST"
timeout 230 python benchmarks/attention.py --lengths 1024 4096 32768 --impls dense-cudnn blossom-pallas --variants $BEST $OLD --skip-check --iters 20 --pipelined --out $OUT/attention_table.json > $L/table.log 2>&1
echo "table rc=$? t=$(( $(date +%s)-T0 ))"; sed -n '/^impl/,$p' $L/table.log
cd $OUT && tar czf logs.tgz logs && cp logs/device.txt . && rm -rf logs
