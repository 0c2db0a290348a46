#!/bin/bash
# call 46: timed table (latency and pipelined throughput) of cuDNN and the pallas layer at 256 .. 64k for the working
# tree of call 45, checks at 17 / 300 / 1k / 4k; then the compiled STIS kernel tests
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
L=$OUT/logs; mkdir -p $L
T0=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python -c "import jax, jaxlib, triton; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'triton', triton.__version__)"; date -u; } > $L/device.txt 2>&1
timeout 360 python benchmarks/attention.py --lengths 256 1024 4096 8192 16384 32768 65536 --impls dense-cudnn blossom-pallas --check-lengths 17 300 1024 4096 --iters 20 --pipelined --out $OUT/attention_table.json > $L/table.log 2>&1
echo "table rc=$? t=$(( $(date +%s)-T0 ))"; grep '"ok"' $L/table.log | python -c "import sys,json; [print(r['impl'],r['N'],r['ok'],round(r['out_rel_err'],5),round(r['max_grad_rel_err'],5)) for r in (json.loads(l.split(' ',1)[1]) for l in sys.stdin)]"; grep -i "fail" $L/table.log | head -3; sed -n '/^impl/,$p' $L/table.log
timeout 150 python -m pytest -q -p no:cacheprovider tests/test_pallas_stis_gpu.py > $L/pytest_stis.log 2>&1; echo "pytest rc=$? t=$(( $(date +%s)-T0 ))"; tail -4 $L/pytest_stis.log
cd $OUT && tar czf logs.tgz logs && cp logs/device.txt . && rm -rf logs
