#!/bin/bash
# call 43: validity loads decoupled from the data loads (load unpredicated, select after) in the STIS, LTIS and gated
# kernels. Device profile of the committed code (HEAD 17f0580, separate process) against the working tree at
# 1k / 4k / 32k, and STIS variants (unrolled offsets; dq / dk,dv tiles of 128 rows) with the new loads; checks at
# 300 / 1k / 4k / 8k (gated) for every variant
export PYTHONUNBUFFERED=1
L=$OUT/logs; mkdir -p $L
T0=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python -c "import jax, jaxlib, triton; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'triton', triton.__version__)"; date -u; } > $L/device.txt 2>&1
(cd .devrun/old && PYTHONPATH=$PWD timeout 150 python benchmarks/attention.py --profile --skip-check --lengths 1024 4096 32768 --impls blossom-pallas --iters 10 --out $L/profile_old.json > $L/profile_old.log 2>&1)
echo "old profile rc=$? t=$(( $(date +%s)-T0 ))"
S=stis_gpu
V="default $S.UNROLL=1 $S.DEFAULT_ROWS_PER_PROGRAM_DQ=128,$S.DEFAULT_ROWS_PER_PROGRAM_DKV=128"
PYTHONPATH=$PWD timeout 330 python benchmarks/attention.py --profile --check-lengths 300 1024 4096 8192 --lengths 1024 4096 32768 --impls blossom-pallas --variants $V --iters 10 --out $L/profile.json > $L/profile.log 2>&1
echo "profile rc=$? t=$(( $(date +%s)-T0 ))"
grep '"ok"' $L/profile.log | python -c "import sys,json; [print(r.get('variant','')[-60:],r['N'],r['ok'],round(r['out_rel_err'],5),round(r['max_grad_rel_err'],5)) for r in (json.loads(l.split(' ',1)[1]) for l in sys.stdin)]"; grep -i "fail\|Traceback\|Error" $L/profile.log | head -5
python - $L/profile_old.json.rows.jsonl $L/profile.json.rows.jsonl <<'PY'
import json, sys
for tag, path in zip(("old", "new"), sys.argv[1:]):
    for line in open(path):
        r = json.loads(line); p = r.get("fwdbwd_profile", {})
        k = {a.replace("ltis_attention", "L").replace("stis_bwd", "S"): b for a, b in p.get("by_kernel_ms", {}).items()}
        print(tag, r["N"], r.get("variant", "")[-50:], p.get("device_ms"), json.dumps(k), r.get("error", ""))
PY
cd $OUT && tar czf logs.tgz logs && cp logs/device.txt . && rm -rf logs
