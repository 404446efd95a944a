"""The numbers every command shares, defined once (and the version: pyproject.toml reads it here)."""

VERSION = "0.1.0"

MAX_LOGIT_DIFF = 1e-3  # above this largest |logit difference| a disentangled network is reported as broken ...
LOGIT_RTOL = 1e-5  # ... or above this share of the largest |logit|, when that is larger (float32 rounds at 6e-8)
DEFAULT_TAU = 0.03  # the paper's importance threshold tau (stage 4's rows, the layer command's candidates)
DEFAULT_P = 0.75  # share of a class's images for which a channel must be important (stage 2's p)
DEFAULT_GAMMA = 0.5  # the paper's gamma_high: concepts less alike than this are unrelated
NEAR_CHANCE = 2.0  # a model whose accuracy is below this many times chance (1/classes) is "near chance"


def logit_tolerance(scale: float) -> float:
    """The largest |logit difference| a disentangled network may have, for original logits up to ``scale`` in
    size: MAX_LOGIT_DIFF, or LOGIT_RTOL relative where that is more (logits above 100), since float32 sums
    round relative to their size (a split network of logits ~1e4 differs by ~1e-2 from rounding alone)."""
    return max(MAX_LOGIT_DIFF, LOGIT_RTOL * float(scale))

SEARCH_IMAGES = 500  # the searched split rule reads up to this many training images per concept ...
SEARCH_OTHERS = 2  # ... and this many times as many images of other classes as it took (its "everything else")
SEARCH_OTHER_CLASSES = 20  # classes outside every concept that may lend those images, drawn with the seed
SEARCH_BUDGET = 200  # at most this many moves per unit ...
SEARCH_PATIENCE = 10  # ... stopping once the held-out images' objective has not risen for this many
SEARCH_SCREEN = 64  # each step first scores this many inputs per concept and direction (all when none of them helps)
CLUSTER_TOP_N = 100  # concepts from clusters: each unit's strongest training images that are clustered ...
CLUSTER_K0 = 4  # ... into at most this many groups by k-means ...
CLUSTER_MIN_IMAGES = 10  # ... of which those of fewer images are dropped ...
CLUSTER_GAMMA = 0.5  # ... and those whose mean contributions are at least this alike merged (complete linkage)
CLUSTER_VAL_SHARE = 0.2  # without a val folder, this share of the images is held out to evaluate on
ABLATION = "absent"  # an ablated unit's output: its mean map over training images where its concepts are absent
# (or "mean" over all of them, "zero", or "none": no ablation pass)
STEER = 2.0  # steering multiplies a concept unit's output by this factor
EFFECTS_PER_CLASS = 25  # the ablation pass reads at most this many validation images of each class
CERTIFY_TOLERANCE = 0.25  # certified: own share >= 1 - t, cross share and elsewhere <= t (utils.method.effects); 6 x
# the largest bootstrap standard deviation of those shares on the digits CNN demo (0.036 at 25 images per class)
REFERENCE_IMAGES = 256  # the training images whose mean output is the ablations' reference
FUNCTION_TARGET = 0.5  # the functional split rule moves the fewest inputs that bring every predicted share within
# this fraction of --certify_tolerance (a margin for first-order and sampling error), or as near as it can
