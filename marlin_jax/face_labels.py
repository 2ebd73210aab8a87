"""The face-region label values, shared by the region maps (`marlin_jax.faces`) and Fasking (`marlin_jax.masking`).

They are the LaPa labels of the face parser the official MARLIN uses (FaRL trained on LaPa); right/left are
the SUBJECT's right/left.
"""

import types

BACKGROUND = 0
SKIN = 1
RIGHT_BROW = 2
LEFT_BROW = 3
RIGHT_EYE = 4
LEFT_EYE = 5
NOSE = 6
UPPER_LIP = 7
INNER_MOUTH = 8
LOWER_LIP = 9
HAIR = 10
NUM_LABELS = 11

# Region name -> label value (read-only; iterates in label order).
REGION_LABELS = types.MappingProxyType({
    "background": BACKGROUND,
    "skin": SKIN,
    "right_brow": RIGHT_BROW,
    "left_brow": LEFT_BROW,
    "right_eye": RIGHT_EYE,
    "left_eye": LEFT_EYE,
    "nose": NOSE,
    "upper_lip": UPPER_LIP,
    "inner_mouth": INNER_MOUTH,
    "lower_lip": LOWER_LIP,
    "hair": HAIR,
})
