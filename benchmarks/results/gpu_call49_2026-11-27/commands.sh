#!/bin/bash
# call 49: RoPE as one elementwise form (working tree) against HEAD ec995f2 (.devrun/old, separate process, same
# card): device profile at 1k / 4k / 32k (checks at 300 / 1k / 4k / 8k for the new code); HEAD with
# XLA_FLAGS=--xla_gpu_cublas_fallback=false (peak memory: cuBLASLt workspaces?); the timed table of the new code
export PYTHONUNBUFFERED=1
L=$OUT/logs; mkdir -p $L
T0=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python -c "import jax, jaxlib, triton; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'triton', triton.__version__)"; date -u; } > $L/device.txt 2>&1
(cd .devrun/old && PYTHONPATH=$PWD timeout 100 python benchmarks/attention.py --profile --skip-check --lengths 1024 4096 32768 --impls blossom-pallas --iters 10 --out $L/profile_old.json > $L/profile_old.log 2>&1)
echo "old profile rc=$? t=$(( $(date +%s)-T0 ))"
PYTHONPATH=$PWD timeout 140 python benchmarks/attention.py --profile --check-lengths 300 1024 4096 8192 --lengths 1024 4096 32768 --impls blossom-pallas --iters 10 --out $L/profile.json > $L/profile.log 2>&1
echo "profile rc=$? t=$(( $(date +%s)-T0 ))"
grep '"ok"' $L/profile.log | python -c "import sys,json; [print(r['N'],r['ok'],round(r['out_rel_err'],5),round(r['max_grad_rel_err'],5)) for r in (json.loads(l.split(' ',1)[1]) for l in sys.stdin)]"; grep -i "fail\|Traceback\|Error" $L/profile.log | head -5
(cd .devrun/old && XLA_FLAGS=--xla_gpu_cublas_fallback=false PYTHONPATH=$PWD timeout 80 python benchmarks/attention.py --profile --skip-check --lengths 1024 4096 --impls blossom-pallas dense-cudnn --iters 10 --out $L/profile_nocublas.json > $L/profile_nocublas.log 2>&1)
echo "nocublas profile rc=$? t=$(( $(date +%s)-T0 ))"
python - $L/profile_old.json.rows.jsonl $L/profile.json.rows.jsonl $L/profile_nocublas.json.rows.jsonl <<'PY'
import json, sys
for tag, path in zip(("old", "new", "old-nocublas"), sys.argv[1:]):
    for line in open(path):
        r = json.loads(line); p = r.get("fwdbwd_profile", {})
        k = {a.replace("ltis_attention", "L").replace("stis_bwd", "S"): b for a, b in p.get("by_kernel_ms", {}).items()}
        print(tag, r["impl"], r["N"], "peak", round(r.get("fwdbwd_peak_mb", 0), 1), p.get("device_ms"), p.get("events_per_call"), "span", p.get("span_ms"), json.dumps(k), r.get("error", ""))
        if r["N"] == 1024 and r["impl"] == "blossom-pallas":
            print("   ", [(o["op"], o["ms"]) for o in p["top_ops_ms"] if "pallas" not in o["op"]][:12])
PY
PYTHONPATH=$PWD timeout 230 python benchmarks/attention.py --lengths 256 1024 4096 8192 16384 32768 65536 --impls dense-cudnn blossom-pallas --skip-check --iters 20 --pipelined --out $OUT/attention_table.json > $L/table.log 2>&1
echo "table rc=$? t=$(( $(date +%s)-T0 ))"; sed -n '/^impl/,$p' $L/table.log
cd $OUT && tar czf logs.tgz logs && cp logs/device.txt . && rm -rf logs
