"""The pure MARLIN train step: `train_step(state, batch, key) -> (state, metrics)`.

The official iteration (model/marlin.py) runs the encoder-decoder forward twice — once for the discriminator
step, once for the generator step — and back-propagates the D loss into the generator only to zero those
gradients before the generator step. The generator's parameters do not change in between, so both forwards
give the same prediction. Here the generator runs forward ONCE (`jax.vjp`): the discriminator is updated on
that prediction, then the generator's loss — reconstruction plus the adversarial term scored by the UPDATED
discriminator, as in the official order — is pulled back through the same vjp. The parameter updates are
identical: tests/test_reference_iteration.py checks the losses and the updated parameters against an
independent PyTorch replay of the official two-forward iteration (with the gradient penalty, and with two D and
G steps).

With gradient accumulation the discriminator must be updated on every micro-batch's prediction before any
generator gradient is taken, so the micro-batches are run twice (forward-only, then forward+backward).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from marlin_jax import masking
from marlin_jax.architectures import MarlinArchitecture
from marlin_jax.model import MarlinMAE, PatchDiscriminator, gather_tokens, patchify
from marlin_jax.pretraining import losses
from marlin_jax.pretraining.state import TrainState
from marlin_jax.training import sharding


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """Everything static about a train step (hashable, so jit can close over it)."""

    arch: MarlinArchitecture
    mask_strategy: str = "fasking"
    visible_ratio: float = 0.1
    decoder_mask_ratio: float | None = None
    adv_loss: bool = True
    adv_weight: float = 0.01
    # Steps trained on the reconstruction loss alone: the critic is not updated and the generator's adversarial
    # term is zero until the step counter reaches this (0: adversarial from the start, as official).
    adv_warmup_steps: int = 0
    gp_weight: float = 0.0
    d_steps: int = 1
    g_steps: int = 1
    grad_accum_steps: int = 1
    compute_dtype: Any = jnp.float32
    remat: bool = False

    @classmethod
    def from_config(cls, config, arch: MarlinArchitecture) -> "StepSettings":
        if not 0 < config.mask_percentage_target < 1:
            raise ValueError(f"mask_percentage_target must lie in (0, 1), got {config.mask_percentage_target}")
        ratio = config.decoder_mask_ratio
        if ratio is not None and not 0 < ratio <= 1:
            raise ValueError(f"decoder_mask_ratio must lie in (0, 1] or be None, got {ratio}")
        if config.batch_size % config.grad_accum_steps:
            raise ValueError(f"batch_size ({config.batch_size}) is not a multiple of grad_accum_steps "
                             f"({config.grad_accum_steps})")
        for field in ("d_steps", "g_steps", "grad_accum_steps"):
            if config[field] < 1:
                raise ValueError(f"{field} must be >= 1, got {config[field]}")
        return cls(arch=arch, mask_strategy=config.mask_strategy,
                   visible_ratio=round(1 - config.mask_percentage_target, 9), decoder_mask_ratio=ratio,
                   adv_loss=config.adv_loss, adv_weight=config.adv_weight,
                   adv_warmup_steps=config.get("adv_warmup_steps", 0), gp_weight=config.gp_weight,
                   d_steps=config.d_steps, g_steps=config.g_steps, grad_accum_steps=config.grad_accum_steps,
                   compute_dtype=sharding.compute_dtype(config.compute_dtype), remat=config.remat)

    @property
    def num_visible(self) -> int:
        return masking.num_visible_tokens(self.arch.num_tokens, self.visible_ratio)


@dataclasses.dataclass(frozen=True)
class MaskedClips:
    """A batch prepared for the generator: the uint8 clips, token indices and the target patches (floats)."""

    video: jax.Array
    visible_idx: jax.Array
    masked_idx: jax.Array
    target: jax.Array


jax.tree_util.register_dataclass(MaskedClips, data_fields=["video", "visible_idx", "masked_idx", "target"],
                                 meta_fields=[])


def prepare_batch(settings: StepSettings, batch: dict[str, jax.Array], key: jax.Array) -> MaskedClips:
    """uint8 clips + region occupancy -> masks drawn on device, indices, and the masked patches to predict."""
    arch = settings.arch
    mask_key, decoder_key = jax.random.split(key)
    masks = masking.sample_masks(mask_key, batch["occupancy"], settings.mask_strategy, settings.visible_ratio)
    visible_idx, masked_idx = masking.mask_to_indices(masks, settings.num_visible)
    if settings.decoder_mask_ratio is not None:
        # VideoMAE V2 decoder masking: reconstruct a random subset of the masked tokens (kept ascending).
        keep = max(1, round(masked_idx.shape[1] * settings.decoder_mask_ratio))
        scores = jax.random.uniform(decoder_key, masked_idx.shape)
        chosen = jnp.argsort(scores, axis=1)[:, :keep]
        masked_idx = jnp.sort(jnp.take_along_axis(masked_idx, chosen, axis=1), axis=1)
    # Patches of the uint8 clips (a quarter of float32's bytes to move), scaled after the gather.
    target = gather_tokens(patchify(batch["video"], arch.tubelet_size, arch.patch_size), masked_idx)
    return MaskedClips(batch["video"], visible_idx, masked_idx, target.astype(jnp.float32) / 255.0)


def _split_micro_batches(clips: MaskedClips, count: int) -> MaskedClips:
    return jax.tree_util.tree_map(lambda x: x.reshape(count, x.shape[0] // count, *x.shape[1:]), clips)


def _mean_over_scan(fn: Callable, micro_batches: MaskedClips, count: int):
    """Mean of fn(micro_batch) (a pytree) over the leading axis, scanned to bound memory."""
    def body(total, micro):
        value = fn(micro)
        return jax.tree_util.tree_map(lambda t, v: t + v / count, total, value), None
    zeros = jax.tree_util.tree_map(jnp.zeros_like, jax.eval_shape(fn, jax.tree_util.tree_map(lambda x: x[0],
                                                                                            micro_batches)))
    return jax.lax.scan(body, zeros, micro_batches)[0]


def _scaled(updates, lr):
    """Unit-rate optimiser updates at this iteration's learning rate (see state.make_optimizer)."""
    return jax.tree_util.tree_map(lambda u: u * jnp.asarray(lr, u.dtype), updates)


def make_train_step(settings: StepSettings, generator_tx: optax.GradientTransformation,
                    discriminator_tx: optax.GradientTransformation, schedule: optax.Schedule):
    """Returns the pure `train_step(state, batch, key) -> (state, metrics)`; jit it with shardings outside."""
    generator = MarlinMAE(settings.arch, remat=settings.remat, dtype=settings.compute_dtype)
    critic = PatchDiscriminator(settings.arch)

    def forward(g_params, clips: MaskedClips) -> jax.Array:
        pred = generator.apply({"params": g_params}, clips.video, clips.visible_idx, clips.masked_idx)
        return pred.astype(jnp.float32)

    def d_objective(d_params, pred, target, key):
        score = lambda x: critic.apply({"params": d_params}, x)
        loss = losses.discriminator_loss(score(pred), score(target))
        if settings.gp_weight > 0:
            loss = loss + settings.gp_weight * losses.gradient_penalty(score, key, target, pred)
        return loss

    def g_objective(pred, d_params, target, adversarial_on):
        rec = losses.reconstruction_loss(pred, target)
        adv = jnp.zeros(())
        if settings.adv_loss:
            adv = settings.adv_weight * losses.generator_adversarial_loss(critic.apply({"params": d_params}, pred))
            adv = jnp.where(adversarial_on, adv, 0.0)
        return rec + adv, {"rec_loss": rec, "adv_loss": adv}

    def d_update(d_params, d_opt_state, d_grads, adversarial_on, lr):
        updates, new_opt_state = discriminator_tx.update(d_grads, d_opt_state, d_params)
        new_params = optax.apply_updates(d_params, _scaled(updates, lr))
        if not settings.adv_warmup_steps:
            return new_params, new_opt_state
        keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(adversarial_on, n, o), new, old)
        return keep(new_params, d_params), keep(new_opt_state, d_opt_state)

    def generator_grads(g_params, d_params, clips: MaskedClips, adversarial_on):
        def of_micro_batch(m):
            (_, parts), grads = jax.value_and_grad(
                lambda p: g_objective(forward(p, m), d_params, m.target, adversarial_on), has_aux=True)(g_params)
            return grads, parts
        if settings.grad_accum_steps == 1:
            return of_micro_batch(clips)
        count = settings.grad_accum_steps
        return _mean_over_scan(of_micro_batch, _split_micro_batches(clips, count), count)

    def d_and_g_grads_one_forward(state: TrainState, clips: MaskedClips, gp_key, adversarial_on, lr):
        pred, pull_back = jax.vjp(lambda p: forward(p, clips), state.generator)
        d_params, d_opt_state = state.discriminator, state.discriminator_opt_state
        d_loss = jnp.zeros(())
        if settings.adv_loss:
            for d_step in range(settings.d_steps):  # the official draws a fresh penalty interpolation per D step
                d_loss, d_grads = jax.value_and_grad(d_objective)(
                    d_params, jax.lax.stop_gradient(pred), clips.target, jax.random.fold_in(gp_key, d_step))
                d_params, d_opt_state = d_update(d_params, d_opt_state, d_grads, adversarial_on, lr)
        (_, parts), pred_grad = jax.value_and_grad(g_objective, has_aux=True)(pred, d_params, clips.target,
                                                                              adversarial_on)
        return d_params, d_opt_state, d_loss, pull_back(pred_grad)[0], parts

    def d_and_g_grads_accumulated(state: TrainState, clips: MaskedClips, gp_key, adversarial_on, lr):
        count = settings.grad_accum_steps
        micro = _split_micro_batches(clips, count)
        d_params, d_opt_state = state.discriminator, state.discriminator_opt_state
        d_loss = jnp.zeros(())
        if settings.adv_loss:
            for d_step in range(settings.d_steps):
                d_key = jax.random.fold_in(gp_key, d_step)
                d_loss, d_grads = _mean_over_scan(lambda m: jax.value_and_grad(d_objective)(
                    d_params, forward(state.generator, m), m.target, d_key), micro, count)
                d_params, d_opt_state = d_update(d_params, d_opt_state, d_grads, adversarial_on, lr)
        g_grads, parts = generator_grads(state.generator, d_params, clips, adversarial_on)
        return d_params, d_opt_state, d_loss, g_grads, parts

    def train_step(state: TrainState, batch: dict[str, jax.Array], key: jax.Array):
        mask_key, gp_key = jax.random.split(key)
        clips = prepare_batch(settings, batch, mask_key)
        first_round = d_and_g_grads_one_forward if settings.grad_accum_steps == 1 else d_and_g_grads_accumulated
        adversarial_on = state.step >= settings.adv_warmup_steps
        lr = jnp.asarray(schedule(state.step), jnp.float32)
        d_params, d_opt_state, d_loss, g_grads, parts = first_round(state, clips, gp_key, adversarial_on, lr)
        metrics = {"d_loss": d_loss, "g_grad_norm": optax.tree.norm(g_grads)}
        g_params, g_opt_state = state.generator, state.generator_opt_state
        for g_step in range(settings.g_steps):
            if g_step > 0:  # official g_steps > 1: more generator steps against the same discriminator
                g_grads, parts = generator_grads(g_params, d_params, clips, adversarial_on)
            updates, g_opt_state = generator_tx.update(g_grads, g_opt_state, g_params)
            updates = _scaled(updates, lr)
            g_params = optax.apply_updates(g_params, updates)
            if g_step == 0:
                metrics["g_update_norm"] = optax.tree.norm(updates)
        # The losses of the last generator step, as the official iteration logs them.
        metrics.update(parts, g_loss=parts["rec_loss"] + parts["adv_loss"], lr=lr)
        metrics["g_param_norm"] = optax.tree.norm(g_params)
        new_state = state.replace(step=state.step + 1, generator=g_params, discriminator=d_params,
                                  generator_opt_state=g_opt_state, discriminator_opt_state=d_opt_state)
        return new_state, metrics

    return train_step
