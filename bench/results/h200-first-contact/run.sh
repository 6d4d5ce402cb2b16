#!/usr/bin/env bash
# First GPU contact: what exists today (compiled test_cuda.py, headline bench rows), within ~3 minutes.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
start=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch,triton,sys;print(sys.version);print('torch',torch.__version__,'triton',triton.__version__,torch.cuda.get_device_name(0))"
  python3 -c "import spikingjelly.activation_based.neuron as n; print('sj ok')"; } 2>&1 | tee $OUT/env.txt
echo "== test_cuda ($(( $(date +%s) - start )) s)"
(cd tests && FASTSNN_COMPILED=1 timeout 100 python3 -m pytest -q -n 8 --maxfail=30 -p no:cacheprovider test_cuda.py -k "not training_program" > $OUT/test_cuda.log 2>&1; echo "rc=$?" >> $OUT/test_cuda.log)
tail -25 $OUT/test_cuda.log
echo "== bench ($(( $(date +%s) - start )) s)"
timeout 110 python3 -m pytest bench/ --benchmark-only -q -p no:cacheprovider --benchmark-json=$OUT/bench.json \
  -k "(test_lif_gpu and fwdbwd and -4- and 64x65536 and not compile) or (test_lif_gpu and fwdbwd and -4- and 64x65536 and fp16) or (test_tser_loss_gpu and 256-1000 and not compile) or (test_tser_loss_gpu and 256-1000-bf16) or test_train_step_gpu or test_saved" > $OUT/bench.log 2>&1; echo "rc=$?" >> $OUT/bench.log
tail -40 $OUT/bench.log
python3 bench/report.py $OUT/bench.json > $OUT/report.log 2>&1; cp bench/results/*.md bench/results/saved_bytes-cuda.json $OUT/ 2>/dev/null
cat $OUT/*.md | tail -60
echo "== done ($(( $(date +%s) - start )) s)"
