#!/bin/bash
# call 66 (H200): dK/dV launch order (ltis_gpu.DKV_BLOCKS_OUTER: grid (batch, kv head, key block), every row's early,
# long key blocks first) against the old key-block-fastest grid, alternated twice in one process (the second default
# is a no-op override): compiled checks at 300 / 4k / 8k, device profile at 1k / 4k / 32k / 64k; then the timed layer
# against cuDNN at 1k / 4k / 32k with the default
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
L=$OUT/logs; mkdir -p $L
T0=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python -c "import jax, jaxlib, triton; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'triton', triton.__version__)"; date -u; } > $L/device.txt 2>&1
cat $L/device.txt
V="default ltis_gpu.DKV_BLOCKS_OUTER=0 ltis_gpu.SEL_LONGEST_FIRST=1 ltis_gpu.DKV_BLOCKS_OUTER=0"
timeout 330 python benchmarks/attention.py --profile --check-lengths 300 4096 8192 --lengths 1024 4096 32768 65536 --impls blossom-pallas --variants $V --iters 10 --out $L/profile.json > $L/profile.log 2>&1
echo "profile rc=$? t=$(( $(date +%s)-T0 ))"
grep '"ok"' $L/profile.log | python -c "import sys,json; [print(r.get('variant'),r['N'],r['ok'],round(r['out_rel_err'],5),round(r['max_grad_rel_err'],5)) for r in (json.loads(l.split(' ',1)[1]) for l in sys.stdin)]"
python - $L/profile.json.rows.jsonl <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line); p = r.get("fwdbwd_profile", {})
    k = {a: b for a, b in p.get("by_kernel_ms", {}).items() if a.endswith("dkv")}
    print(r.get("variant"), r["N"], "dev", p.get("device_ms"), json.dumps(k), r.get("error", ""))
PY
timeout 150 python benchmarks/attention.py --skip-check --lengths 1024 4096 32768 --impls dense-cudnn blossom-pallas --iters 20 --pipelined --out $OUT/attention_table.json > $L/table.log 2>&1
echo "table rc=$? t=$(( $(date +%s)-T0 ))"; sed -n '/^impl/,$p' $L/table.log
cd $OUT && tar czf logs.tgz logs && cp logs/device.txt . && rm -rf logs
