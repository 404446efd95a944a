"""The numbers every command shares, defined once."""

MAX_LOGIT_DIFF = 1e-3  # above this largest |logit difference| a disentangled network is reported as broken
DEFAULT_TAU = 0.03  # the paper's importance threshold tau (stage 4's rows, the layer command's candidates)
DEFAULT_P = 0.75  # share of a class's images for which a channel must be important (stage 2's p)
DEFAULT_GAMMA = 0.5  # the paper's gamma_high: concepts less alike than this are unrelated
NEAR_CHANCE = 2.0  # a model whose accuracy is below this many times chance (1/classes) is "near chance"
