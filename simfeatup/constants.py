"""Every number of the method that is not a dataset preset, in one place.

Section numbers ("SPEC n") refer to docs/method.md, the method as this repository implements it.
Dataset presets (class lines, thresholds) live in ``simfeatup/presets/*.yaml``.
"""

# SPEC 2.1 -- CLIP's normalisation, applied to 0..1 RGB values after the uint8 resize.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# SPEC 2.1 -- the long side of every image is resized to this before windowing.
LONG_SIDE = 448

# SPEC 2.2 -- sliding windows.
WINDOW = 224
STRIDE = 112

# SPEC 2.3 -- bicubic positional-embedding resize uses scale factors (n + 0.1) / grid.
POS_EMBED_SCALE_EPS = 0.1

# SPEC 2.5 -- logit = <f, t> + lambda * <c, t>.
DEFAULT_LAMBDA = -0.3

# SPEC 2.7 -- logits are multiplied by this before the softmax over queries.
LOGIT_SCALE = 50.0

# SPEC 2 / 5 -- defaults of the scores -> labels step when no preset says otherwise.
DEFAULT_PROB_THD = 0.0
DEFAULT_BG_IDX = 0

# SPEC 5 -- label value that evaluation ignores.
IGNORE_INDEX = 255

# SPEC 9 -- scene mode: blocks of this many pixels (16 strides) are read, segmented and written
# at a time; memory depends on it, the result never does.
DEFAULT_BLOCK = 1792

# SPEC 9 -- label of nodata pixels in scene outputs: the value evaluation ignores.
NODATA_LABEL = IGNORE_INDEX

# SPEC 2.3 -- default backbone.
DEFAULT_MODEL = "ViT-B-16"
DEFAULT_PRETRAINED = "openai"
