"""Extract MARLIN features from videos: one .npy per video.

    python -m marlin_jax.extract --model marlin_vit_base_ytf --weights marlin_vit_base_ytf.encoder.pt \
        --output-dir features/ videos/
    # raw footage (not 224x224 face crops): crop the face first
    python -m marlin_jax.extract --model marlin_vit_base_ytf --weights marlin_vit_base_ytf.encoder.pt \
        --output-dir features/ --crop-face --batch-size 16 videos/ extra_clip.mp4

Each video gives `<output-dir>/<sub-folders>/<stem>.npy`: (clips, D) floats, (clips, tokens, D) with
--keep-seq, or (D,) with --reduction mean|max. The clip schedule is marlin_pytorch's extract_video (see
marlin_jax.video_features). Videos that cannot be read, or have no face with --crop-face, are skipped and
listed at the end; the exit status is 1 only when every video failed.
"""

from __future__ import annotations

import argparse
import logging
import sys

from tqdm.contrib.logging import logging_redirect_tqdm

from marlin_jax.marlin import Marlin
from marlin_jax.video_features import (
    REDUCTIONS,
    VIDEO_SUFFIXES,
    ExtractionOptions,
    extract_to_directory,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m marlin_jax.extract", description=__doc__.split("\n")[0])
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help=f"video files, or folders searched recursively for {' '.join(VIDEO_SUFFIXES)}")
    parser.add_argument("--model", required=True,
                        help="official name (marlin_vit_base_ytf, ...) or config file (configs/pretrain/x.py[:variant])")
    parser.add_argument("--weights", required=True,
                        help="official .pt / .ckpt, VideoMAE .pth, or a marlin_jax orbax checkpoint folder")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--crop-face", action="store_true",
                        help="crop the face of every frame first; without it, frames that are not img_size "
                             "squares are resized (not cropped) to one")
    parser.add_argument("--keep-seq", action="store_true", help="keep per-token features instead of their mean")
    parser.add_argument("--sample-rate", type=int, default=2, help="use every n-th frame (default 2)")
    parser.add_argument("--stride", type=int, default=16, help="clip stride in sampled frames (default 16)")
    parser.add_argument("--reduction", choices=REDUCTIONS, default="none", help="reduce over clips (default none)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="clips per model call, gathered across videos (default: 1 on CPU, 8 on GPU/TPU)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("marlin_jax").setLevel(logging.INFO)
    try:
        options = ExtractionOptions(crop_face=args.crop_face, keep_seq=args.keep_seq, sample_rate=args.sample_rate,
                                    stride=args.stride, reduction=args.reduction, batch_size=args.batch_size)
        model = Marlin.from_file(args.model, args.weights)
        with logging_redirect_tqdm():
            summary = extract_to_directory(model, args.inputs, args.output_dir, options)
    except ValueError as error:  # bad flags, weights or inputs: our messages say what is wrong
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {len(summary.written)} feature file(s) to {args.output_dir}; {len(summary.failed)} video(s) failed")
    for path, reason in summary.failed:
        print(f"  failed: {path}: {reason}")
    return 1 if not summary.written else 0


if __name__ == "__main__":
    sys.exit(main())
