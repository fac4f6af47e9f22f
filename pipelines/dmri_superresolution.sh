#!/usr/bin/env bash
# Diffusion-MRI super-resolution of 6-channel DTI volumes (thesis §5.3): DWI NIfTI files with .bval/.bvec
# beside them are fitted to tensors (or 6-channel DTI NIfTI files are used as given), thick-sliced by
# FACTORS, learned back with a paired RevGAN, and evaluated with RMSE in the brain mask and its interior.
# Usage (variables in pipelines/_run.sh):
#   INPUT_DIR=dwi OUTPUT_DIR=runs/dmri_sr pipelines/dmri_superresolution.sh
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
INPUT_DIR=${INPUT_DIR:-data/dwi}
OUTPUT_DIR=${OUTPUT_DIR:-runs/dmri_superresolution}
CONFIG=${CONFIG:-$here/../configs/dmri_sr_paired.yaml}
DEVICE=${DEVICE:-auto}
FACTORS=${FACTORS:-2,2,2}
TASK=dmri-sr
PREPROCESS_ARGS=(--factors "$FACTORS")
EVALUATE_ARGS=(--baseline trilinear,tricubic)
TRAIN_SET="data.factors=[$FACTORS] ${TRAIN_SET:-}"
source "$here/_run.sh"
run_pipeline
