"""The TPU sizing table of docs/tpu.md: MARLIN pretraining compiled for TPU slices on this CPU machine by
`python -m marlin_jax.aot`, one command per cell, and the results as JSON.

    nice -n 19 python benchmarks/tpu_sizing.py --out tpu_sizing.json

Cells:
- `paper`: ViT-S, ViT-B and ViT-L at the paper recipe (global batch 256, bf16, remat, mesh (-1, 1, 1)) on v4-8,
  v5e-8, v5p-8, v6e-8 and a 32-chip v5e slice: fits, HBM per chip, mesh, hours for 2000 epochs of YouTube Faces
  at 50% MFU.
- `largest`: the largest per-chip batch that compiles on v5e (16 GiB per chip, the least HBM), on a v5e:2x2
  slice (data parallel: per-chip memory does not depend on the slice size). The v5e-8 paper cell's
  temporaries, scaled linearly, predict it; steps from there bracket it between a batch that compiles and one
  that does not, and bisection narrows that to `--resolution` clips per chip (a handful of compiles per model).

Each compile takes minutes (ViT-L: tens of minutes on 2 busy cores); `--models` and `--cells` pick a subset, and
results already in `--out` are kept and not recompiled, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import subprocess
import sys
import tempfile

# This process only starts the compiles; its JAX (for the machine block) stays on the CPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(pathlib.Path(__file__).parent))
import mfu  # noqa: E402  (benchmarks/ is not a package; its machine() block)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
MODELS = {"small": "configs/pretrain/marlin_vit_small.py", "base": "configs/pretrain/marlin_vit_base.py",
          "large": "configs/pretrain/marlin_vit_large.py"}
# Google's accelerator types -> topologies (v4 and v5p name TensorCores, two per chip; v5e and v6e name chips).
SLICES = {"v4-8": "v4:2x2x1", "v5e-8": "v5e:2x4", "v5p-8": "v5p:2x2x1", "v6e-8": "v6e:2x4", "v5e-32": "v5e:4x8"}
PAPER_BATCH = 256
SEARCH_TOPOLOGY, SEARCH_CHIPS = "v5e:2x2", 4
GIB = 2 ** 30


def compile_cell(config: str, topology: str, batch: int) -> dict:
    """One `python -m marlin_jax.aot` run; its JSON report, or the error it printed."""
    with tempfile.TemporaryDirectory() as folder:
        report_path = pathlib.Path(folder) / "report.json"
        command = [sys.executable, "-m", "marlin_jax.aot", "--config", config, "--topology", topology,
                   f"--config.batch_size={batch}", "--programs=train_step", "--json", str(report_path)]
        result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
        if not report_path.exists():
            return {"error": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "no report",
                    "returncode": result.returncode}
        report = json.loads(report_path.read_text())
        return {"command": " ".join(["python", "-m", "marlin_jax.aot", *command[3:-2]]), **report}


def cell_summary(report: dict) -> dict:
    if "error" in report:
        return report
    memory = report["hbm_per_chip_bytes"]
    return {"fits": report["fits"], "mesh": report["mesh"], "chips": report["chips"], "chip": report["chip"],
            "per_chip_batch": report["per_chip_batch"],
            "hbm_per_chip_gib": {k: None if v is None else round(v / GIB, 2) for k, v in memory.items()},
            "hours_at_50pct_mfu": report["hours_at_50pct_mfu"], "compile_seconds": report["compile_seconds"],
            "attention": report["attention"], "command": report["command"],
            "compiler_error": report["programs"]["train_step"].get("compiler_error")}


def predicted_largest_batch(paper_v5e: dict) -> int:
    """Per-chip batch at which the v5e-8 paper cell's memory, temporaries scaled linearly, reaches the HBM."""
    memory, per_chip = paper_v5e["hbm_per_chip_gib"], paper_v5e["per_chip_batch"]
    fixed = memory["total"] - memory["temporaries"]
    return max(1, int((memory["capacity"] - fixed) / (memory["temporaries"] / per_chip)))


def largest_batch(config: str, start: int, resolution: int, results: dict, save) -> dict:
    """The largest per-chip batch (a multiple of `resolution`) that compiles: from `start`, steps of growing size
    bracket it between one that compiles and one that does not, then bisection closes the gap."""
    def fits(per_chip: int) -> bool:
        key = f"{SEARCH_TOPOLOGY} per_chip={per_chip}"
        if key not in results:
            results[key] = cell_summary(compile_cell(config, SEARCH_TOPOLOGY, per_chip * SEARCH_CHIPS))
            save()
        if "error" in results[key]:
            raise RuntimeError(f"{config} at {per_chip} clips per chip: {results[key]['error']}")
        return bool(results[key]["fits"])

    start = max(resolution, start // resolution * resolution)
    stride = resolution
    if fits(start):
        low, high = start, start + stride
        while fits(high):
            low, stride = high, stride * 2
            high = low + stride
    else:
        high, low = start, start - stride
        while low > 0 and not fits(low):
            high, stride = low, stride * 2
            low = max(0, high - stride)
    while high - low > resolution:
        middle = (low + high) // 2 // resolution * resolution
        low, high = (middle, high) if fits(middle) else (low, middle)
    return {"largest_per_chip_batch": low, "resolution": resolution, "topology": SEARCH_TOPOLOGY,
            "compiles": len(results)}


def markdown(table: dict) -> str:
    """docs/tpu.md's sizing table from the JSON: one row per model and slice, then the largest batch on v5e."""
    rows = ["| model | slice | fits | mesh | clips per chip | HBM per chip: total (arguments + temporaries) | "
            "hours for 2000 epochs at 50% MFU | compile s |", "|---|---|---|---|---|---|---|---|"]
    for model in MODELS:
        for accelerator, topology in SLICES.items():
            cell = table.get(model, {}).get(accelerator)
            if cell is None:
                rows.append(f"| ViT-{model[0].upper()} | {accelerator} ({topology}) | not compiled yet | | | | | |")
                continue
            if "error" in cell:
                rows.append(f"| ViT-{model[0].upper()} | {accelerator} ({topology}) | error: {cell['error']} "
                            "| | | | | |")
                continue
            memory, mesh = cell["hbm_per_chip_gib"], cell["mesh"]
            rows.append(f"| ViT-{model[0].upper()} | {accelerator} ({topology}) | {'yes' if cell['fits'] else 'no'} | "
                        f"({mesh['data']}, {mesh['fsdp']}, {mesh['tensor']}) | {cell['per_chip_batch']:g} | "
                        f"{memory['total']:.2f} GiB ({memory['arguments']:.2f} + {memory['temporaries']:.2f}) of "
                        f"{memory['capacity']:g} | {cell['hours_at_50pct_mfu']:.2f} | {cell['compile_seconds']:.0f} |")
    largest = [f"ViT-{model[0].upper()}: {found['largest_per_chip_batch']} clips per chip (to {found['resolution']})"
               for model in MODELS if (found := table.get(model, {}).get("largest_v5e"))]
    if largest:
        rows += ["", "Largest per-chip batch that compiles on v5e: " + "; ".join(largest) + "."]
    return "\n".join(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON file; cells already in it are kept.")
    parser.add_argument("--models", default="small,base,large")
    parser.add_argument("--cells", default="paper,largest")
    parser.add_argument("--slices", default=",".join(SLICES), help="The paper cells' slices, in the order to compile.")
    parser.add_argument("--resolution", type=int, default=8, help="Clips per chip the largest-batch search resolves.")
    parser.add_argument("--markdown", action="store_true",
                        help="Print the table of --out as Markdown; compile nothing.")
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    table = json.loads(out.read_text()) if out.exists() else {}
    if args.markdown:
        print(markdown(table))
        return
    table.setdefault("runs", []).append({"started": datetime.datetime.now().isoformat(timespec="seconds"),
                                         "machine": mfu.machine()})

    def save():
        out.write_text(json.dumps(table, indent=2))

    cells, models = args.cells.split(","), args.models.split(",")
    if "paper" in cells:
        for model in models:
            results = table.setdefault(model, {})
            for accelerator in args.slices.split(","):
                topology = SLICES[accelerator]
                if accelerator not in results:
                    results[accelerator] = {"topology": topology,
                                            **cell_summary(compile_cell(MODELS[model], topology, PAPER_BATCH))}
                    save()
    if "largest" in cells:
        for model in models:
            results = table.setdefault(model, {})
            if "largest_v5e" in results:
                continue
            if "v5e-8" not in results:
                results["v5e-8"] = {"topology": SLICES["v5e-8"],
                                    **cell_summary(compile_cell(MODELS[model], SLICES["v5e-8"], PAPER_BATCH))}
            paper = results["v5e-8"]
            start = (predicted_largest_batch(paper) if paper.get("fits")
                     else int(paper["per_chip_batch"]) // 2)
            results["largest_v5e"] = {"predicted": start, **largest_batch(
                MODELS[model], start, args.resolution, results.setdefault("largest_search", {}), save)}
            save()
    table["runs"][-1]["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    table["runs"][-1]["load_average_at_finish"] = [round(x, 2) for x in os.getloadavg()]
    save()
    print(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
