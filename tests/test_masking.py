"""Tests for marlin_jax.masking: exact counts, region semantics, frequencies against a plain re-derivation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from marlin_jax import masking
from marlin_jax.masking import (BACKGROUND, HAIR, INNER_MOUTH, LEFT_BROW, LEFT_EYE, LOWER_LIP, NOSE,
                                NUM_LABELS, RIGHT_BROW, RIGHT_EYE, SKIN, STRATEGIES, UPPER_LIP)

FULL_TOKENS = 8 * 14 * 14
FULL_VISIBLE = 156
COMPONENTS = [RIGHT_BROW, LEFT_BROW, RIGHT_EYE, LEFT_EYE, NOSE, UPPER_LIP, INNER_MOUTH, LOWER_LIP, HAIR]


def _face_like_maps(seed: int, face_scale: float, frames: int = 16, size: int = 224) -> np.ndarray:
    """Label maps of a jittering cartoon face: an ellipse of skin with hair, brows, eyes, nose and lips."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    maps = np.empty((frames, size, size), np.uint8)
    for f in range(frames):
        cx, cy = 0.5 + rng.uniform(-0.04, 0.04, 2)
        x, y = (xx - cx) / face_scale, (yy - cy) / face_scale
        frame = np.full((size, size), BACKGROUND, np.uint8)
        frame[(x / 0.33) ** 2 + (y / 0.42) ** 2 <= 1] = SKIN
        frame[(frame == SKIN) & (y < -0.28)] = HAIR
        for label, x0, x1, y0, y1 in [(RIGHT_BROW, -0.22, -0.06, -0.20, -0.16),
                                      (LEFT_BROW, 0.06, 0.22, -0.20, -0.16),
                                      (RIGHT_EYE, -0.20, -0.08, -0.13, -0.08),
                                      (LEFT_EYE, 0.08, 0.20, -0.13, -0.08),
                                      (NOSE, -0.04, 0.04, -0.08, 0.08),
                                      (UPPER_LIP, -0.10, 0.10, 0.14, 0.17),
                                      (INNER_MOUTH, -0.08, 0.08, 0.17, 0.19),
                                      (LOWER_LIP, -0.10, 0.10, 0.19, 0.23)]:
            frame[(x >= x0) & (x < x1) & (y >= y0) & (y < y1)] = label
        maps[f] = frame
    return maps


def _touches_by_patch_loop(maps, patch_size, tubelet_size):
    """The obvious reference: for every patch of every tubelet's first frame, the set of its labels."""
    first_frames = maps[::tubelet_size]
    t, height, width = first_frames.shape
    touches = np.zeros((t, height // patch_size, width // patch_size, NUM_LABELS), bool)
    for k in range(t):
        for i in range(height // patch_size):
            for j in range(width // patch_size):
                block = first_frames[k, i * patch_size:(i + 1) * patch_size, j * patch_size:(j + 1) * patch_size]
                touches[k, i, j, np.unique(block)] = True
    return touches


def _reference_mask(rng, touches, has_face, strategy, visible_ratio):
    """The official sampling re-derived in plain Python/NumPy: one mask (N,) bool, True = visible."""
    tubelets, h, w, _ = touches.shape
    per_tubelet = touches.reshape(tubelets, h * w, NUM_LABELS)
    groups = [list(g) for g in masking.COMPONENT_GROUPS]
    if strategy in ("fasking", "fasking_opp"):
        shuffled = [groups[g] for g in rng.permutation(len(groups))]
        queue = shuffled + [[SKIN], [BACKGROUND]] if strategy == "fasking_opp" else [[BACKGROUND], [SKIN]] + shuffled
        keep = np.zeros((tubelets, h * w), bool)
        for t in range(tubelets):
            if not has_face[t]:
                keep[t] = True
                continue
            for label in (label for group in queue for label in group):
                keep[t] |= per_tubelet[t, :, label]
                if keep[t].mean() >= visible_ratio:
                    break
        keep = keep.reshape(-1)
    elif strategy == "tube":
        pattern = np.zeros(h * w, bool)
        pattern[rng.choice(h * w, math.ceil(h * w * visible_ratio), replace=False)] = True
        keep = np.tile(pattern, tubelets)
    elif strategy == "frame":
        chosen = np.zeros(tubelets, bool)
        chosen[rng.choice(tubelets, math.ceil(tubelets * visible_ratio), replace=False)] = True
        keep = np.repeat(chosen, h * w)
    else:
        keep = np.ones(tubelets * h * w, bool)
    visible = np.flatnonzero(keep)
    keep[rng.choice(visible, len(visible) - int(keep.size * visible_ratio), replace=False)] = False
    return keep


def _rows_occupancy(tubelets: int = 8) -> np.ndarray:
    """5x5 patches: each row holds one component group, no background or skin anywhere."""
    rows = [[RIGHT_BROW] * 3 + [RIGHT_EYE] * 2, [LEFT_BROW] * 3 + [LEFT_EYE] * 2, [NOSE] * 5,
            [UPPER_LIP] * 2 + [INNER_MOUTH] + [LOWER_LIP] * 2, [HAIR] * 5]
    labels = np.repeat(np.array(rows, np.uint8)[None], tubelets, axis=0)
    return labels[..., None] == np.arange(NUM_LABELS)


def _full_occupancy(seed=0, face_scale=1.0, has_map=None):
    return masking.occupancy_from_region_maps(_face_like_maps(seed, face_scale), has_map=has_map)


def test_occupancy_matches_patch_loop_reference():
    rng = np.random.default_rng(0)
    # Blocky random maps so that patches hold a few labels, not all eleven.
    blocks = rng.integers(0, NUM_LABELS, (16, 56, 56), dtype=np.uint8)
    maps = blocks.repeat(4, axis=1).repeat(4, axis=2)
    occupancy = masking.occupancy_from_region_maps(maps)
    assert occupancy.shape == (8, 14, 14, NUM_LABELS) and occupancy.dtype == bool
    np.testing.assert_array_equal(occupancy, _touches_by_patch_loop(maps, 16, 2))
    small = rng.integers(0, NUM_LABELS, (6, 20, 30), dtype=np.int64)
    np.testing.assert_array_equal(masking.occupancy_from_region_maps(small, patch_size=5, tubelet_size=3),
                                  _touches_by_patch_loop(small, 5, 3))


def test_occupancy_without_map_is_background_only_and_reads_first_frames():
    maps = _face_like_maps(1, 1.0)
    has_map = np.ones(16, bool)
    has_map[[2, 7]] = False  # frame 2 starts tubelet 1; frame 7 is the second frame of tubelet 3
    occupancy = masking.occupancy_from_region_maps(maps, has_map=has_map)
    np.testing.assert_array_equal(occupancy[1, ..., BACKGROUND], True)
    np.testing.assert_array_equal(occupancy[1, ..., 1:], False)
    np.testing.assert_array_equal(np.delete(occupancy, 1, axis=0),
                                  np.delete(masking.occupancy_from_region_maps(maps), 1, axis=0))


@pytest.mark.parametrize("bad_maps, kwargs, message", [
    (np.zeros((16, 224, 224), np.float32), {}, "integer array"),
    (np.zeros((224, 224), np.uint8), {}, "integer array"),
    (np.zeros((15, 224, 224), np.uint8), {}, "not divisible"),
    (np.zeros((16, 224, 220), np.uint8), {}, "not divisible"),
    (np.full((16, 224, 224), NUM_LABELS, np.uint8), {}, "labels must lie"),
    (np.full((16, 224, 224), -1, np.int32), {}, "labels must lie"),
    (np.zeros((16, 224, 224), np.uint8), {"has_map": np.ones(8, bool)}, "has_map"),
])
def test_occupancy_rejects_bad_input(bad_maps, kwargs, message):
    with pytest.raises(ValueError, match=message):
        masking.occupancy_from_region_maps(bad_maps, **kwargs)


def test_occupancy_ignores_labels_of_frames_without_map():
    maps = np.full((4, 32, 32), 255, np.uint8)
    occupancy = masking.occupancy_from_region_maps(maps, has_map=np.zeros(4, bool))
    np.testing.assert_array_equal(occupancy[..., BACKGROUND], True)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_exact_counts_single_jit_and_vmapped(strategy):
    has_map = np.ones(16, bool)
    has_map[4] = False
    occupancy = _full_occupancy(has_map=has_map)
    mask = masking.sample_mask(jax.random.key(0), occupancy, strategy)
    assert mask.shape == (FULL_TOKENS,) and mask.dtype == jnp.bool_ and int(mask.sum()) == FULL_VISIBLE

    inside_jit = jax.jit(lambda key, occ: masking.sample_mask(key, occ, strategy, 0.1))
    assert int(inside_jit(jax.random.key(1), occupancy).sum()) == FULL_VISIBLE

    batch = np.stack([_full_occupancy(seed, scale) for seed, scale in [(0, 1.0), (1, 1.6), (2, 0.7)]])
    masks = masking.sample_masks(jax.random.key(2), batch, strategy, 0.1)
    assert masks.shape == (3, FULL_TOKENS)
    np.testing.assert_array_equal(masks.sum(axis=1), FULL_VISIBLE)
    assert len({np.asarray(m).tobytes() for m in masks}) == 3


@pytest.mark.parametrize("strategy", ["fasking", "fasking_opp"])
def test_patches_touching_no_label_still_give_exact_counts(strategy):
    occupancy = np.zeros((8, 14, 14, NUM_LABELS), bool)
    occupancy[:, 0, :3, NOSE] = True  # 3 candidate patches per tubelet, far below the 20 needed
    mask = np.asarray(masking.sample_mask(jax.random.key(3), occupancy, strategy)).reshape(8, 14, 14)
    assert mask.sum() == FULL_VISIBLE
    assert mask[:, 0, :3].all()  # the real candidates come first, the rest is filled at random


def test_visible_ratio_one_shows_everything():
    mask = masking.sample_mask(jax.random.key(0), _full_occupancy(), "fasking", 1.0)
    assert bool(mask.all())


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_same_key_same_mask_other_key_other_mask(strategy):
    occupancy = _full_occupancy()
    first = masking.sample_mask(jax.random.key(7), occupancy, strategy)
    np.testing.assert_array_equal(first, masking.sample_mask(jax.random.key(7), occupancy, strategy))
    assert not np.array_equal(first, masking.sample_mask(jax.random.key(8), occupancy, strategy))


@pytest.mark.parametrize("face_scale", [1.0, 1.7])
def test_fasking_shows_background_or_skin_and_opposite_shows_components(face_scale):
    occupancy = _full_occupancy(seed=3, face_scale=face_scale)
    background_or_skin = occupancy[..., [BACKGROUND, SKIN]].any(axis=-1)
    component = occupancy[..., COMPONENTS].any(axis=-1)
    assert (background_or_skin.mean(axis=(1, 2)) >= 0.1).all() and (component.mean(axis=(1, 2)) >= 0.1).all()
    keys = jax.random.key(11)
    for strategy, allowed in [("fasking", background_or_skin), ("fasking_opp", component)]:
        masks = np.asarray(masking.sample_masks(keys, np.repeat(occupancy[None], 32, 0), strategy))
        assert allowed.reshape(-1)[masks.nonzero()[1]].all(), strategy
        if strategy == "fasking" and (occupancy[..., BACKGROUND].mean(axis=(1, 2)) >= 0.1).all():
            # Background comes first and suffices alone: skin-only patches stay hidden.
            assert occupancy[..., BACKGROUND].reshape(-1)[masks.nonzero()[1]].all()
    if face_scale > 1.5:  # background alone falls short here: skin must join in
        assert (occupancy[..., BACKGROUND].mean(axis=(1, 2)) < 0.1).any()


def test_component_order_is_drawn_once_per_clip_and_checked_per_label():
    occupancy = _rows_occupancy()  # 25 patches per tubelet, 8 needed, each group row holds 5
    masks = np.asarray(masking.sample_masks(jax.random.key(5), np.repeat(occupancy[None], 200, 0),
                                            "fasking", 0.3)).reshape(200, 8, 5, 5)
    rows_used = masks.any(axis=(1, 3)).sum(axis=1)
    # A shared order gives every tubelet the same two rows; per-tubelet orders would spread over more.
    np.testing.assert_array_equal(rows_used, 2)
    # After a first 5-patch row, a brow (3) or lip-and-mouth (2+1) prefix completes the 8 mid-group, so the
    # rest of that row is never reached: 8 positions used, in the 3 of 5 clips whose second group is one of
    # these. Checking only after whole groups would always use 10.
    positions_used = masks.any(axis=1).sum(axis=(1, 2))
    assert set(np.unique(positions_used)) <= {7, 8, 9, 10}
    assert 0.45 < (positions_used <= 8).mean() < 0.75


def _frequency_clip(kind: str):
    """Small clips (5x5 patches of 4 px, 3 tubelets) where the queue order changes the frequencies."""
    rng = np.random.default_rng(21)
    if kind == "rows":
        labels = _rows_occupancy(3).argmax(-1).astype(np.uint8)
        maps = labels.repeat(2, axis=0).repeat(4, axis=1).repeat(4, axis=2)
        return maps, np.ones(6, bool)
    # "mixed": components decide; "sparse": background alone sometimes suffices, components often fall short.
    background, skin, second_label = (0.12, 0.12, 0.4) if kind == "mixed" else (0.3, 0.6, 0.15)
    weights = [background, skin] + [(1 - background - skin) / 9] * 9
    main = rng.choice(NUM_LABELS, (6, 5, 5), p=weights).astype(np.uint8)
    maps = main.repeat(4, axis=1).repeat(4, axis=2)
    corners = rng.random((6, 5, 5)) < second_label
    maps[:, ::4, ::4][corners] = rng.integers(0, NUM_LABELS, corners.sum())
    has_map = np.array([True, True, True, True, False, True])  # tubelet 2 has no face
    return maps, has_map


@pytest.mark.parametrize("kind, strategy", [(k, s) for k in ("rows", "sparse") for s in ("fasking", "fasking_opp")]
                         + [("mixed", s) for s in STRATEGIES])
def test_token_frequencies_match_plain_reference(kind, strategy):
    maps, has_map = _frequency_clip(kind)
    visible_ratio, draws_jax, draws_ref = 0.3, 1000, 3000
    occupancy = masking.occupancy_from_region_maps(maps, patch_size=4, has_map=has_map)
    masks = masking.sample_masks(jax.random.key(99), np.repeat(occupancy[None], draws_jax, 0),
                                 strategy, visible_ratio)
    freq_jax = np.asarray(masks).mean(axis=0)

    rng = np.random.default_rng(99)
    touches = _touches_by_patch_loop(maps, 4, 2)
    has_face = has_map[::2]
    freq_ref = np.mean([_reference_mask(rng, touches, has_face, strategy, visible_ratio)
                        for _ in range(draws_ref)], axis=0)
    pooled = (freq_jax * draws_jax + freq_ref * draws_ref) / (draws_jax + draws_ref)
    sigma = np.sqrt(pooled * (1 - pooled) * (1 / draws_jax + 1 / draws_ref))
    np.testing.assert_array_less(np.abs(freq_jax - freq_ref), 5 * sigma + 1e-3)
    assert freq_ref.std() > 0.02 or strategy in ("random", "tube", "frame")  # the order mattered


def test_tube_repeats_one_pattern_and_frame_keeps_one_tubelet():
    occupancy = _full_occupancy()
    for seed in range(5):
        tube = np.asarray(masking.sample_mask(jax.random.key(seed), occupancy, "tube")).reshape(8, 196)
        assert tube.any(axis=0).sum() == math.ceil(196 * 0.1)  # 160 tiled, 4 trimmed: no position lost
        frame = np.asarray(masking.sample_mask(jax.random.key(seed), occupancy, "frame")).reshape(8, 196)
        assert (frame.sum(axis=1) > 0).sum() == 1


@pytest.mark.parametrize("strategy", ["fasking", "fasking_opp"])
def test_clip_without_any_map_falls_back_to_uniform(strategy):
    occupancy = _full_occupancy(has_map=np.zeros(16, bool))
    masks = np.asarray(masking.sample_masks(jax.random.key(4), np.repeat(occupancy[None], 400, 0), strategy))
    per_tubelet = masks.reshape(400, 8, 196).sum(axis=(0, 2)) / 400
    np.testing.assert_allclose(per_tubelet, FULL_VISIBLE / 8, rtol=0.08)
    assert masks.any(axis=0).all()


@pytest.mark.parametrize("occupancy, strategy, ratio, message", [
    (np.zeros((8, 14, 14, 10), bool), "fasking", 0.1, "occupancy must have shape"),
    (np.zeros((14, 14, NUM_LABELS), bool), "fasking", 0.1, "occupancy must have shape"),
    (np.zeros((8, 14, 14, NUM_LABELS), np.uint8), "fasking", 0.1, "occupancy must be bool"),
    (np.zeros((8, 14, 14, NUM_LABELS), bool), "face", 0.1, "unknown mask strategy"),
    (np.zeros((8, 14, 14, NUM_LABELS), bool), "random", 0.0, "visible_ratio must lie"),
    (np.zeros((8, 14, 14, NUM_LABELS), bool), "random", 1.5, "visible_ratio must lie"),
    (np.zeros((8, 14, 14, NUM_LABELS), bool), "random", -0.1, "visible_ratio must lie"),
    (np.zeros((8, 14, 14, NUM_LABELS), bool), "random", 1e-4, "no visible token"),
])
def test_sample_mask_rejects_bad_input(occupancy, strategy, ratio, message):
    with pytest.raises(ValueError, match=message):
        masking.sample_mask(jax.random.key(0), occupancy, strategy, ratio)


def test_sample_masks_needs_a_batch_axis():
    with pytest.raises(ValueError, match=r"occupancy must have shape \(B, "):
        masking.sample_masks(jax.random.key(0), _full_occupancy(), "fasking", 0.1)


def test_num_visible_tokens():
    assert masking.num_visible_tokens(1568, 0.1) == 156
    assert masking.num_visible_tokens(100, 0.29) == 29  # plain int(100 * 0.29) would give 28
    assert masking.num_visible_tokens(1568, 1.0) == 1568


def test_mask_to_indices_matches_nonzero_order():
    masks = masking.sample_masks(jax.random.key(6), np.repeat(_full_occupancy()[None], 3, 0), "fasking")
    visible_idx, masked_idx = masking.mask_to_indices(masks, FULL_VISIBLE)
    assert visible_idx.dtype == jnp.int32 and masked_idx.dtype == jnp.int32
    assert visible_idx.shape == (3, FULL_VISIBLE) and masked_idx.shape == (3, FULL_TOKENS - FULL_VISIBLE)
    tokens = np.random.default_rng(0).normal(size=(FULL_TOKENS, 4))
    for mask, visible, masked in zip(np.asarray(masks), np.asarray(visible_idx), np.asarray(masked_idx)):
        np.testing.assert_array_equal(visible, np.nonzero(mask)[0])
        np.testing.assert_array_equal(masked, np.nonzero(~mask)[0])
        np.testing.assert_array_equal(tokens[visible], tokens[mask])


def test_mask_to_indices_rejects_bad_input():
    with pytest.raises(ValueError, match="num_visible"):
        masking.mask_to_indices(jnp.ones(10, bool), 11)
    with pytest.raises(ValueError, match="bool"):
        masking.mask_to_indices(jnp.ones(10, jnp.int32), 5)
