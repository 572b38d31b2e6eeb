#!/usr/bin/env bash
# Here (not on the device): the wheels the GPU image lacks, into .whl/ (git-ignored via .git/info/exclude), at the
# versions of this checkout's .venv. Carry .whl to the device; scripts/device_gpu_suite.sh installs them.
#   bash scripts/device_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
# The server (starlette, uvicorn, pyzmq), the openai client and its needs, soundfile (audio parts), torchaudio
# (Granite Speech's feature extractor), bitsandbytes (4-bit bases, 43 MB: the carry limit is 64 MiB in all),
# compressed-tensors and loguru (the FP8 tests' oracle).
names="starlette uvicorn pyzmq openai httpx2 httpcore2 truststore idna h11 distro jiter pydantic pydantic_core
annotated-types typing-inspection sniffio soundfile cffi pycparser torchaudio bitsandbytes compressed-tensors loguru"
specs=()
for n in $names; do
  v=$(.venv/bin/pip show "$n" 2>/dev/null | sed -n "s/^Version: //p" || true)
  specs+=("$n${v:+==$v}")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d .whl "${specs[@]}" 2>&1 | grep -v "^WARNING: Location" || true
ls .whl
