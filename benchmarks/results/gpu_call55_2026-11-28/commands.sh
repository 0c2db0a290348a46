#!/bin/bash
# call 55: serving on a GPU host: the default (CPU-only) export served on the host's CPU device
# (tests/test_train_export.py failed in call 54), and the serving tests
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
L=$OUT/logs; mkdir -p $L
T0=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python -c "import jax, jaxlib, triton; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'triton', triton.__version__)"; date -u; } > $L/device.txt 2>&1
timeout 400 python -m pytest -q -o addopts="-ra" -p no:cacheprovider tests/test_serving.py tests/test_train_export.py > $L/pytest.log 2>&1
echo "pytest rc=$? t=$(( $(date +%s)-T0 ))"; grep -E "passed|failed|FAILED|Error|SKIPPED" $L/pytest.log | head -30
cd $OUT && tar czf logs.tgz logs && cp logs/device.txt . && rm -rf logs
