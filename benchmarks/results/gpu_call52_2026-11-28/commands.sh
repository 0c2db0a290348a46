#!/bin/bash
# call 52: README python blocks (float32 checks under default_matmul_precision("highest")) and the conformance test on the H100
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
L=$OUT/logs; mkdir -p $L
T0=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python -c "import jax, jaxlib, triton; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'triton', triton.__version__)"; date -u; } > $L/device.txt 2>&1
ls ../shared/conformance 2>/dev/null | head -2 || echo "no ../shared here"
timeout 240 python -m pytest -q -o addopts="" -p no:cacheprovider tests/test_readme.py "tests/test_models.py::test_conformance_with_reference_release" "tests/test_models.py::test_last_layer_rows_equals_full_last_layer" > $L/pytest.log 2>&1
echo "pytest rc=$? t=$(( $(date +%s)-T0 ))"; grep -E "passed|failed|skipped|Error|assert" $L/pytest.log | head -20
cd $OUT && tar czf logs.tgz logs && cp logs/device.txt . && rm -rf logs
