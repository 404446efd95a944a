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

USAGE="bash $0 DATA_DIR STORE_DIR [OUT_DIR]"
# shellcheck source=paper_calls_common.sh
source "$HERE/paper_calls_common.sh"

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
