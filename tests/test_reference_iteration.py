"""Our single-forward train step against an independent PyTorch replay of the official iteration.

The reference (tests/torch_reference.py) is the official training_step written from ControlNet/MARLIN's
semantics with marlin_pytorch's encoder and decoder, the official MLP discriminator, torch autograd and
torch.optim.AdamW: D step(s) on a fresh forward, then G step(s) on another. Only the starting weights (through
the official state_dict layout), the token indices and the gradient-penalty draw come from our side; the
target patches, losses, gradients, optimiser and learning rates are the reference's own.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest

from marlin_jax.architectures import VIT_TINY
from marlin_jax.config_builders import pretrain_config
from marlin_jax.interop import export_state_dict
from marlin_jax.pretraining.state import init_train_state, make_optimizer
from marlin_jax.pretraining.step import StepSettings, make_train_step, prepare_batch
from marlin_jax.training.schedules import learning_rate_schedule
from official_lr import official_lr_curve

pytestmark = pytest.mark.slow

ARCH = VIT_TINY
BATCH = 2
ITERATIONS = 2
TOLERANCE = 1e-5


def _config(**overrides):
    config = pretrain_config(ARCH, "reference", "tiny").unlock()
    config.model = ARCH.to_dict()
    config.batch_size = BATCH
    # A strong adversarial term, so that its sign and scale visibly move the generator's parameters.
    config.adv_weight = 0.5
    for key, value in overrides.items():
        config[key] = value
    return config


def _batch(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    t, h, w = ARCH.grid
    occupancy = rng.random((BATCH, t, h, w, 11)) < 0.3
    occupancy[..., 0] |= ~occupancy.any(-1)
    video = rng.integers(0, 256, (BATCH, ARCH.num_frames, ARCH.img_size, ARCH.img_size, 3), np.uint8)
    return {"video": video, "occupancy": occupancy}


def _setup(config):
    """Our jitted step and initial state, with the trainer's optimisers and per-step schedule (one epoch per
    iteration, so the rate falls from the peak to half-way between the two iterations: a rate taken at the
    wrong step shows)."""
    settings = StepSettings.from_config(config, ARCH)
    schedule = learning_rate_schedule(config.learning_rate, BATCH, 1, ITERATIONS)
    g_tx, d_tx = make_optimizer(config.optimizer), make_optimizer(config.optimizer)
    state = jax.jit(lambda key: nn.meta.unbox(init_train_state(key, ARCH, g_tx, d_tx)))(jax.random.key(0))
    return settings, state, jax.jit(make_train_step(settings, g_tx, d_tx, schedule))


def _official_twin(marlin_pytorch, torch_reference, state):
    model = torch_reference.OfficialPretraining(marlin_pytorch, ARCH)
    torch_reference.load_numpy_state(model, _state_dict(state))
    return model


def _state_dict(state) -> dict[str, np.ndarray]:
    return export_state_dict(jax.device_get(state.generator), ARCH, jax.device_get(state.discriminator))


def _drawn_indices(settings: StepSettings, batch, key) -> tuple[np.ndarray, np.ndarray]:
    """(visible (B, N) bool mask, decoded token indices (B, K)) that our step draws for this key."""
    clips = jax.jit(prepare_batch, static_argnums=0)(settings, batch, jax.random.split(key)[0])
    visible = np.zeros((BATCH, ARCH.num_tokens), bool)
    np.put_along_axis(visible, np.asarray(clips.visible_idx), True, axis=1)
    assert visible.sum(1).tolist() == [clips.visible_idx.shape[1]] * BATCH
    return visible, np.array(clips.masked_idx)


def _gradient_penalty_alphas(key, d_steps: int) -> list[float]:
    """Our step's interpolation weight of each D step for this key (officially a fresh torch.rand(1) each)."""
    gp_key = jax.random.split(key)[1]
    return [float(jax.random.uniform(jax.random.fold_in(gp_key, d_step), ())) for d_step in range(d_steps)]


def _torch_clips(torch, batch):
    """uint8 (B, T, H, W, C) -> float (B, C, T, H, W) in [0, 1], as the official dataset gives clips."""
    return torch.from_numpy(batch["video"]).permute(0, 4, 1, 2, 3).float() / 255


# The penalty with two D steps: each D step draws its own interpolation weight, as the official torch.rand(1) per
# D step does; a step that reused one draw for both would differ from the reference in the second D update.
@pytest.mark.parametrize("overrides", [{}, {"gp_weight": 10.0}, {"d_steps": 2, "g_steps": 2},
                                       {"gp_weight": 10.0, "d_steps": 2}],
                         ids=["official", "gradient_penalty", "two_d_and_g_steps", "gradient_penalty_two_d_steps"])
def test_train_step_equals_the_official_iteration(marlin_pytorch, torch, torch_reference, overrides):
    config = _config(**overrides)
    settings, state, train_step = _setup(config)
    initial = _state_dict(state)
    official = _official_twin(marlin_pytorch, torch_reference, state)
    optimizer = config.optimizer
    g_opt, d_opt = torch_reference.make_official_optimizers(official, (optimizer.b1, optimizer.b2), optimizer.eps,
                                                            optimizer.weight_decay)
    scale = BATCH / 256  # official train.py scales every rate by the global batch / 256
    rates = official_lr_curve(config.learning_rate.base * scale, config.learning_rate.min * scale, 0, ITERATIONS)
    adversarial = torch_reference.AdversarialSettings(config.adv_weight, config.gp_weight, config.d_steps,
                                                      config.g_steps)

    for iteration in range(ITERATIONS):
        batch, key = _batch(iteration), jax.random.fold_in(jax.random.key(1), iteration)
        visible, masked = _drawn_indices(settings, batch, key)
        for row, masked_row in zip(visible, masked):
            np.testing.assert_array_equal(masked_row, np.flatnonzero(~row))  # every other token, ascending
        state, metrics = train_step(state, batch, key)
        logged = torch_reference.official_iteration(
            official, g_opt, d_opt, _torch_clips(torch, batch), torch.from_numpy(visible), adversarial,
            float(rates[iteration]), _gradient_penalty_alphas(key, config.d_steps))
        assert float(metrics["lr"]) == pytest.approx(rates[iteration], rel=1e-6)
        for name, value in logged.items():
            assert abs(float(metrics[name]) - value) <= TOLERANCE, (
                f"iteration {iteration}: {name} is {float(metrics[name]):.7g}, the official step logs {value:.7g}")

    ours, theirs = _state_dict(state), official.state_dict()
    assert sorted(ours) == sorted(theirs)
    difference, worst = max((float(np.max(np.abs(ours[k] - theirs[k].numpy()))), k) for k in ours)
    assert difference <= TOLERANCE, f"after {ITERATIONS} iterations {worst} differs by {difference:.3g}"
    for trained in ("discriminator.layers.0.linear.weight", "decoder.head.weight", "encoder.blocks.0.attn.qkv.weight"):
        assert np.max(np.abs(ours[trained] - initial[trained])) > 1e-4, f"{trained} did not train"


def _with_token_inverted(batch, row: int, token: int) -> dict[str, np.ndarray]:
    """The batch with the pixels of one tubelet patch of one clip inverted."""
    t, h, w = np.unravel_index(token, ARCH.grid)
    frames, side = ARCH.tubelet_size, ARCH.patch_size
    video = batch["video"].copy()
    patch = video[row, t * frames:(t + 1) * frames, h * side:(h + 1) * side, w * side:(w + 1) * side]
    patch[...] = 255 - patch
    return {**batch, "video": video}


def test_decoder_masking_reconstructs_exactly_the_chosen_tokens(marlin_pytorch, torch, torch_reference):
    """VideoMAE V2 decoder masking inside a real step: the decoder gets mask tokens at a random half of the
    masked positions only, and the loss is over exactly those tokens."""
    settings, state, train_step = _setup(_config(decoder_mask_ratio=0.5))
    batch, key = _batch(5), jax.random.key(6)
    visible, chosen = _drawn_indices(settings, batch, key)
    num_masked = ARCH.num_tokens - settings.num_visible
    assert chosen.shape == (BATCH, round(num_masked * 0.5))
    for row, chosen_row in zip(visible, chosen):
        assert np.all(np.diff(chosen_row) > 0) and not row[chosen_row].any()
    _, metrics = train_step(state, batch, key)

    official = _official_twin(marlin_pytorch, torch_reference, state)
    clips, chosen_tensor = _torch_clips(torch, batch), torch.from_numpy(chosen)
    with torch.no_grad():
        predicted = official.reconstruct_chosen(clips, torch.from_numpy(visible), chosen_tensor)
        target = torch.gather(official.patches(clips), 1, chosen_tensor[..., None].expand(-1, -1, ARCH.patch_dim))
        expected = torch.nn.functional.mse_loss(predicted, target).item()
    assert abs(float(metrics["rec_loss"]) - expected) <= TOLERANCE

    # Pixels of a masked token that was not chosen reach nothing; those of a chosen one reach the loss.
    skipped = np.setdiff1d(np.flatnonzero(~visible[0]), chosen[0])[0]
    _, unchanged = train_step(state, _with_token_inverted(batch, 0, skipped), key)
    for name in ("rec_loss", "adv_loss", "d_loss"):
        assert float(unchanged[name]) == float(metrics[name]), name
    _, changed = train_step(state, _with_token_inverted(batch, 0, chosen[0][0]), key)
    assert abs(float(changed["rec_loss"]) - float(metrics["rec_loss"])) > 1e-6
