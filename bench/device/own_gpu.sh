#!/bin/bash
# Issue 18's fidelity target needs the live replays and the profile from the same GPU. Whichever GPU is lent:
#   an H200 (the committed profile's): the unseen replays, stage by stage (STAGE=1, 2, 3 as fidelity_unseen.sh);
#   another (an H100): `qlmctl profile-model` on it (profile_h200.sh, ~9.5 min), to set against the unseen
#   replays already measured on that GPU (docs/fidelity/unseen-h100/), then STAGE=3b: the run they lack.
#   run(command="bash bench/device/own_gpu.sh", carry=[".vllmkit/bin", ".vllmkit/p0", ".whl"])
#   run(command="STAGE=2 bash bench/device/own_gpu.sh", ...)   # next call on the warm machine, and so on
set -u
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
echo "gpu: $GPU"
if echo "$GPU" | grep -q H200; then
  STAGE=${STAGE:-1} bash bench/device/fidelity_unseen.sh
elif [ "${STAGE:-1}" = 1 ]; then
  bash bench/device/profile_h200.sh
else
  STAGE=3b bash bench/device/fidelity_unseen.sh
fi
