#!/usr/bin/env bash
# CT reconstruction-kernel conversion (source -> target kernel, e.g. smooth -> sharp): paired RevGAN on
# INPUT_DIR/<case>/source + INPUT_DIR/<case>/target (NIfTI files or DICOM folders on the same grid),
# evaluated on the validation cases against doing nothing (the source kernel itself). The network sees
# the whole scanner range (MODEL_WINDOW, ct-full); metrics are computed in WINDOW (nlst).
# SIMULATE=1 makes a SIMULATED smooth/sharp pair from each single scan instead (for trying it out).
# Usage (variables in pipelines/_run.sh):
#   INPUT_DIR=pairs OUTPUT_DIR=runs/ct_kernel pipelines/ct_kernel_conversion.sh
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
INPUT_DIR=${INPUT_DIR:-data/kernel_pairs}
OUTPUT_DIR=${OUTPUT_DIR:-runs/ct_kernel_conversion}
CONFIG=${CONFIG:-$here/../configs/ct_kernel_paired.yaml}
DEVICE=${DEVICE:-auto}
WINDOW=${WINDOW:-nlst}
MODEL_WINDOW=${MODEL_WINDOW:-ct-full}
SIMULATE=${SIMULATE:-0}
TASK=ct-kernel
PREPROCESS_ARGS=(--window "$MODEL_WINDOW")
[ "$SIMULATE" = 1 ] && PREPROCESS_ARGS+=(--simulate-kernel)
EVALUATE_ARGS=(--window "$WINDOW" --baseline identity)
TRAIN_SET="data.window=$MODEL_WINDOW ${TRAIN_SET:-}"
source "$here/_run.sh"
run_pipeline
