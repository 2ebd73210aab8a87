"""Which video tokens the MARLIN encoder sees: region-aware ("Fasking") and VideoMAE-style masks.

A clip of T frames at H x W pixels is cut into tubelets of `tubelet_size` frames and `patch_size`-pixel
squares, giving N = T' * h * w tokens ordered (t, h, w). A mask is an (N,) bool array, True = visible.

The region strategies read a face-parsing map per frame (the LaPa label space below, as produced by the
official FaRL parser). Per tubelet, and only from its FIRST frame, a patch "touches" a label when any of its
pixels carries it (`occupancy_from_region_maps`, done on the host). `sample_mask` then makes label groups
visible in a queue order until the tubelet's visible share reaches `visible_ratio`, and trims the clip's
visible set uniformly at random to exactly `num_visible_tokens(N, visible_ratio)` tokens, so that every mask
of a run has the same static count (what XLA needs for the token gather).

Strategies (the official `mask_strategy` names):
  fasking      background, skin, then the five facial components in a random group order: components
               are masked first, which is MARLIN's pre-training default.
  fasking_opp  components (random group order), then skin, then background.
  random       uniform over all tokens.
  tube         one random spatial pattern of ceil(h*w*r) patches repeated over every tubelet.
  frame        ceil(T'*r) whole tubelets at random.
The component group order is drawn once per clip and shared by its tubelets; coverage is checked after each
label inside a group, as the official loop does. `frame` and `tube` end with the same clip-level trim as the
others, so with the defaults (156 of 1568) `tube` keeps 156 of its 160 repeated patches and `frame` 156 of
the 196 patches of its single tubelet, as in the official code.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from marlin_jax.face_labels import (BACKGROUND, HAIR, INNER_MOUTH, LEFT_BROW, LEFT_EYE, LOWER_LIP, NOSE,
                                    NUM_LABELS, RIGHT_BROW, RIGHT_EYE, SKIN, UPPER_LIP)

# The official queue groups; within a group the labels are added in this order.
COMPONENT_GROUPS = (
    (RIGHT_BROW, RIGHT_EYE),
    (LEFT_BROW, LEFT_EYE),
    (NOSE,),
    (UPPER_LIP, INNER_MOUTH, LOWER_LIP),
    (HAIR,),
)
STRATEGIES = ("fasking", "fasking_opp", "random", "tube", "frame")

_COMPONENT_LABELS = np.array([label for group in COMPONENT_GROUPS for label in group])
_GROUP_OF_COMPONENT = np.array([g for g, group in enumerate(COMPONENT_GROUPS) for _ in group])
_PLACE_IN_GROUP = np.array([i for group in COMPONENT_GROUPS for i in range(len(group))])
_MAX_GROUP_SIZE = max(len(group) for group in COMPONENT_GROUPS)

# Product roundings are taken at this tolerance, so that e.g. 100 * 0.29 counts as 29, not 28.99999999999.
_ROUNDING_DIGITS = 9


def num_visible_tokens(num_tokens: int, visible_ratio: float) -> int:
    """Visible tokens per clip: floor(num_tokens * visible_ratio), 156 for 1568 tokens at 0.1."""
    return math.floor(round(num_tokens * visible_ratio, _ROUNDING_DIGITS))


def _ceil_share(count: int, visible_ratio: float) -> int:
    return math.ceil(round(count * visible_ratio, _ROUNDING_DIGITS))


def occupancy_from_region_maps(
    region_maps: np.ndarray,
    patch_size: int = 16,
    tubelet_size: int = 2,
    has_map: np.ndarray | None = None,
) -> np.ndarray:
    """(T, H, W) integer label maps -> (T/tubelet, H/patch, W/patch, NUM_LABELS) bool, on the host (NumPy).

    Entry [t, i, j, l] says whether patch (i, j) of tubelet t's first frame has any pixel of label l.
    `has_map` (T,) marks frames the face parser found a face in; a tubelet whose first frame has none is read
    as all background. Both fasking orders then reach background with nothing else covered, so every patch
    of that tubelet becomes a candidate: the official all-visible fallback, which after the clip-level trim
    makes that tubelet's tokens drawn uniformly at random, like the `random` strategy.
    """
    maps = np.asarray(region_maps)
    first_frames = _validated_first_frames(maps, patch_size, tubelet_size)
    labelled = first_frames
    if has_map is not None:
        has_map = np.asarray(has_map)
        if has_map.shape != maps.shape[:1] or has_map.dtype != bool:
            raise ValueError(f"has_map must be a bool array of shape ({maps.shape[0]},), got "
                             f"{has_map.dtype} {has_map.shape}")
        labelled = first_frames[has_map[::tubelet_size]]
    if labelled.size and (labelled.min() < 0 or labelled.max() >= NUM_LABELS):
        raise ValueError(f"region_maps labels must lie in [0, {NUM_LABELS}), got "
                         f"[{labelled.min()}, {labelled.max()}]")
    # One bit per label, OR-ed over each patch: a single pass instead of one max-pool per label. The patch
    # rows are OR-ed as whole contiguous slices first, which is several times faster than one reduction
    # over both strided patch axes.
    t, height, width = first_frames.shape
    label_bits = np.left_shift(np.uint16(1), first_frames.astype(np.uint16, copy=False))
    rows = label_bits.reshape(t, height // patch_size, patch_size, width // patch_size, patch_size)
    patch_columns = rows[:, :, 0].copy()
    for row in range(1, patch_size):
        patch_columns |= rows[:, :, row]
    present = np.bitwise_or.reduce(patch_columns, axis=-1)
    if has_map is not None:
        present = np.where(has_map[::tubelet_size, None, None], present, np.uint16(1 << BACKGROUND))
    return ((present[..., None] >> np.arange(NUM_LABELS, dtype=np.uint16)) & 1).astype(bool)


def _validated_first_frames(maps: np.ndarray, patch_size: int, tubelet_size: int) -> np.ndarray:
    if maps.ndim != 3 or maps.size == 0 or not np.issubdtype(maps.dtype, np.integer):
        raise ValueError(f"region_maps must be a non-empty integer array (T, H, W), got {maps.dtype} {maps.shape}")
    frames, height, width = maps.shape
    if frames % tubelet_size or height % patch_size or width % patch_size:
        raise ValueError(f"region_maps shape {maps.shape} is not divisible into tubelets of {tubelet_size} "
                         f"frames and {patch_size}x{patch_size}-pixel patches")
    return maps[::tubelet_size]


def _check_sampling_args(occupancy: jax.Array, leading_dims: int, strategy: str, visible_ratio: float) -> int:
    """Raises ValueError on bad arguments; returns the number of visible tokens per clip."""
    expected = ("B, " * leading_dims) + f"T', h, w, {NUM_LABELS}"
    if occupancy.ndim != leading_dims + 4 or occupancy.shape[-1] != NUM_LABELS:
        raise ValueError(f"occupancy must have shape ({expected}), got {occupancy.shape}")
    if occupancy.dtype != jnp.bool_:
        raise ValueError(f"occupancy must be bool, got {occupancy.dtype}")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown mask strategy {strategy!r}; expected one of {STRATEGIES}")
    if not 0.0 < visible_ratio <= 1.0:
        raise ValueError(f"visible_ratio must lie in (0, 1], got {visible_ratio}")
    num_tokens = math.prod(occupancy.shape[-4:-1])
    num_visible = num_visible_tokens(num_tokens, visible_ratio)
    if num_visible == 0:
        raise ValueError(f"visible_ratio {visible_ratio} leaves no visible token out of {num_tokens}")
    return num_visible


def _choose_exactly(key: jax.Array, candidates: jax.Array, count: int) -> jax.Array:
    """A (n,) mask of exactly `count` True, uniform among candidates; topped up from the rest if too few.

    The official code cannot have too few candidates with complete label maps (it would crash); an
    occupancy with patches that touch no label can, and then random non-candidates fill the gap.
    """
    shuffled = jax.random.permutation(key, candidates.shape[0])
    # A stable sort keeps the random order within candidates and within non-candidates.
    ranked = shuffled[jnp.argsort(~candidates[shuffled], stable=True)]
    return jnp.zeros_like(candidates).at[ranked[:count]].set(True)


def _fasking_label_order(key: jax.Array, components_first: bool) -> jax.Array:
    """The NUM_LABELS labels in the order they are made visible, component groups shuffled."""
    # A uniform permutation read as "queue position of group g" is a uniform group order.
    group_position = jax.random.permutation(key, len(COMPONENT_GROUPS))
    component_position = group_position[_GROUP_OF_COMPONENT] * _MAX_GROUP_SIZE + _PLACE_IN_GROUP
    last = len(COMPONENT_GROUPS) * _MAX_GROUP_SIZE
    if components_first:
        background_skin_position = jnp.array([last + 1, last])
    else:
        background_skin_position = jnp.array([-2, -1])
    position = jnp.zeros(NUM_LABELS, jnp.int32)
    position = position.at[jnp.array([BACKGROUND, SKIN])].set(background_skin_position)
    position = position.at[_COMPONENT_LABELS].set(component_position)
    return jnp.argsort(position)


def _fasking_candidates(key: jax.Array, occupancy: jax.Array, components_first: bool,
                        visible_ratio: float) -> jax.Array:
    """(N,) candidate tokens: per tubelet, labels in queue order until the visible share is reached."""
    tubelets, h, w, _ = occupancy.shape
    order = _fasking_label_order(key, components_first)
    touched_in_order = occupancy.reshape(tubelets, h * w, NUM_LABELS)[..., order]
    visible_after_step = jnp.cumsum(touched_in_order, axis=-1) > 0
    reached = visible_after_step.sum(axis=1) >= _ceil_share(h * w, visible_ratio)
    # The first label whose addition reaches the target; all labels if none does (incomplete maps).
    stop = jnp.where(reached.any(axis=1), jnp.argmax(reached, axis=1), NUM_LABELS - 1)
    visible = jnp.take_along_axis(visible_after_step, stop[:, None, None], axis=-1)
    return visible.reshape(-1)


def _candidates(key: jax.Array, occupancy: jax.Array, strategy: str, visible_ratio: float) -> jax.Array:
    """(N,) tokens the clip-level trim chooses among, per strategy (the official gen_mask + tube/frame)."""
    tubelets, h, w, _ = occupancy.shape
    patches = h * w
    if strategy in ("fasking", "fasking_opp"):
        return _fasking_candidates(key, occupancy, strategy == "fasking_opp", visible_ratio)
    if strategy == "tube":
        pattern = _choose_exactly(key, jnp.ones(patches, bool), _ceil_share(patches, visible_ratio))
        return jnp.tile(pattern, tubelets)
    if strategy == "frame":
        kept = _choose_exactly(key, jnp.ones(tubelets, bool), _ceil_share(tubelets, visible_ratio))
        return jnp.repeat(kept, patches)
    return jnp.ones(tubelets * patches, bool)


@functools.partial(jax.jit, static_argnames=("strategy", "visible_ratio"))
def sample_mask(key: jax.Array, occupancy: jax.Array, strategy: str = "fasking",
                visible_ratio: float = 0.1) -> jax.Array:
    """(T', h, w, NUM_LABELS) bool occupancy -> (N,) bool mask, True = visible, in (t, h, w) token order.

    Exactly `num_visible_tokens(N, visible_ratio)` tokens are visible. `strategy` and `visible_ratio` are
    static. `random`, `tube` and `frame` use the occupancy only for its shape.
    """
    num_visible = _check_sampling_args(occupancy, 0, strategy, visible_ratio)
    candidates_key, trim_key = jax.random.split(key)
    candidates = _candidates(candidates_key, occupancy, strategy, visible_ratio)
    return _choose_exactly(trim_key, candidates, num_visible)


@functools.partial(jax.jit, static_argnames=("strategy", "visible_ratio"))
def sample_masks(key: jax.Array, occupancy_batch: jax.Array, strategy: str = "fasking",
                 visible_ratio: float = 0.1) -> jax.Array:
    """(B, T', h, w, NUM_LABELS) bool -> (B, N) bool masks, one independent key per clip."""
    _check_sampling_args(occupancy_batch, 1, strategy, visible_ratio)
    keys = jax.random.split(key, occupancy_batch.shape[0])
    sample = functools.partial(sample_mask, strategy=strategy, visible_ratio=visible_ratio)
    return jax.vmap(sample)(keys, occupancy_batch)


@functools.partial(jax.jit, static_argnames="num_visible")
def mask_to_indices(mask: jax.Array, num_visible: int) -> tuple[jax.Array, jax.Array]:
    """(..., N) bool masks -> (visible_idx (..., num_visible), masked_idx (..., N - num_visible)) int32.

    Both ascending, i.e. the order PyTorch's `x[mask]` / `x[~mask]` gives. Every mask must hold exactly
    `num_visible` True (as `sample_mask` guarantees); this is not checked, as it depends on traced values.
    """
    if mask.dtype != jnp.bool_ or mask.ndim < 1:
        raise ValueError(f"mask must be a bool array (..., N), got {mask.dtype} {mask.shape}")
    if not 0 <= num_visible <= mask.shape[-1]:
        raise ValueError(f"num_visible must lie in [0, {mask.shape[-1]}], got {num_visible}")
    # Stable: visible tokens first, each side in ascending token order.
    order = jnp.argsort(~mask, axis=-1, stable=True).astype(jnp.int32)
    return order[..., :num_visible], order[..., num_visible:]
