#!/usr/bin/env bash
# The paper's 20 disentanglements (ResNet-50, ImageNet): disentangle_channel.py once per
# channel/concept triple (channel, class1, class2: the triples the paper evaluates).
#
# Usage:  bash disentanglement_calls.sh [--dry-run] [DATA_DIR [STORE_DIR]]
#
# Settings (environment variables; positional arguments override DATA_DIR and STORE_DIR):
#   DATA_DIR     ImageFolder root with train/ and val/ (e.g. /datasets/imagenet)       required
#   STORE_DIR    folder of the stage-1 store; the disentanglements go to
#                STORE_DIR/models_disentangled/                                           required
#   MODEL        torchvision model name                                 (default: resnet50)
#   NR_CHANNELS  channels of the layer of interest, checked             (default: 2048)
#   PYTHON       Python interpreter                                      (default: python)
#   EXTRA_ARGS   more flags for every call, e.g. "--batch_size 128 --gpu 0"   (default: none)
#   DRY_RUN=1    print the commands instead of running them (same as --dry-run)
# A failing call is reported and the others still run; the exit status is 1 if any failed.
set -u
HERE="$(cd "$(dirname "$0")" && pwd)"

USAGE="bash $0 DATA_DIR STORE_DIR"
# shellcheck source=paper_calls_common.sh
source "$HERE/paper_calls_common.sh"

failed=()
while read -r channel class1 class2; do
    [ -z "$channel" ] && continue
    # shellcheck disable=SC2206  # EXTRA_ARGS is split into words on purpose
    cmd=("$PYTHON" "$HERE/disentangle_channel.py" --data_dir "$DATA_DIR" --model "$MODEL"
         --nr_channels_in_layer_of_interest "$NR_CHANNELS" --channel_disentangle "$channel"
         --classes_for_concept1 "$class1" --classes_for_concept2 "$class2" --store_dir "$STORE_DIR" $EXTRA_ARGS)
    if [ "$DRY_RUN" = 1 ]; then
        show "${cmd[@]}"
    else
        echo "== channel $channel: $class1 vs $class2"
        "${cmd[@]}" || failed+=("$channel:$class1/$class2")
    fi
done <<< "$TRIPLES"

if [ "${#failed[@]}" -gt 0 ]; then
    echo "failed: ${failed[*]}" >&2
    exit 1
fi
