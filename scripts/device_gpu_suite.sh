#!/usr/bin/env bash
# On the device: the GPU suite, with the server's packages from carried wheels (.whl) so its GPU test runs.
#   here: bash scripts/device_wheels.sh; on the device (carry .whl): bash scripts/device_gpu_suite.sh [pytest args]
set -uo pipefail
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
source scripts/device_site.sh
# torchaudio (Granite Speech's feature extractor) comes as a wheel without its deps; its optional C extension is
# dropped where it does not load against the image's torch (scripts/setup.sh does the same).
if ! python3 -c "import torchaudio" 2>/dev/null && [ -d /tmp/site/torchaudio ]; then
  rm -f /tmp/site/torchaudio/lib/*.so
fi
logs=${OUT:-/tmp}
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv
python3 -c "import torch, triton, transformers, peft; print('torch', torch.__version__, 'triton', triton.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__)"
python3 - <<'PY'
import time, torch
from loraplex.lora.host_cache import _pinned
t0 = time.perf_counter(); buf = _pinned(16, 1519616, torch.bfloat16); t1 = time.perf_counter()
dev = torch.empty(16, 1519616, dtype=torch.bfloat16, device="cuda")
for _ in range(3):
    torch.cuda.synchronize(); t2 = time.perf_counter(); dev.copy_(buf, non_blocking=True); torch.cuda.synchronize()
t3 = time.perf_counter()
print(f"pinned by registration: {buf.is_pinned()}, {1e3 * (t1 - t0):.1f} ms for {buf.nbytes / 1e6:.1f} MB; "
      f"H2D {buf.nbytes / (t3 - t2) / 1e9:.1f} GB/s")
PY
python3 -m pytest -q -m gpu tests -rf --tb=short -p no:cacheprovider "$@" 2>&1 | tee "$logs/gpu_suite.log"
