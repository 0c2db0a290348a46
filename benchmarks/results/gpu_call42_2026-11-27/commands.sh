#!/bin/bash
# call 42: STIS backward tiles as committed (dq 64 rows, dk/dv 64 rows; forward 256) against the previous defaults
# (dq 256, dk/dv 128) and dq at 32 rows, in one process at 1k / 4k: device profile, checks at 300 / 1k, latency /
# throughput; then the compiled STIS kernel tests
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
L=$OUT/logs; mkdir -p $L
T0=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python -c "import jax, jaxlib, triton; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'triton', triton.__version__)"; date -u; } > $L/device.txt 2>&1
S=stis_gpu
V="default $S.DEFAULT_ROWS_PER_PROGRAM_DQ=256,$S.DEFAULT_ROWS_PER_PROGRAM_DKV=128 $S.DEFAULT_ROWS_PER_PROGRAM_DQ=32 $S.DEFAULT_ROWS_PER_PROGRAM=128"
timeout 150 python benchmarks/attention.py --profile --skip-check --lengths 1024 4096 --impls blossom-pallas --variants $V --iters 10 --out $L/profile.json > $L/profile.log 2>&1
echo "profile rc=$? t=$(( $(date +%s)-T0 ))"
python - $L/profile.json.rows.jsonl <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line); p = r.get("fwdbwd_profile", {})
    stis = {k: v for k, v in p.get("by_kernel_ms", {}).items() if "stis" in k}
    print(r["N"], r.get("variant", "")[-70:], p.get("device_ms"), stis, r.get("error", ""))
PY
timeout 230 python benchmarks/attention.py --check-lengths 300 1024 --lengths 1024 4096 --impls dense-cudnn blossom-pallas --variants $V --iters 30 --pipelined --out $OUT/attention_table.json > $L/table.log 2>&1
echo "table rc=$? t=$(( $(date +%s)-T0 ))"; grep '"ok"' $L/table.log | python -c "import sys,json; [print(r.get('variant')[-60:],r['N'],r['ok'],round(r['out_rel_err'],5),round(r['max_grad_rel_err'],5)) for r in (json.loads(l.split(' ',1)[1]) for l in sys.stdin)]"; grep -i fail $L/table.log | head -3; sed -n '/^impl/,$p' $L/table.log
timeout 100 python -m pytest -q -p no:cacheprovider tests/test_pallas_stis_gpu.py > $L/pytest_stis.log 2>&1; echo "pytest rc=$? t=$(( $(date +%s)-T0 ))"; tail -4 $L/pytest_stis.log
cd $OUT && tar czf logs.tgz logs && cp logs/device.txt . && rm -rf logs
