#!/usr/bin/env bash
# The wheels bench/gpu_check.py needs on the device machine, downloaded into .whl/ at the repo root.
#
# That machine (/work/.library/device/README.md, KINDS.md) has Python 3.12 on x86-64 with torch, torchvision,
# transformers, safetensors, numpy, pandas, pyarrow, tensorboard, pillow, pyyaml, tqdm, regex, einops, msgpack,
# ninja, psutil, py-cpuinfo and huggingface_hub, and can fetch nothing. What it lacks is carried as wheels, at
# the versions of this project's venv (where the tests pass), without their dependencies (--no-deps): the ones
# it lacks are named here too. timm is there, but open_clip 3.3 needs timm >= 1.0.17 and which one the image
# holds is not recorded; typing_extensions likewise for pydantic (>= 4.16). The device call carries .whl
# (carry=[".whl"]); .gitignore keeps it out of git. Everything that travels must stay under 64 MiB: checked below.
#
#     bash bench/gpu_wheels.sh             # PYTHON=... to build DeepSpeed's wheel with another interpreter
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    PYTHON=python3
    for candidate in .venv/bin/python "$(git rev-parse --git-common-dir)/../.venv/bin/python"; do
        if [ -x "$candidate" ]; then PYTHON=$candidate; break; fi
    done
fi

rm -rf .whl
mkdir -p .whl
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl \
    open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 timm==1.0.31 \
    webdataset==1.0.2 braceexpand==0.1.7 \
    hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
    typing_extensions==4.16.0 \
    faiss-cpu==1.15.1
# DeepSpeed publishes only a source archive. Its wheel is pure Python (no ops are compiled unless DS_BUILD_*
# asks; at run time it picks the CUDA accelerator by itself), built by this interpreter, which must hold torch.
"$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8

mib() { echo $(( ($1 + 1048575) / 1048576 )); }
wheels=$(du -cb .whl/*.whl | tail -1 | cut -f1)
tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
total=$((wheels + tree))
ls -1 .whl
echo "wheels $(mib "$wheels") MiB + working tree $(mib "$tree") MiB = $(mib "$total") MiB of the 64 MiB a device call carries"
if [ "$total" -ge $((64 * 1048576)) ]; then
    echo "too big to travel: drop faiss-cpu (bench/gpu_check.py then checks search against a float64 reference)" >&2
    exit 1
fi
