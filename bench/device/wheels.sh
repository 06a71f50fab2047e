#!/usr/bin/env bash
# Downloads, here, the wheels that the lent GPU machine lacks (its image has torch,
# transformers, peft, accelerate, typer... but not these), into .whl/ at the repo root.
# The device machine's python3 is CPython 3.12 on x86-64 and cannot reach the network,
# so each device call names .whl in `carry` and installs them first (see issue19.sh).
#
#   bash bench/device/wheels.sh           # 8 MB: enough for training, the toy and probes
#   WITH_AV=1 bash bench/device/wheels.sh # + PyAV (36 MB), for anything that writes videos
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
mkdir -p .whl
pins=(
  diffusers==0.42.1 importlib_metadata==10.2.0 zipp==4.1.2
  pydantic==2.14.4 pydantic_core==2.50.5 pydantic-settings==2.16.3 python-dotenv==1.2.4
  annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0
  platformdirs==4.14.9
)
[ "${WITH_AV:-0}" = 1 ] && pins+=(av==18.1.0)
platforms=()
for n in 28 27 17; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" --platform manylinux2014_x86_64 -d .whl "${pins[@]}"
ls -1 .whl
du -sh .whl
