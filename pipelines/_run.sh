# Shared by the task recipes in this folder (sourced, not run): preprocess → train → infer → evaluate,
# through the `revgan-med` command only. The recipe sets TASK, PREPROCESS_ARGS, EVALUATE_ARGS and the
# defaults of the variables below; every one of them can be overridden from the environment.
#   INPUT_DIR   scans to learn from (NIfTI files / DICOM series; for ct-kernel <case>/source + <case>/target)
#   OUTPUT_DIR  everything goes here: prep/ run/ eval/ predictions/ metrics.csv figures/
#   CONFIG      training config (YAML)
#   DEVICE      auto | cpu | cuda
#   TRAIN_SET   extra config overrides, space-separated key=value items (e.g. "train.steps=100 model.width=8")
#   REVGAN_MED  the command to run (default: revgan-med on PATH)
# Re-running continues: preprocessed cases are skipped and training resumes from run/checkpoints/last.pt.

run_pipeline() {
    local cli=${REVGAN_MED:-revgan-med}
    local prep="$OUTPUT_DIR/prep" run="$OUTPUT_DIR/run" eval_dir="$OUTPUT_DIR/eval"
    mkdir -p "$OUTPUT_DIR"

    echo "== 1/4 preprocess $INPUT_DIR -> $prep"
    # exit 1 = some scans failed (named in prep/report.csv): go on with the others; 2 = usage error
    local status=0
    $cli preprocess "$INPUT_DIR" "$prep" --task "$TASK" "${PREPROCESS_ARGS[@]}" || status=$?
    if [ "$status" = 1 ]; then
        echo "pipeline: some scans failed to preprocess, see $prep/report.csv; going on without them" >&2
    elif [ "$status" != 0 ]; then
        return "$status"
    fi

    echo "== 2/4 train $CONFIG -> $run"
    local datalist
    datalist="$(cd "$prep" && pwd)/datalist.json"
    local overrides=(--set "data.datalist=$datalist" --set "train.device=$DEVICE")
    local item
    for item in ${TRAIN_SET:-}; do
        overrides+=(--set "$item")
    done
    if [ -f "$run/checkpoints/last.pt" ]; then
        $cli train --output "$run" --resume "${overrides[@]}"
    else
        $cli train --config "$CONFIG" --output "$run" "${overrides[@]}"
    fi
    local checkpoint="$run/checkpoints/best.pt"
    [ -f "$checkpoint" ] || checkpoint="$run/checkpoints/last.pt"

    echo "== 3/4 infer the validation cases with $checkpoint"
    # eval/{input,reference[,mask]}/<case>.nii.gz link to the preprocessed validation cases, so that
    # infer and evaluate work on whole folders matched by case name
    rm -rf "$eval_dir"
    mkdir -p "$eval_dir/input" "$eval_dir/reference"
    local case image target mask
    while read -r case image target mask; do
        ln -s "$image" "$eval_dir/input/$case.nii.gz"
        ln -s "$target" "$eval_dir/reference/$case.nii.gz"
        if [ -n "$mask" ]; then
            mkdir -p "$eval_dir/mask"
            ln -s "$mask" "$eval_dir/mask/$case.nii.gz"
        fi
    done < <(validation_cases "$datalist")
    $cli infer --checkpoint "$checkpoint" --input "$eval_dir/input" --output "$OUTPUT_DIR/predictions" \
        --device "$DEVICE"

    echo "== 4/4 evaluate -> $OUTPUT_DIR/metrics.csv"
    local mask_args=()
    [ -d "$eval_dir/mask" ] && mask_args=(--mask "$eval_dir/mask")
    mkdir -p "$OUTPUT_DIR/figures"
    $cli evaluate --prediction "$OUTPUT_DIR/predictions" --reference "$eval_dir/reference" \
        --input "$eval_dir/input" "${mask_args[@]}" --task "$TASK" "${EVALUATE_ARGS[@]}" \
        --output "$OUTPUT_DIR/metrics.csv" --figure "$OUTPUT_DIR/figures/case.png"
    echo "done: $OUTPUT_DIR/metrics.csv, figures in $OUTPUT_DIR/figures"
}

# "case image target mask" per validation case of a datalist (absolute paths; the training cases
# when there is no validation case)
validation_cases() {
    python3 - "$1" <<'PY'
import json, sys
from pathlib import Path

path = Path(sys.argv[1]).resolve()
datalist = json.loads(path.read_text())
cases = datalist.get("validation") or datalist["training"]
if not datalist.get("validation"):
    print("pipeline: no validation case, evaluating on the training cases", file=sys.stderr)
for entry in cases:
    files = {k: str(path.parent / v) for k, v in entry.items()}
    case = Path(entry["target"]).parent.name
    print(case, files["image"], files["target"], files.get("mask", ""))
PY
}
