#!/bin/bash
# call 54: the test files whose model calls are now jitted (tests/conftest.py jitted_apply) on the GPU:
# models, dense attention (cuDNN cases), serving, export
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
L=$OUT/logs; mkdir -p $L
T0=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python -c "import jax, jaxlib, triton; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'triton', triton.__version__)"; date -u; } > $L/device.txt 2>&1
timeout 400 python -m pytest -q -o addopts="-ra" -p no:cacheprovider tests/test_models.py tests/test_dense_attention.py tests/test_serving.py tests/test_train_export.py > $L/pytest.log 2>&1
echo "pytest rc=$? t=$(( $(date +%s)-T0 ))"; grep -E "passed|failed|FAILED|Error|SKIPPED" $L/pytest.log | head -30
cd $OUT && tar czf logs.tgz logs && cp logs/device.txt . && rm -rf logs
