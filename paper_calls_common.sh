# Shared by disentanglement_calls.sh and quantitative_evaluation_calls.sh (sourced, not run):
# flags and positional arguments, the settings' defaults, `show` and the paper's 20 triples.
# Expects HERE and the caller's usage line in USAGE.

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
    echo "error: set DATA_DIR and STORE_DIR (environment or: $USAGE); --dry-run to only print" >&2
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
