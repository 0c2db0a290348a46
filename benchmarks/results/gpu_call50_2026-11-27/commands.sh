#!/bin/bash
# call 50: is the back-to-back (pipelined) rate at 1k bound by the host's launches? attention.py --pipelined now also
# records the host dispatch time per call; pallas and cuDNN layers at 1k / 4k / 32k with XLA's command buffers as
# by default and off (one process), then a second process with every command type and graphs from one op
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
L=$OUT/logs; mkdir -p $L
T0=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python -c "import jax, jaxlib, triton; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'triton', triton.__version__)"; nproc; lscpu | grep "Model name"; date -u; } > $L/device.txt 2>&1
timeout 240 python benchmarks/attention.py --lengths 1024 4096 32768 --impls dense-cudnn blossom-pallas --check-lengths 300 1024 --iters 20 --pipelined --command-buffers default off --out $OUT/dispatch.json > $L/dispatch.log 2>&1
echo "dispatch rc=$? t=$(( $(date +%s)-T0 ))"; grep '"ok"' $L/dispatch.log | cut -c1-200; sed -n '/^impl/,$p' $L/dispatch.log
XLA_FLAGS="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN --xla_gpu_graph_min_graph_size=1" timeout 150 python benchmarks/attention.py --lengths 1024 4096 32768 --impls dense-cudnn blossom-pallas --skip-check --iters 20 --pipelined --out $OUT/dispatch_allgraphs.json > $L/dispatch_allgraphs.log 2>&1
echo "allgraphs rc=$? t=$(( $(date +%s)-T0 ))"; sed -n '/^impl/,$p' $L/dispatch_allgraphs.log
cd $OUT && tar czf logs.tgz logs && cp logs/device.txt . && rm -rf logs
