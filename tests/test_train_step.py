"""The pure train step: one generator forward equals the official two-pass iteration; accumulation; schedules."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from marlin_jax.architectures import VIT_TINY
from marlin_jax.model import MarlinMAE, PatchDiscriminator
from marlin_jax.pretraining import losses
from marlin_jax.training.schedules import per_epoch, warmup_cosine
from marlin_jax.pretraining.state import init_train_state, make_optimizer
from marlin_jax.pretraining.step import StepSettings, make_train_step, prepare_batch
from marlin_jax.pretrain_config import pretrain_config

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


def _setup(config, lr: float = 1e-3):
    settings = StepSettings.from_config(config, ARCH)
    schedule = optax.constant_schedule(lr)
    g_tx = make_optimizer(config.optimizer, schedule)
    d_tx = make_optimizer(config.optimizer, schedule)
    state = nn.meta.unbox(init_train_state(jax.random.key(0), ARCH, g_tx, d_tx))
    return settings, g_tx, d_tx, schedule, state


def _two_pass_step(settings, g_tx, d_tx, state, batch, key):
    """The official iteration written out literally: forward for D, D update, forward again for G, G update."""
    generator, critic = MarlinMAE(ARCH), PatchDiscriminator(ARCH)
    mask_key, _ = jax.random.split(key)
    clips = prepare_batch(settings, batch, mask_key)
    forward = lambda p: generator.apply({"params": p}, clips.video, clips.visible_idx, clips.masked_idx)
    score = lambda d, x: critic.apply({"params": d}, x)

    pred_for_d = forward(state.generator)
    d_grads = jax.grad(lambda d: losses.discriminator_loss(score(d, pred_for_d), score(d, clips.target)))(
        state.discriminator)
    d_updates, d_opt_state = d_tx.update(d_grads, state.discriminator_opt_state, state.discriminator)
    d_params = optax.apply_updates(state.discriminator, d_updates)

    def g_loss(p):
        pred = forward(p)
        return (losses.reconstruction_loss(pred, clips.target)
                + settings.adv_weight * losses.generator_adversarial_loss(score(d_params, pred)))
    g_grads = jax.grad(g_loss)(state.generator)
    g_updates, g_opt_state = g_tx.update(g_grads, state.generator_opt_state, state.generator)
    return state.replace(step=state.step + 1, generator=optax.apply_updates(state.generator, g_updates),
                         discriminator=d_params, generator_opt_state=g_opt_state, discriminator_opt_state=d_opt_state)


def _max_difference(a, b) -> float:
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree_util.tree_leaves(a),
                                                               jax.tree_util.tree_leaves(b)))


def test_one_forward_step_equals_official_two_pass_iteration():
    config = _config()
    settings, g_tx, d_tx, schedule, state = _setup(config)
    ours = jax.jit(make_train_step(settings, g_tx, d_tx, schedule))
    reference = jax.jit(lambda s, b, k: _two_pass_step(settings, g_tx, d_tx, s, b, k))
    state_a = state_b = state
    for step in range(2):
        batch, key = _batch(2, step), jax.random.fold_in(jax.random.key(1), step)
        state_a, metrics = ours(state_a, batch, key)
        state_b = reference(state_b, batch, key)
        assert math.isfinite(float(metrics["g_loss"]))
    assert _max_difference(state_a.generator, state.generator) > 1e-4  # it trained
    assert _max_difference(state_a.discriminator, state.discriminator) > 1e-4
    assert _max_difference(state_a, state_b) <= 1e-6


def test_gradient_accumulation_matches_the_full_batch():
    # Plain SGD makes the parameter change linear in the gradients (Adam's first step is ~sign(g), which
    # would magnify float noise in near-zero gradients).
    settings, _, _, schedule, _ = _setup(_config())
    accumulated = StepSettings.from_config(_config(grad_accum_steps=2), ARCH)
    sgd = optax.sgd(1.0)
    state = nn.meta.unbox(init_train_state(jax.random.key(0), ARCH, sgd, sgd))
    full = jax.jit(make_train_step(settings, sgd, sgd, schedule))
    micro = jax.jit(make_train_step(accumulated, sgd, sgd, schedule))
    batch, key = _batch(4, 7), jax.random.key(3)
    state_full, metrics_full = full(state, batch, key)
    state_micro, metrics_micro = micro(state, batch, key)
    assert _max_difference(state_full.generator, state.generator) > 1e-4
    assert _max_difference(state_full, state_micro) <= 1e-5
    np.testing.assert_allclose(metrics_full["rec_loss"], metrics_micro["rec_loss"], rtol=1e-5)


def test_gradient_penalty_and_extra_steps_run():
    config = _config(gp_weight=10.0, d_steps=2, g_steps=2)
    settings, g_tx, d_tx, schedule, state = _setup(config)
    new_state, metrics = jax.jit(make_train_step(settings, g_tx, d_tx, schedule))(state, _batch(2, 1), jax.random.key(0))
    assert all(math.isfinite(float(v)) for v in metrics.values())
    assert int(new_state.step) == 1


def test_decoder_masking_reconstructs_a_share_of_masked_tokens():
    settings = StepSettings.from_config(_config(decoder_mask_ratio=0.5), ARCH)
    clips = prepare_batch(settings, _batch(2, 0), jax.random.key(0))
    num_masked = ARCH.num_tokens - settings.num_visible
    assert clips.masked_idx.shape == (2, round(num_masked * 0.5))
    assert clips.target.shape == (2, round(num_masked * 0.5), ARCH.patch_dim)
    for visible, masked in zip(np.asarray(clips.visible_idx), np.asarray(clips.masked_idx)):
        assert not set(visible) & set(masked)
        assert np.all(np.diff(masked) > 0)


def test_positional_tables_are_frozen():
    settings, g_tx, d_tx, schedule, state = _setup(_config(), lr=1e-2)
    new_state, _ = jax.jit(make_train_step(settings, g_tx, d_tx, schedule))(state, _batch(2, 0), jax.random.key(0))
    for part in ("encoder", "decoder"):
        np.testing.assert_array_equal(new_state.generator[part]["pos_embedding"]["table"],
                                      state.generator[part]["pos_embedding"]["table"])


def _official_curve(peak, minimum, warmup_steps, total_steps):
    """The official per-iteration curve, written out from its definition with numpy."""
    warmup = np.linspace(0, peak, warmup_steps)
    n = total_steps - warmup_steps
    cosine = np.array([minimum + 0.5 * (peak - minimum) * (1 + math.cos(math.pi * i / n)) for i in range(n)])
    return np.concatenate([warmup, cosine])


def test_warmup_cosine_matches_the_official_curve():
    expected = _official_curve(1e-3, 1e-5, 40, 200)
    schedule = warmup_cosine(1e-3, 1e-5, 40, 200)
    actual = np.array([schedule(step) for step in range(200)])
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-10)


def test_per_epoch_stepping_matches_lambda_lr():
    """Lightning steps the official LambdaLR after the first batch of every epoch; replay that with torch."""
    torch = pytest.importorskip("torch")
    steps_per_epoch, epochs = 5, 12
    curve = _official_curve(1e-3, 1e-5, 2 * steps_per_epoch, epochs * steps_per_epoch)
    factors = curve[::steps_per_epoch] / 1e-3
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: factors[max(e - 1, 0)])
    expected = []
    for epoch in range(epochs):
        for batch in range(steps_per_epoch):
            expected.append(optimizer.param_groups[0]["lr"])
            if batch == 0:
                scheduler.step()
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


def test_bfloat16_compute_with_remat_tracks_float32():
    config = _config()
    settings, g_tx, d_tx, schedule, state = _setup(config)
    fast = StepSettings.from_config(_config(compute_dtype="bfloat16", remat=True), ARCH)
    batch, key = _batch(2, 5), jax.random.key(2)
    _, metrics32 = jax.jit(make_train_step(settings, g_tx, d_tx, schedule))(state, batch, key)
    new_state, metrics16 = jax.jit(make_train_step(fast, g_tx, d_tx, schedule))(state, batch, key)
    # Parameters stay float32; only the compute is bfloat16.
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(new_state.generator))
    np.testing.assert_allclose(metrics16["rec_loss"], metrics32["rec_loss"], rtol=2e-2)
