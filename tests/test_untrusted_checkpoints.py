"""PyTorch checkpoint files are read without running code from them: plain Lightning and VideoMAE files load,
a file carrying a pickled payload is refused with an error naming the opt-in, and only that opt-in runs it."""

import argparse
import pathlib

import numpy as np
import pytest

from marlin_jax.architectures import VIT_TINY
from marlin_jax.interop.torch_files import UntrustedCheckpointError, read_torch_checkpoint

torch = pytest.importorskip("torch")


class _WritesMarker:
    """Unpickling this runs `exec`, which writes a file: the shape of a malicious checkpoint."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def _state_dict() -> dict:
    torch.manual_seed(0)
    return {"encoder.norm.weight": torch.randn(8), "encoder.norm.bias": torch.randn(8),
            "enc_dec_proj.weight": torch.randn(4, 8), "decoder.mask_token": torch.randn(1, 1, 4)}


def _lightning_checkpoint(hyper_parameters: dict) -> dict:
    """What Lightning's ModelCheckpoint writes for a module like the official MARLIN (two optimisers with
    LambdaLR schedules, ModelCheckpoint and EarlyStopping callbacks, `save_hyperparameters()`)."""
    state = _state_dict()
    parameters = [torch.nn.Parameter(value.clone()) for value in state.values()]
    optimizer = torch.optim.AdamW(parameters, lr=1.5e-4, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)
    sum(p.sum() for p in parameters).backward()
    optimizer.step()
    schedule.step()
    progress = {"total": {"ready": 2, "completed": 2, "started": 2, "processed": 2},
                "current": {"ready": 2, "completed": 2, "started": 2, "processed": 2}}
    return {
        "epoch": 1, "global_step": 4, "pytorch-lightning_version": "1.7.7", "state_dict": state,
        "loops": {"fit_loop": {"state_dict": {}, "epoch_loop.state_dict": {"_batches_that_stepped": 2},
                               "epoch_loop.batch_progress": {**progress, "is_last_batch": True}}},
        "callbacks": {
            "ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min', 'every_n_train_steps': 0, 'every_n_epochs': 1, "
            "'train_time_interval': None}": {
                "monitor": "val_loss", "best_model_score": torch.tensor(0.54), "best_model_path": "ckpt/a.ckpt",
                "current_score": torch.tensor(0.54), "dirpath": "ckpt", "best_k_models": {"ckpt/a.ckpt": torch.tensor(0.54)},
                "kth_best_model_path": "ckpt/a.ckpt", "kth_value": torch.tensor(float("inf")),
                "last_model_path": "ckpt/last.ckpt"},
            "EarlyStopping{'monitor': 'val_loss', 'mode': 'min'}": {
                "wait_count": 0, "stopped_epoch": 0, "best_score": torch.tensor(0.54), "patience": 3}},
        "optimizer_states": [optimizer.state_dict(), optimizer.state_dict()],
        "lr_schedulers": [schedule.state_dict(), schedule.state_dict()],
        "hparams_name": "kwargs", "hyper_parameters": hyper_parameters,
    }


MARLIN_HPARAMS = {"img_size": 224, "patch_size": 16, "n_frames": 16, "mlp_ratio": 4.0, "qkv_bias": True,
                  "qk_scale": None, "norm_layer": "LayerNorm", "optimizer_type": "AdamW",
                  "optimizer_betas": (0.9, 0.95), "learning_rate": 1.5e-4, "iter_per_epoch": 1297,
                  "distributed": False, "name": None}


def _assert_weights_read(path: pathlib.Path, **kwargs) -> None:
    got = read_torch_checkpoint(path, VIT_TINY, **kwargs)
    want = _state_dict()
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value.numpy(), err_msg=key)


@pytest.mark.parametrize("hyper_parameters", [
    MARLIN_HPARAMS,
    {**MARLIN_HPARAMS, "args": argparse.Namespace(data_dir="/data/ytf", epochs=2000),
     "root": pathlib.PurePosixPath("/data"), "windows_root": pathlib.PureWindowsPath(r"C:\data"),
     "ratio": np.float64(0.9), "workers": np.int64(8)},
], ids=["official_marlin", "namespace_paths_numpy"])
def test_lightning_checkpoints_load_without_trusting_the_file(tmp_path, hyper_parameters):
    path = tmp_path / "last.ckpt"
    torch.save(_lightning_checkpoint(hyper_parameters), path)
    _assert_weights_read(path)


def test_videomae_checkpoint_with_its_run_arguments_loads(tmp_path):
    path = tmp_path / "checkpoint-799.pth"
    renamed = {"encoder." + key.removeprefix("encoder."): value for key, value in _state_dict().items()}
    torch.save({"model": renamed, "epoch": 799, "args": argparse.Namespace(model="pretrain_videomae_small")}, path)
    state = read_torch_checkpoint(path, VIT_TINY)
    assert "encoder.norm.weight" in state and "encoder.pos_embedding.emb" in state


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy_pickle"])
def test_a_pickled_payload_does_not_run_and_the_error_names_the_opt_in(tmp_path, zip_format):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "crafted.ckpt"
    checkpoint = _lightning_checkpoint({**MARLIN_HPARAMS, "name": _WritesMarker(marker)})
    torch.save(checkpoint, path, _use_new_zipfile_serialization=zip_format)

    with pytest.raises(UntrustedCheckpointError) as caught:
        read_torch_checkpoint(path, VIT_TINY)
    assert not marker.exists()
    message = str(caught.value)
    for option in ("trust_pickled_code=True", "--trust_pickled_checkpoint", "--config.trust_pickled_checkpoint=true",
                   "exec", str(path)):
        assert option in message

    # The payload is real: trusting the file runs it (and still reads the weights).
    _assert_weights_read(path, trust_pickled_code=True)
    assert marker.read_text() == "ran"


def test_a_payload_disguised_as_a_tensor_container_does_not_run(tmp_path):
    """A .pt whose top level is the payload itself, not a dict."""
    marker = tmp_path / "payload_ran"
    path = tmp_path / "weights.pt"
    torch.save(_WritesMarker(marker), path)
    with pytest.raises(UntrustedCheckpointError, match="--trust_pickled_checkpoint"):
        read_torch_checkpoint(path, VIT_TINY)
    assert not marker.exists()
