#!/usr/bin/env bash
# CT super-resolution x(2,2,4): thick-slice simulation of each scan -> paired RevGAN -> HR prediction of
# the validation cases -> MAE/PSNR/SSIM against the originals and trilinear/tricubic interpolation.
# Usage (variables in pipelines/_run.sh):
#   INPUT_DIR=scans OUTPUT_DIR=runs/ct_sr pipelines/ct_superresolution.sh
#   INPUT_DIR=scans OUTPUT_DIR=/tmp/t TRAIN_SET="train.steps=20 model.width=4" pipelines/ct_superresolution.sh
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
INPUT_DIR=${INPUT_DIR:-data/ct}
OUTPUT_DIR=${OUTPUT_DIR:-runs/ct_superresolution}
CONFIG=${CONFIG:-$here/../configs/ct_sr_paired.yaml}
DEVICE=${DEVICE:-auto}
FACTORS=${FACTORS:-2,2,4}
WINDOW=${WINDOW:-chest-1024}
TASK=ct-sr
PREPROCESS_ARGS=(--factors "$FACTORS" --window "$WINDOW")
EVALUATE_ARGS=(--window "$WINDOW" --baseline trilinear,tricubic)
TRAIN_SET="data.factors=[$FACTORS] data.window=$WINDOW ${TRAIN_SET:-}"
source "$here/_run.sh"
run_pipeline
