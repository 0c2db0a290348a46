#!/bin/bash
# call 63 (H200): confirm call 62's two small 32k gains (selection and gated dK/dV with 3 pipeline stages) by
# alternating them with the defaults in one process (the second "default" is a no-op override), 4k / 32k / 64k;
# then the timed layer (throughput) for both at 32k / 64k, and the compiled check for the candidate
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
L=$OUT/logs; mkdir -p $L
T0=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python -c "import jax, jaxlib, triton; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'triton', triton.__version__)"; date -u; } > $L/device.txt 2>&1
cat $L/device.txt
C=ltis_gpu.SEL_NUM_STAGES=3,gated_gpu.DKV_NUM_STAGES=3
V="default $C ltis_gpu.SEL_LONGEST_FIRST=1 $C"
timeout 260 python benchmarks/attention.py --profile --check-lengths 8192 --lengths 4096 32768 65536 --impls blossom-pallas --variants $V --iters 10 --out $L/profile.json > $L/profile.log 2>&1
echo "profile rc=$? t=$(( $(date +%s)-T0 ))"
grep '"ok"' $L/profile.log | python -c "import sys,json; [print(r.get('variant'),r['N'],r['ok'],round(r['out_rel_err'],5),round(r['max_grad_rel_err'],5)) for r in (json.loads(l.split(' ',1)[1]) for l in sys.stdin)]"
python - $L/profile.json.rows.jsonl <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line); p = r.get("fwdbwd_profile", {})
    k = {a.replace("ltis_attention", "L").replace("gated_attention", "G"): b for a, b in p.get("by_kernel_ms", {}).items() if a in ("ltis_select", "gated_attention_dkv", "ltis_attention_dkv")}
    print(r.get("variant"), r["N"], "dev", p.get("device_ms"), json.dumps(k), r.get("error", ""))
PY
timeout 200 python benchmarks/attention.py --skip-check --lengths 32768 65536 --impls blossom-pallas --variants $V --iters 20 --pipelined --out $L/table.json > $L/table.log 2>&1
echo "table rc=$? t=$(( $(date +%s)-T0 ))"; sed -n '/^impl/,$p' $L/table.log
cd $OUT && tar czf logs.tgz logs && cp logs/device.txt . && rm -rf logs
