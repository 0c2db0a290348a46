#!/bin/bash
# call 48: the gate mix's gate gradient behind an optimization barrier (working tree) against HEAD 7c2081a
# (.devrun/old, separate process, same card): device profile at 1k / 4k, checks at 300 / 1k
export PYTHONUNBUFFERED=1
L=$OUT/logs; mkdir -p $L
T0=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python -c "import jax, jaxlib, triton; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'triton', triton.__version__)"; date -u; } > $L/device.txt 2>&1
(cd .devrun/old && PYTHONPATH=$PWD timeout 120 python benchmarks/attention.py --profile --skip-check --lengths 1024 4096 --impls blossom-pallas --iters 10 --out $L/profile_old.json > $L/profile_old.log 2>&1)
echo "old profile rc=$? t=$(( $(date +%s)-T0 ))"
PYTHONPATH=$PWD timeout 150 python benchmarks/attention.py --profile --check-lengths 300 1024 --lengths 1024 4096 --impls blossom-pallas --iters 10 --out $L/profile.json > $L/profile.log 2>&1
echo "profile rc=$? t=$(( $(date +%s)-T0 ))"
grep '"ok"' $L/profile.log | python -c "import sys,json; [print(r['N'],r['ok'],round(r['out_rel_err'],5),round(r['max_grad_rel_err'],5)) for r in (json.loads(l.split(' ',1)[1]) for l in sys.stdin)]"; grep -i "fail\|Traceback\|Error" $L/profile.log | head -5
python - $L/profile_old.json.rows.jsonl $L/profile.json.rows.jsonl <<'PY'
import json, sys
for tag, path in zip(("old", "new"), sys.argv[1:]):
    for line in open(path):
        r = json.loads(line); p = r.get("fwdbwd_profile", {})
        k = {a.replace("ltis_attention", "L").replace("stis_bwd", "S"): b for a, b in p.get("by_kernel_ms", {}).items()}
        print(tag, r["N"], p.get("device_ms"), p.get("events_per_call"), json.dumps(k), r.get("error", ""))
        if r["N"] == 1024:
            print("   ", [(o["op"], o["ms"]) for o in p["top_ops_ms"] if "pallas" not in o["op"]][:10])
PY
cd $OUT && tar czf logs.tgz logs && cp logs/device.txt . && rm -rf logs
