#!/bin/bash
# call 68 (H200): round 13 (uint16 pair sort for the dK/dV inverse selection, dK/dV grid with key blocks outermost,
# 32-row LTIS dK/dV chunks) against the session's starting commit 2228133 (.devrun/old, separate processes): compiled
# checks, device profile at 1k / 4k / 32k, the timed layer against cuDNN at 256 .. 64k (README's H200 table), the old
# code's throughput at 1k / 4k / 32k, and N = 131,072 at 131,072 tokens
export PYTHONUNBUFFERED=1
L=$OUT/logs; mkdir -p $L
T0=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python -c "import jax, jaxlib, triton; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'triton', triton.__version__)"; date -u; } > $L/device.txt 2>&1
cat $L/device.txt
PYTHONPATH=$PWD timeout 120 python benchmarks/attention.py --check-lengths 17 300 1024 4096 8192 --lengths 1024 --impls blossom-pallas --iters 2 --out $L/check.json > $L/check.log 2>&1
echo "check rc=$? t=$(( $(date +%s)-T0 ))"
grep '"ok"' $L/check.log | python -c "import sys,json; [print(r['N'],r['ok'],round(r['out_rel_err'],5),round(r['max_grad_rel_err'],5)) for r in (json.loads(l.split(' ',1)[1]) for l in sys.stdin)]"; grep -i "fail\|Traceback\|Error" $L/check.log | head -5
for tag in new old; do
  dir=$PWD; [ $tag = old ] && dir=$PWD/.devrun/old
  (cd $dir && PYTHONPATH=$dir timeout 80 python benchmarks/attention.py --profile --skip-check --lengths 1024 4096 32768 --impls blossom-pallas --iters 10 --out $L/profile_$tag.json > $L/profile_$tag.log 2>&1)
  echo "profile $tag rc=$? t=$(( $(date +%s)-T0 ))"
done
python - $L/profile_old.json.rows.jsonl $L/profile_new.json.rows.jsonl <<'PY'
import json, sys
for tag, path in zip(("old", "new"), sys.argv[1:]):
    for line in open(path):
        r = json.loads(line); p = r.get("fwdbwd_profile", {})
        k = {a.replace("ltis_attention", "L").replace("stis_bwd", "S").replace("gated_attention", "G"): b for a, b in p.get("by_kernel_ms", {}).items()}
        print(tag, r["N"], "dev", p.get("device_ms"), "ops", p.get("events_per_call"), json.dumps(k), r.get("error", ""))
PY
PYTHONPATH=$PWD timeout 200 python benchmarks/attention.py --lengths 256 1024 4096 8192 16384 32768 65536 --impls dense-cudnn blossom-pallas --skip-check --iters 20 --pipelined --out $OUT/attention_table.json > $L/table.log 2>&1
echo "table rc=$? t=$(( $(date +%s)-T0 ))"; sed -n '/^impl/,$p' $L/table.log
(cd .devrun/old && PYTHONPATH=$PWD timeout 80 python benchmarks/attention.py --lengths 1024 4096 32768 --impls blossom-pallas --skip-check --iters 20 --pipelined --out $L/table_old.json > $L/table_old.log 2>&1)
echo "table old rc=$? t=$(( $(date +%s)-T0 ))"; sed -n '/^impl/,$p' $L/table_old.log
PYTHONPATH=$PWD timeout 60 python benchmarks/attention.py --tokens 131072 --lengths 131072 --impls blossom-pallas --skip-check --iters 10 --out $L/table_128k.json > $L/table_128k.log 2>&1
echo "128k rc=$? t=$(( $(date +%s)-T0 ))"; sed -n '/^impl/,$p' $L/table_128k.log
cd $OUT && tar czf logs.tgz logs && cp logs/device.txt . && rm -rf logs
