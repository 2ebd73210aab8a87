"""The pure train step: accumulation, remat, decoder-masking shapes, frozen tables, schedules, config errors.

The step's losses and updates against the official iteration are in tests/test_reference_iteration.py; bf16
compute with remat on float32 parameters, in a real run, in tests/test_default_compute_path.py.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from marlin_jax.architectures import VIT_TINY
from marlin_jax.training.schedules import per_epoch, warmup_cosine
from marlin_jax.pretraining.state import init_train_state, make_optimizer
from marlin_jax.pretraining.step import StepSettings, make_train_step, prepare_batch
from marlin_jax.config_builders import pretrain_config
from official_lr import official_lr_curve, official_lr_per_batch

ARCH = VIT_TINY


def _config(**overrides):
    config = pretrain_config(ARCH, "tiny_test", "tiny").unlock()
    config.model = ARCH.to_dict()
    for key, value in overrides.items():
        config[key] = value
    return config


def _batch(batch_size: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    t, h, w = ARCH.grid
    occupancy = rng.random((batch_size, t, h, w, 11)) < 0.3
    occupancy[..., 0] |= ~occupancy.any(-1)  # every patch touches some label
    return {"video": rng.integers(0, 256, (batch_size, ARCH.num_frames, ARCH.img_size, ARCH.img_size, 3), np.uint8),
            "occupancy": occupancy}


def _initial_state(g_tx, d_tx):
    # jit: an eager init runs the model op by op, each op compiled on its own (seconds).
    return jax.jit(lambda key: nn.meta.unbox(init_train_state(key, ARCH, g_tx, d_tx)))(jax.random.key(0))


def _setup(config, lr: float = 1e-3):
    settings = StepSettings.from_config(config, ARCH)
    schedule = optax.constant_schedule(lr)
    g_tx = make_optimizer(config.optimizer)
    d_tx = make_optimizer(config.optimizer)
    return settings, g_tx, d_tx, schedule, _initial_state(g_tx, d_tx)


def _max_difference(a, b) -> float:
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree_util.tree_leaves(a),
                                                               jax.tree_util.tree_leaves(b)))


@pytest.mark.slow
def test_gradient_accumulation_matches_the_full_batch():
    # Plain SGD makes the parameter change linear in the gradients (Adam's first step is ~sign(g), which
    # would magnify float noise in near-zero gradients).
    settings = StepSettings.from_config(_config(), ARCH)
    accumulated = StepSettings.from_config(_config(grad_accum_steps=2), ARCH)
    sgd, schedule = optax.sgd(1.0), optax.constant_schedule(1.0)  # the step scales updates by the schedule
    state = _initial_state(sgd, sgd)
    full = jax.jit(make_train_step(settings, sgd, sgd, schedule))
    micro = jax.jit(make_train_step(accumulated, sgd, sgd, schedule))
    batch, key = _batch(4, 7), jax.random.key(3)
    state_full, metrics_full = full(state, batch, key)
    state_micro, metrics_micro = micro(state, batch, key)
    assert _max_difference(state_full.generator, state.generator) > 1e-4
    assert _max_difference(state_full, state_micro) <= 1e-5
    np.testing.assert_allclose(metrics_full["rec_loss"], metrics_micro["rec_loss"], rtol=1e-5)


def test_decoder_masking_reconstructs_a_share_of_masked_tokens():
    settings = StepSettings.from_config(_config(decoder_mask_ratio=0.5), ARCH)
    clips = prepare_batch(settings, _batch(2, 0), jax.random.key(0))
    num_masked = ARCH.num_tokens - settings.num_visible
    assert clips.masked_idx.shape == (2, round(num_masked * 0.5))
    assert clips.target.shape == (2, round(num_masked * 0.5), ARCH.patch_dim)
    for visible, masked in zip(np.asarray(clips.visible_idx), np.asarray(clips.masked_idx)):
        assert not set(visible) & set(masked)
        assert np.all(np.diff(masked) > 0)


@pytest.mark.slow
def test_positional_tables_are_frozen():
    settings, g_tx, d_tx, schedule, state = _setup(_config(), lr=1e-2)
    new_state, _ = jax.jit(make_train_step(settings, g_tx, d_tx, schedule))(state, _batch(2, 0), jax.random.key(0))
    for part in ("encoder", "decoder"):
        np.testing.assert_array_equal(new_state.generator[part]["pos_embedding"]["table"],
                                      state.generator[part]["pos_embedding"]["table"])


def test_warmup_cosine_matches_the_official_curve():
    expected = official_lr_curve(1e-3, 1e-5, 40, 200)
    schedule = warmup_cosine(1e-3, 1e-5, 40, 200)
    actual = np.array([schedule(step) for step in range(200)])
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-10)


def test_per_epoch_stepping_matches_lambda_lr(torch):
    """Lightning steps the official LambdaLR after the first batch of every epoch; replay that with torch."""
    steps_per_epoch, epochs = 5, 12
    expected = official_lr_per_batch(1e-3, 1e-5, 2, epochs, steps_per_epoch)
    schedule = per_epoch(warmup_cosine(1e-3, 1e-5, 2 * steps_per_epoch, epochs * steps_per_epoch), steps_per_epoch)
    np.testing.assert_allclose([schedule(s) for s in range(len(expected))], expected, rtol=1e-5)


@pytest.mark.parametrize("field, value, message", [
    ("mask_percentage_target", 1.5, "mask_percentage_target"),
    ("compute_dtype", "float16", "compute_dtype"),
    ("grad_accum_steps", 3, "grad_accum_steps"),
    ("decoder_mask_ratio", 2.0, "decoder_mask_ratio"),
])
def test_config_errors_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        StepSettings.from_config(_config(**{field: value}), ARCH)


@pytest.mark.slow
def test_remat_gives_the_same_gradients_in_float32():
    # With plain SGD at rate 1 each parameter moves by exactly its gradient (the generator's is taken against
    # the updated discriminator, so both networks' gradients are compared).
    sgd, schedule = optax.sgd(1.0), optax.constant_schedule(1.0)  # the step scales updates by the schedule
    state = _initial_state(sgd, sgd)
    batch, key = _batch(2, 4), jax.random.key(5)
    results = {}
    for remat in (False, True):
        settings = StepSettings.from_config(_config(remat=remat), ARCH)
        results[remat] = jax.jit(make_train_step(settings, sgd, sgd, schedule))(state, batch, key)
    (plain, plain_metrics), (rematerialised, remat_metrics) = results[False], results[True]
    assert _max_difference(plain.generator, state.generator) > 1e-3
    assert _max_difference(plain.discriminator, state.discriminator) > 1e-3
    assert _max_difference(plain, rematerialised) <= 1e-6
    assert float(plain_metrics["rec_loss"]) == float(remat_metrics["rec_loss"])
