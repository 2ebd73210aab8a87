"""Where a compiled TPU program's temporaries go: the buffers live at its memory peak, from its optimised HLO.

    python -m marlin_jax.aot --config configs/pretrain/marlin_vit_base.py --topology v5e:2x2 \
        --config.batch_size=64 --programs=train_step --hlo_dir /tmp/hlo
    python benchmarks/tpu_memory.py /tmp/hlo/train_step.hlo.txt > memory.json

The compiler's own `memory_analysis()` gives only the total. This script replays the entry computation's schedule
(the compiled HLO is scheduled): each instruction's output is a buffer of its padded size (TPU layouts tile the two
most-minor dimensions, e.g. to 8 x 128), live from its definition to its last use; bitcasts and tuple elements
are views of their operand. The sweep's peak, and the buffers live there grouped by the JAX operation that made
them (HLO metadata), show what to shrink. It is an estimate: buffers inside loops and fusions, in-place updates
and the compiler's own rematerialisation are not modelled, so compare its total with `temporaries` from the
command's JSON before trusting the split.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import re

ELEMENT_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
                 "s64": 8, "u64": 8, "f64": 8, "token": 0}
ARRAY = re.compile(r"(\w+)\[([\d,]*)\](?:\{([^}]*)\})?")
INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*)$")
VIEWS = {"bitcast", "get-tuple-element", "tuple", "parameter", "constant", "copy-done", "all-reduce-done",
         "all-gather-done", "collective-permute-done", "async-done"}


def array_bytes(dtype: str, dims: str, layout: str | None) -> int:
    """Bytes of one array as laid out: the tile (T(a,b)) pads the most-minor dimension to b and the next to a;
    arrays in the on-chip memory space (S(1)) take no HBM."""
    shape = [int(d) for d in dims.split(",") if d]
    if layout and "S(1)" in layout:
        return 0
    if layout and shape:
        order_text, _, tiling = layout.partition(":")
        order = [int(d) for d in order_text.split(",") if d.strip().isdigit()]
        tile = re.search(r"T\(([\d,]+)\)", tiling)
        if tile and order:
            sizes = [int(t) for t in tile[1].split(",")]
            for position, tile_size in zip(order, reversed(sizes)):
                shape[position] = math.ceil(shape[position] / tile_size) * tile_size
    return math.prod(shape) * ELEMENT_BYTES.get(dtype, 4)


def split_shape(text: str) -> tuple[str, str]:
    """'(f32[2]{0}, s32[]) opcode(...' -> (shape text, rest)."""
    if not text.startswith("("):
        shape, _, rest = text.partition(" ")
        return shape, rest
    depth = 0
    for index, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0:
            return text[:index + 1], text[index + 2:]
    raise ValueError(f"unbalanced shape: {text[:80]}")


def operand_text(rest: str) -> str:
    """The operand list of 'opcode(%a, %b), attributes...'."""
    start = rest.index("(")
    depth = 0
    for index in range(start, len(rest)):
        depth += {"(": 1, ")": -1}.get(rest[index], 0)
        if depth == 0:
            return rest[start + 1:index]
    return rest[start + 1:]


def entry_instructions(hlo: str) -> list[dict]:
    lines = hlo.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("ENTRY"))
    instructions = []
    for line in lines[start + 1:]:
        if line == "}":  # the computation's end (a custom call's metadata also has lines starting with '}')
            break
        match = INSTRUCTION.match(line)
        if not match:
            continue
        name, text = match.groups()
        shape, rest = split_shape(text)
        opcode = rest.split("(", 1)[0]
        source = re.search(r'op_name="([^"]*)"', rest)
        instructions.append({
            "name": name, "opcode": opcode, "root": line.lstrip().startswith("ROOT"),
            "arrays": [array_bytes(*array.groups()) for array in ARRAY.finditer(shape)],
            "shape": shape if len(shape) < 120 else shape[:117] + "...",
            "operands": re.findall(r"%([\w.\-]+)", operand_text(rest)) if "(" in rest else [],
            "source": source[1] if source else "",
        })
    return instructions


def peak_live_buffers(hlo: str) -> dict:
    instructions = entry_instructions(hlo)
    {inst["name"]: index for index, inst in enumerate(instructions)}
    owners: dict[str, list[str]] = {}  # instruction -> the buffers its value lives in
    last_use: dict[str, int] = {}
    buffers: dict[str, dict] = {}
    outputs = set()
    for index, inst in enumerate(instructions):
        if inst["opcode"] in VIEWS:
            owners[inst["name"]] = [b for operand in inst["operands"] for b in owners.get(operand, [])]
        else:
            owners[inst["name"]] = [inst["name"]]
            buffers[inst["name"]] = {"bytes": sum(inst["arrays"]), "defined": index, "opcode": inst["opcode"],
                                     "shape": inst["shape"], "source": inst["source"]}
        for operand in inst["operands"]:
            for buffer in owners.get(operand, []):
                last_use[buffer] = index
        if inst["root"]:
            outputs.update(owners[inst["name"]])
    events = collections.defaultdict(int)
    for name, buffer in buffers.items():
        if name in outputs:
            continue
        end = last_use.get(name, buffer["defined"])
        events[buffer["defined"]] += buffer["bytes"]
        events[end + 1] -= buffer["bytes"]
    live, peak, peak_at = 0, 0, 0
    for index in sorted(events):
        live += events[index]
        if live > peak:
            peak, peak_at = live, index
    at_peak = [dict(name=name, **buffer) for name, buffer in buffers.items() if name not in outputs
               and buffer["defined"] <= peak_at <= last_use.get(name, buffer["defined"])]
    at_peak.sort(key=lambda b: -b["bytes"])
    by_source = collections.Counter()
    for buffer in at_peak:
        by_source[" / ".join(buffer["source"].split("/")[1:4]) or buffer["opcode"]] += buffer["bytes"]
    return {"peak_temporaries_bytes": peak, "peak_at": instructions[peak_at]["name"] if instructions else None,
            "peak_at_source": instructions[peak_at]["source"] if instructions else None,
            "live_at_peak_by_source": [{"source": s, "bytes": b} for s, b in by_source.most_common(25)],
            "largest_live_at_peak": [{k: b[k] for k in ("name", "bytes", "opcode", "shape", "source")}
                                     for b in at_peak[:25]]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("hlo", help="A <program>.hlo.txt written by python -m marlin_jax.aot --hlo_dir.")
    args = parser.parse_args()
    with open(args.hlo) as file:
        print(json.dumps(peak_live_buffers(file.read()), indent=2))


if __name__ == "__main__":
    main()
