#!/usr/bin/env bash
# On the device, in one call: the GPU suite, the many-adapter benchmark, a LoRA kernel sweep at 256 tokens.
#   run (carry .whl):  bash scripts/device_many_adapters.sh
set -uo pipefail
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
source scripts/device_site.sh
out=${OUT:-/tmp}
df -h /dev/shm | tail -1
python3 -m pytest -q -m gpu tests -rf --tb=short -p no:cacheprovider > "$out/gpu_suite.log" 2>&1
tail -4 "$out/gpu_suite.log"
python3 benchmarks/bench_many_adapters.py --json "$out/many.json" 2>&1 | grep -v "Loading weights" > "$out/many.log"
tail -16 "$out/many.log"
python3 benchmarks/bench_lora_kernels.py --mixes 256:128,256:32 --k-per-split 0,1024 --expand-n 128 \
  --decode-n 256,512 --json "$out/kern.json" > "$out/kern.log" 2>&1
tail -12 "$out/kern.log"
