"""What to build from: the sources found under the input directory and the split each one belongs to.

Layouts:
* `videos`: every video file below the input (by extension); a source id is its path relative to the
  input, e.g. `clips/abc.mp4`.
* `ytf`: YouTube Faces, `frame_images_DB/<person>/<n>/*.jpg`; a source id is `<person>/<n>`, the `path` of
  the official split CSVs.

Splits come from `train_set.csv` / `val_set.csv` (column `path` = source id; the official MARLIN YouTube Faces
split) when a CSV directory is given; listed ids that are not found, and found ids not listed, are reported
as skipped. Otherwise groups (a person for `ytf`, so no identity is in both splits; a file for `videos`) are
sorted and every group whose evenly spaced slot falls to validation (`val_fraction` of them, exactly rounded
down) goes to `val`.

The input and the CSV folder may be local or in a bucket (`etils.epath`).
"""

import csv
import dataclasses
import io
import os

from etils import epath

from marlin_jax import storage

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm")
LAYOUTS = ("videos", "ytf")
SPLITS = ("train", "val")
_YTF_FRAMES_DIR = "frame_images_DB"


@dataclasses.dataclass(frozen=True)
class Source:
    source_id: str
    path: str  # a video file, or a folder of frame images
    split: str


def find_sources(input_dir: str | os.PathLike, layout: str) -> dict[str, epath.Path]:
    """Source id -> path, for every source of `layout` under `input_dir`."""
    root = epath.Path(input_dir)
    if not root.is_dir():
        raise ValueError(f"input directory {root} does not exist")
    if layout == "videos":
        found = {path.relative_to(root).as_posix(): path for path in storage.files_under(root)
                 if path.suffix.lower() in VIDEO_EXTENSIONS}
    elif layout == "ytf":
        frames_root = root / _YTF_FRAMES_DIR
        if not frames_root.is_dir():
            raise ValueError(f"{root} is not a YouTube Faces directory: {frames_root} is missing")
        found = {f"{path.parent.name}/{path.name}": path for path in frames_root.glob("*/*") if path.is_dir()}
    else:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not found:
        raise ValueError(f"no {layout} sources found under {root}")
    return dict(sorted(found.items()))


def read_split_csvs(csv_dir: str | os.PathLike) -> dict[str, str]:
    """Source id -> split from `<csv_dir>/{train,val}_set.csv` (the official MARLIN format: `path,len`)."""
    assignment = {}
    for split in SPLITS:
        csv_path = epath.Path(csv_dir) / f"{split}_set.csv"
        if not csv_path.is_file():
            raise ValueError(f"split CSV {csv_path} is missing")
        # csv needs newline="" (epath's open has no such option): parse the text through a StringIO given it.
        reader = csv.DictReader(io.StringIO(csv_path.read_text(), newline=""))
        if "path" not in (reader.fieldnames or ()):
            raise ValueError(f"{csv_path} has no 'path' column (columns: {reader.fieldnames})")
        for row in reader:
            if assignment.setdefault(row["path"], split) != split:
                raise ValueError(f"{row['path']} is listed in both split CSVs")
    return assignment


def sorted_group_split(source_ids: list[str], layout: str, val_fraction: float) -> dict[str, str]:
    """Source id -> split: sorted groups, `val_fraction` of them evenly spaced to `val`. A corpus too small for
    that share to make up a whole group still gets one val group (the last) when it has two or more, so that
    validation has something to read."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    group_of = {sid: sid.split("/")[0] if layout == "ytf" else sid for sid in source_ids}
    groups = sorted(set(group_of.values()))
    # Group i is val when the running count floor((i + 1) * f) steps up: exact total, spread evenly.
    val_groups = {group for i, group in enumerate(groups)
                  if int((i + 1) * val_fraction) > int(i * val_fraction)}
    if val_fraction > 0 and not val_groups and len(groups) >= 2:
        val_groups = {groups[-1]}
    return {sid: "val" if group_of[sid] in val_groups else "train" for sid in source_ids}


def plan_sources(input_dir, layout: str, split_csv_dir=None,
                 val_fraction: float = 0.05) -> tuple[list[Source], list[dict]]:
    """The sources to build (sorted by id) and the skipped ones, each as {"source_id", "reason"}."""
    found = find_sources(input_dir, layout)
    if split_csv_dir is None:
        splits = sorted_group_split(list(found), layout, val_fraction)
        return [Source(sid, str(path), splits[sid]) for sid, path in found.items()], []
    listed = read_split_csvs(split_csv_dir)
    sources = [Source(sid, str(path), listed[sid]) for sid, path in found.items() if sid in listed]
    skipped = [{"source_id": sid, "reason": "not listed in the split CSVs"} for sid in found if sid not in listed]
    skipped += [{"source_id": sid, "reason": f"listed in {split}_set.csv but not found in the input"}
                for sid, split in sorted(listed.items()) if sid not in found]
    if not sources:
        raise ValueError(f"none of the sources under {input_dir} is listed in the CSVs in {split_csv_dir}")
    return sources, skipped
