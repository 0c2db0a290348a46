#!/bin/bash
# call 65 (H200): the dK/dV inverse selection as a (uint16 segment, int32 id) pair sort (ltis_gpu.DKV_SORT_U16_KEYS):
# compiled correctness of the inverse map, the optimized HLO's sort at 4k (CUB pair sort?), the device profile
# alternated with the old packed sorts at 1k / 4k / 32k (second default = no-op override), then the timed layer
# against cuDNN at 1k / 4k / 32k
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
L=$OUT/logs; mkdir -p $L
T0=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python -c "import jax, jaxlib, triton; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'triton', triton.__version__)"; date -u; } > $L/device.txt 2>&1
cat $L/device.txt
timeout 90 python -m pytest -q -n 0 -p no:cacheprovider -o addopts="-ra" tests/test_pallas_ltis_gpu.py -k "inverse_selection" > $L/pytest.log 2>&1
echo "pytest rc=$? t=$(( $(date +%s)-T0 ))"; tail -3 $L/pytest.log
timeout 90 python benchmarks/hlo_dump.py --impl blossom-pallas --length 4096 --out $L/hlo_pallas_4k.txt > $L/hlo.log 2>&1
echo "hlo rc=$? t=$(( $(date +%s)-T0 ))"
grep -o 'custom_call_target="__cub[^"]*"' $L/hlo_pallas_4k.txt | sort | uniq -c
grep '__cub' $L/hlo_pallas_4k.txt | cut -c1-200
grep -c ' sort(' $L/hlo_pallas_4k.txt
V="default ltis_gpu.DKV_SORT_U16_KEYS=0 ltis_gpu.SEL_LONGEST_FIRST=1 ltis_gpu.DKV_SORT_U16_KEYS=0"
timeout 250 python benchmarks/attention.py --profile --check-lengths 4096 8192 --lengths 1024 4096 32768 --impls blossom-pallas --variants $V --iters 10 --out $L/profile.json > $L/profile.log 2>&1
echo "profile rc=$? t=$(( $(date +%s)-T0 ))"
grep '"ok"' $L/profile.log | python -c "import sys,json; [print(r.get('variant'),r['N'],r['ok'],round(r['out_rel_err'],5),round(r['max_grad_rel_err'],5)) for r in (json.loads(l.split(' ',1)[1]) for l in sys.stdin)]"
python - $L/profile.json.rows.jsonl <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line); p = r.get("fwdbwd_profile", {})
    sort = sum(o["ms"] for o in p.get("top_ops_ms", []) if o["name_stack"].endswith("/sort"))
    k = {a: b for a, b in p.get("by_kernel_ms", {}).items() if a.startswith("xla")}
    print(r.get("variant"), r["N"], "dev", p.get("device_ms"), "ops", p.get("events_per_call"), "sort", round(sort, 4), json.dumps(k), r.get("error", ""))
PY
timeout 190 python benchmarks/attention.py --skip-check --lengths 1024 4096 32768 --impls dense-cudnn blossom-pallas --iters 20 --pipelined --out $OUT/attention_table.json > $L/table.log 2>&1
echo "table rc=$? t=$(( $(date +%s)-T0 ))"; sed -n '/^impl/,$p' $L/table.log
gzip $L/hlo_pallas_4k.txt
cd $OUT && tar czf logs.tgz logs && cp logs/device.txt . && rm -rf logs
