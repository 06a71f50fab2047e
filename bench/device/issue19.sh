#!/usr/bin/env bash
# Issue 19 on the lent GPU, as one device call (planned to fit 10 minutes; not yet timed there):
#   bash bench/device/wheels.sh    # here, once: the wheels the device lacks
#   device run: bash bench/device/issue19.sh 330   (carry [".whl"], timeout_s 600)
# Pretrains run B's settings (head width 16, speed jitter 0.3, attribute dropout 0.15,
# trail 0.25, conv skip 0.5, the shipped VAE) for up to 7000 U-Net steps on the GPU,
# stopping after $1 seconds (default 330) with a checkpoint; writes the newest checkpoint
# as a model folder, then measures the attention gate and the held-out probe
# (count 112, seed 2024) there. Everything lands in $OUT: device.json (GPU, driver,
# versions, commit), pretrain.log, gate.json, probe.json and model.tar (the model folder,
# about 13 MB) to unpack here and gate further (motiondirector experiment) on the CPU.
set -uo pipefail
budget=${1:-330}
out=${OUT:?run this through the device tool}
# (DEVICE=cpu PYTHON=.venv/bin/python NO_INSTALL=1 PROBE_COUNT=7 try it here on the CPU)
py=${PYTHON:-python3}
if [ -z "${NO_INSTALL:-}" ]; then
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
ms() { $py -m motionsep_cli "$@"; }
$py - "$out/device.json" <<'PY'
import json, subprocess, sys
import diffusers, torch, transformers
try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip()
except FileNotFoundError:
    smi = "no GPU"
commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
json.dump({"gpu": smi, "torch": torch.__version__, "cuda": torch.version.cuda,
           "diffusers": diffusers.__version__, "transformers": transformers.__version__,
           "commit": commit}, open(sys.argv[1], "w"), indent=1)
PY
cat "$out/device.json"
run=${RUN:-/tmp/b7000}
start=$(date +%s)
# SIGINT makes the run write a checkpoint at the step it is on, as Ctrl-C does
timeout -s INT "$budget" $py bench/toy_pretrain.py --run "$run" --device "${DEVICE:-cuda}" --workers 12 \
  --steps 7000 --vae-steps 0 --vae-from toy --head-width 16 --speed-jitter 0.3 \
  --attribute-dropout 0.15 --trail-opacity 0.25 --conv-skip 0.5 --checkpoint-every 500 \
  2>&1 | tee "$out/pretrain.log" | tail -n 20
echo "pretraining: $(( $(date +%s) - start )) s"
ms toy snapshot "$run/checkpoints-run" --out "$run/snap" --force --json | tee "$out/snapshot.json"
ms toy probe --attention --model "$run/snap" --json > "$out/gate.json"; cat "$out/gate.json"
ms toy probe --model "$run/snap" --count "${PROBE_COUNT:-112}" --seed 2024 --json > "$out/probe.json"
tar -C "$run" -cf "$out/model.tar" snap
echo "done: $(( $(date +%s) - start )) s"
