#!/usr/bin/env bash
# One-command device check on a CUDA GPU node: prints one table, exits non-zero on any mismatch.
# Same as `revgan-med benchmark gpu`; extra arguments are passed on, e.g.
#   benchmarks/gpu_check.sh --pair /data/ct_kernel_pair_philips_B_L --json gpu.json
#   benchmarks/gpu_check.sh --device cpu --infer-shape 48,48,16 --amp-steps 2   (logic only, no GPU)
set -euo pipefail
cd "$(dirname "$0")/.."
# 8 minutes is the budget on one GPU; a check that hangs (e.g. an NCCL rendezvous) must not stall the node
exec timeout --signal=TERM 480 python -m revgan_med benchmark gpu "$@"
