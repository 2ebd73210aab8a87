"""Evaluators that watch pretraining learn (see marlin_jax/training/evaluator_protocol.py for the protocol).

`reconstruction`: the official objective on held-out clips (the data_prep val split, or `path`/`split`): one
clip per record, sampled with a fixed seed, masked with a fixed key, so successive evaluations compare. It logs
`<name>/rec_loss`, `<name>/d_loss` (mean D(fake) - mean D(real), no gradient penalty, as the official
validation), `<name>/g_loss` (rec + adversarial term), `<name>/loss` (d_loss + g_loss, the official val_loss)
and `<name>/rec_loss_baseline`: the error of predicting every masked pixel as the mean colour of the clip's
visible pixels, a floor that a model which has learned nothing about faces does not get below. It also draws
`images` reconstruction grids (original | masked | reconstruction).

`linear_probe`: a labelled CSV of face videos (`path,split,label...`, configs/probe/csv.py's format with videos
instead of features). One clip per video (the fine-tuning evaluation clip, seeded) is encoded by the current
encoder, a convex probe is fitted on train with its L2 strength chosen on val, and the test split's
`probe/<name>/auc` and `probe/<name>/acc` are logged (`name`: the block's `name` field, else its config key).

Both run on every host: each decodes its rows of every global batch, the model runs sharded as in training,
and only replicated results are fetched.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from marlin_jax import masking
from marlin_jax.architectures import MarlinArchitecture
from marlin_jax.data import shards
from marlin_jax.data.tfrecord import RecordReader
from marlin_jax.data.transforms import DecodeClip, SampleClipFrames
from marlin_jax.downstream.clip_loader import Parallelism, eval_batches, host_rows
from marlin_jax.downstream.feature_files import FeatureSplit
from marlin_jax.downstream.metrics import probe_metrics
from marlin_jax.downstream.probe import fit_convex
from marlin_jax.downstream.tasks import check_files_exist, read_csv_task
from marlin_jax.model import MarlinEncoder, MarlinMAE, PatchDiscriminator, gather_tokens, patchify, unpatchify
from marlin_jax.pretraining.step import StepSettings, prepare_batch
from marlin_jax.training import sharding
from marlin_jax.training.evaluator_protocol import Evaluation, build_evaluators
from marlin_jax.video import ClipSettings

RECONSTRUCTION_IMAGES = "reconstructions"


def reconstruction_grid(arch: MarlinArchitecture, video: np.ndarray, visible_idx: np.ndarray,
                        masked_idx: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """original | masked (grey where hidden) | reconstruction, for the first frame of one clip.

    video (T, H, W, 3) in [0, 1]; indices (N_v,), (N_m,); predicted (N_m, patch_dim).
    """
    patches = np.asarray(patchify(video[None], arch.tubelet_size, arch.patch_size))[0]
    masked = patches.copy()
    masked[masked_idx] = 0.5
    rebuilt = patches.copy()
    rebuilt[masked_idx] = predicted
    frames = [np.asarray(unpatchify(p[None], arch.grid, arch.tubelet_size, arch.patch_size))[0, 0]
              for p in (patches, masked, rebuilt)]
    return np.concatenate(frames, axis=1)


def _per_clip_losses(settings: StepSettings, generator_params, discriminator_params, clips):
    """Per-clip official losses (B,) and the mean-colour baseline, for a batch of prepared clips."""
    arch = settings.arch
    pred = MarlinMAE(arch, dtype=settings.compute_dtype).apply(
        {"params": generator_params}, clips.video, clips.visible_idx, clips.masked_idx).astype(jnp.float32)
    target = clips.target
    rec = jnp.mean(jnp.square(pred - target), axis=(1, 2))
    critic = PatchDiscriminator(arch)
    fake = critic.apply({"params": discriminator_params}, pred).astype(jnp.float32)
    real = critic.apply({"params": discriminator_params}, target).astype(jnp.float32)
    d_loss = jnp.mean(fake, axis=(1, 2)) - jnp.mean(real, axis=(1, 2))
    adv = settings.adv_weight * -jnp.mean(fake, axis=(1, 2)) if settings.adv_loss else jnp.zeros_like(rec)
    # Patch vectors are (channel, time, row, col) flattened; the baseline predicts each masked value as the
    # mean of the visible pixels of its channel.
    patches = patchify(clips.video, arch.tubelet_size, arch.patch_size)
    visible = gather_tokens(patches, clips.visible_idx).astype(jnp.float32) / 255
    channel_mean = visible.reshape(*visible.shape[:2], 3, -1).mean(axis=(1, 3))  # (B, 3)
    baseline_pred = jnp.repeat(channel_mean, arch.patch_dim // 3, axis=-1)[:, None, :]
    baseline = jnp.mean(jnp.square(baseline_pred - target), axis=(1, 2))
    return {"rec_loss": rec, "d_loss": d_loss, "g_loss": rec + adv, "rec_loss_baseline": baseline}, pred


class ReconstructionEvaluator:
    """The official validation objective on held-out clips; see the module docstring."""

    def __init__(self, name: str, block, *, config, settings: StepSettings, mesh: jax.sharding.Mesh, **_):
        self.name, self.every = name, int(block.get("every", 0))
        self.settings, self.mesh = settings, mesh
        self.data_path = block.get("path") or config.data.path
        self.split = block.get("split", "val")
        self.max_clips = int(block.get("max_clips", 256))
        self.batch_size = int(block.get("batch_size") or config.batch_size)
        self.num_images = int(block.get("images", 1))
        self.seed = config.seed
        # Fails at startup, naming the path and split, when the split is missing or empty.
        self.files = shards.split_shard_paths(self.data_path, self.split)
        if not self.files:
            raise ValueError(f"config.evals.{name}: split {self.split!r} of {self.data_path} has no records; "
                             f"build a val split with data_prep or set config.evals.{name}.path/split")
        sharding.check_batch_fits(self.batch_size, mesh, f"evals.{name}.batch_size")
        self._sample = SampleClipFrames(settings.arch.num_frames, config.data.temporal_sample_rate)
        self._decode = DecodeClip(settings.arch.patch_size, settings.arch.tubelet_size)
        replicated = sharding.replicated(mesh)
        self._losses = jax.jit(self._batch_sums, out_shardings=replicated)
        self._first_clip = jax.jit(self._first_clip_reconstruction, out_shardings=replicated)

    def _batch_sums(self, generator, discriminator, batch, key):
        clips = prepare_batch(self.settings, batch, key)
        per_clip, _ = _per_clip_losses(self.settings, generator, discriminator, clips)
        weight = batch["weight"]
        return {"clips": jnp.sum(weight), **{k: jnp.sum(v * weight) for k, v in per_clip.items()}}

    def _first_clip_reconstruction(self, generator, discriminator, batch, key):
        clips = prepare_batch(self.settings, batch, key)
        _, pred = _per_clip_losses(self.settings, generator, discriminator, clips)
        return clips.video[:self.num_images].astype(jnp.float32) / 255, clips.visible_idx[:self.num_images], \
            clips.masked_idx[:self.num_images], pred[:self.num_images]

    def _clips(self):
        """Every held-out clip in manifest order (at most max_clips), one seeded sample per record."""
        count = 0
        for path in self.files:
            for record in RecordReader(path):
                if count == self.max_clips:
                    return
                yield count, record
                count += 1

    def _batches(self):
        """This host's rows of each global batch; the padding after the last clip has weight 0."""
        rows = host_rows(self.batch_size)
        pending: list[tuple[int, bytes]] = []
        for item in self._clips():
            pending.append(item)
            if len(pending) == self.batch_size:
                yield self._local_batch(pending, rows)
                pending = []
        if pending:
            yield self._local_batch(pending + [(-1, b"")] * (self.batch_size - len(pending)), rows)

    def _local_batch(self, items: list[tuple[int, bytes]], rows: slice) -> dict[str, np.ndarray]:
        arch = self.settings.arch
        blank = {"video": np.zeros((arch.num_frames, arch.img_size, arch.img_size, 3), np.uint8),
                 "occupancy": np.zeros((*arch.grid, masking.NUM_LABELS), bool)}
        decoded, weights = [], []
        for index, record in items[rows]:
            clip = None
            if index >= 0:
                try:
                    sample = self._sample.random_map(record, np.random.default_rng([self.seed, index]))
                    clip = self._decode.map(sample)
                except ValueError as error:  # a record that passed its checksum but does not parse or decode
                    logging.warning("skipping held-out clip %d of %s: %s", index, self.data_path, error)
            decoded.append(clip or blank)  # padding and unreadable clips weigh 0
            weights.append(float(clip is not None))
        return {"video": np.stack([d["video"] for d in decoded]),
                "occupancy": np.stack([d["occupancy"] for d in decoded]),
                "weight": np.asarray(weights, np.float32)}

    def evaluate(self, state, step: int) -> Evaluation:
        del step  # the masks are the same at every evaluation
        key = jax.random.key(self.seed + 1)
        totals: dict[str, float] = {}
        images = {}
        for index, local in enumerate(self._batches()):
            batch = sharding.global_batch(local, self.mesh)
            sums = jax.device_get(self._losses(state.generator, state.discriminator, batch,
                                               jax.random.fold_in(key, index)))
            for name, value in sums.items():
                totals[name] = totals.get(name, 0.0) + float(value)
            if index == 0 and self.num_images:
                images = self._images(state, batch, jax.random.fold_in(key, index))
        count = totals.pop("clips")
        if count == 0:
            raise ValueError(f"config.evals.{self.name}: no readable clip in split {self.split!r} of {self.data_path}")
        means = {name: total / count for name, total in totals.items()}
        means["loss"] = means["d_loss"] + means["g_loss"]
        return Evaluation({f"{self.name}/{k}": v for k, v in means.items()}, images)

    def _images(self, state, batch, key) -> dict[str, np.ndarray]:
        video, visible, masked, pred = jax.device_get(self._first_clip(state.generator, state.discriminator,
                                                                       batch, key))
        grids = [reconstruction_grid(self.settings.arch, video[i], visible[i], masked[i], pred[i])
                 for i in range(len(video))]
        return {RECONSTRUCTION_IMAGES: np.concatenate(grids, axis=0)}


class LinearProbeEvaluator:
    """A convex linear probe on the current encoder's features of a labelled video CSV; see the module docstring."""

    def __init__(self, name: str, block, *, config, settings: StepSettings, mesh: jax.sharding.Mesh, **_):
        self.name, self.every = block.get("name") or name, int(block.get("every", 0))
        self.mesh, self.arch = mesh, settings.arch
        self.select_metric = block.get("select_metric", "auc")
        csv = block["csv"]
        self.task = read_csv_task(csv, block.get("task", "binary"), int(block.get("num_classes", 0)))
        check_files_exist(self.task, str(csv))
        self.batch_size = int(block.get("batch_size") or config.batch_size)
        sharding.check_batch_fits(self.batch_size, mesh, f"evals.{name}.batch_size")
        self.seed = config.seed
        self.clip_settings = ClipSettings(self.arch.num_frames, config.data.temporal_sample_rate, self.arch.img_size)
        encoder = MarlinEncoder(self.arch, dtype=settings.compute_dtype)
        self._features = jax.jit(
            lambda params, video: encoder.apply({"params": params}, video, False,
                                                method=MarlinEncoder.extract_features).astype(jnp.float32),
            out_shardings=sharding.replicated(mesh))

    def _split_features(self, encoder_params, split) -> np.ndarray:
        features = []
        for local in eval_batches(split, self.batch_size, self.seed, self.clip_settings, Parallelism(threads=2)):
            video = sharding.global_batch({"video": local}, self.mesh)["video"]
            features.append(np.asarray(jax.device_get(self._features(encoder_params, video)), np.float64))
        return np.concatenate(features)[:len(split)]

    def evaluate(self, state, step: int) -> Evaluation:
        del step
        encoder = state.generator["encoder"]
        splits = {name: FeatureSplit(split.ids, self._split_features(encoder, split), split.labels)
                  for name, split in self.task.splits.items()}
        fit = fit_convex(self.task.task, self.task.num_outputs, splits["train"], splits["val"], self.select_metric)
        test = probe_metrics(self.task.task, splits["test"].labels, fit.predict(splits["test"].features))
        return Evaluation({f"probe/{self.name}/{k}": v for k, v in test.items()
                           if k in ("auc", "acc") and math.isfinite(v)})


PRETRAINING_EVALUATORS = {"reconstruction": ReconstructionEvaluator, "linear_probe": LinearProbeEvaluator}


def build_pretraining_evaluators(evals_config, **context):
    """The evaluators of `config.evals`; a linear_probe block without a CSV is off (its default)."""
    active = {name: block for name, block in evals_config.items()
              if not (block.get("type") == "linear_probe" and not block.get("csv"))}
    return build_evaluators(active, PRETRAINING_EVALUATORS, **context)
