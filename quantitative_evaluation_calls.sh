#!/usr/bin/env bash
# The paper's 20 quantitative evaluations (ResNet-50, ImageNet): get_results.py --get_quantitative
# once per channel/concept triple, then the averaged table (summarize_results.py).
# Run disentanglement_calls.sh first. Each evaluation replaces its own CSVs, so reruns are safe.
#
# Usage:  bash quantitative_evaluation_calls.sh [--dry-run] [DATA_DIR [STORE_DIR [OUT_DIR]]]
#
# Settings (environment variables; positional arguments override DATA_DIR, STORE_DIR, OUT_DIR):
#   DATA_DIR     ImageFolder root with train/ and val/ (e.g. /datasets/imagenet)       required
#   STORE_DIR    folder holding models_disentangled/ (from disentanglement_calls.sh)   required
#   OUT_DIR      where results_quantitative/ goes                        (default: .)
#   MODEL        torchvision model name                                 (default: resnet50)
#   NR_CHANNELS  channels of the layer of interest, checked             (default: 2048)
#   TAU          --proportion_attribution_required                      (default: 0.03)
#   PYTHON       Python interpreter                                      (default: python)
#   EXTRA_ARGS   more flags for every call, e.g. "--batch_size 128 --gpu 0"   (default: none)
#   DRY_RUN=1    print the commands instead of running them (same as --dry-run)
# A failing call is reported and the others still run; the table covers the pairs that finished.
set -u
HERE="$(cd "$(dirname "$0")" && pwd)"

DRY_RUN="${DRY_RUN:-0}"
POS=()
for arg in "$@"; do
    case "$arg" in
        --dry-run|-n) DRY_RUN=1 ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) POS+=("$arg") ;;
    esac
done
[ "${#POS[@]}" -ge 1 ] && DATA_DIR="${POS[0]}"
[ "${#POS[@]}" -ge 2 ] && STORE_DIR="${POS[1]}"
[ "${#POS[@]}" -ge 3 ] && OUT_DIR="${POS[2]}"
OUT_DIR="${OUT_DIR:-.}"
MODEL="${MODEL:-resnet50}"
NR_CHANNELS="${NR_CHANNELS:-2048}"
TAU="${TAU:-0.03}"
PYTHON="${PYTHON:-python}"
EXTRA_ARGS="${EXTRA_ARGS:-}"
if [ "$DRY_RUN" = 1 ]; then
    DATA_DIR="${DATA_DIR:-\$DATA_DIR}"
    STORE_DIR="${STORE_DIR:-\$STORE_DIR}"
elif [ -z "${DATA_DIR:-}" ] || [ -z "${STORE_DIR:-}" ]; then
    echo "error: set DATA_DIR and STORE_DIR (environment or: bash $0 DATA_DIR STORE_DIR [OUT_DIR]); --dry-run to only print" >&2
    exit 2
fi

# print a command so that it can be pasted back into a shell ($VAR placeholders of a dry run stay readable)
show() {
    local w out=()
    for w in "$@"; do
        if [[ "$w" =~ ^[A-Za-z0-9_./:=@%+,\$-]+$ ]]; then out+=("$w"); else out+=("$(printf '%q' "$w")"); fi
    done
    echo "${out[*]}"
}

# channel class1 class2 (the paper's 20 triples)
TRIPLES="
522 62 687
1404 385 834
895 631 946
242 515 619
522 61 687
1660 530 938
242 515 846
242 619 808
895 467 946
242 808 846
1349 27 889
1832 852 984
1773 791 958
1349 27 486
1698 57 515
1698 57 808
1698 58 515
1698 58 808
1698 53 515
1698 53 808
"

run() {
    if [ "$DRY_RUN" = 1 ]; then
        show "$@"
    else
        "$@"
    fi
}

failed=()
while read -r channel class1 class2; do
    [ -z "$channel" ] && continue
    [ "$DRY_RUN" = 1 ] || echo "== channel $channel: $class1 vs $class2"
    # shellcheck disable=SC2086  # EXTRA_ARGS is split into words on purpose
    run "$PYTHON" "$HERE/get_results.py" --data_dir "$DATA_DIR" --model_dir "$STORE_DIR/models_disentangled/" \
        --model "$MODEL" --nr_channels_in_layer_of_interest "$NR_CHANNELS" --layer_of_interest last_conv \
        --classes_for_concept1 "$class1" --classes_for_concept2 "$class2" --channel_of_interest "$channel" \
        --get_quantitative --proportion_attribution_required "$TAU" --out_dir "$OUT_DIR" --no_progress $EXTRA_ARGS \
        || failed+=("$channel:$class1/$class2")
done <<< "$TRIPLES"

[ "${#failed[@]}" -gt 0 ] && echo "failed: ${failed[*]}" >&2
run "$PYTHON" "$HERE/summarize_results.py" --results_dir "$OUT_DIR/results_quantitative"
rc=$?
[ "${#failed[@]}" -gt 0 ] && exit 1
exit "$rc"
