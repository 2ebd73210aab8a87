"""The README and docs/ say what the code does: every relative link resolves (file and heading), every
`python -m` command shown parses (each flag it shows is one its entry point's --help lists, each
`--config.x` override names a field of the config it loads), and the PyTorch snippet runs as written."""

from __future__ import annotations

import concurrent.futures
import functools
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from marlin_jax.config_files import load_config

REPO_ROOT = Path(__file__).resolve().parents[1]
PAGES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
ENTRY_POINTS = ("marlin_jax.", "data_prep.")
KINDS = {"marlin_jax.train": "pretrain", "marlin_jax.finetune": "finetune", "marlin_jax.linear_probe": "probe",
         "marlin_jax.aot": None}
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"```(?:bash|sh|shell)?\n(.*?)```", re.S)


def heading_anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation other than - and _ dropped, spaces as -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {heading_anchor(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


def links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return [a or b for a, b in _LINK.findall(text)]


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_relative_link_resolves(page):
    for target in links(page):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.name}: link to {target}: {file} does not exist"
        if anchor:
            assert anchor in anchors(file), f"{page.name}: link to {target}: no such heading in {file.name}"


def shown_commands() -> list[tuple[str, str, list[str]]]:
    """(page, module, arguments) of every `python -m <entry point>` the pages show: in shell blocks (continued lines
    joined, chained commands split) and in inline code."""
    found = []
    for page in PAGES:
        text = page.read_text()
        lines = [line for block in _FENCE.findall(text) for line in block.replace("\\\n", " ").splitlines()]
        lines += re.findall(r"`(python -m [^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
        for line in lines:
            for command in re.split(r"&&|;|\|", line.split(" #")[0]):
                if "python -m" not in command:
                    continue
                # Quotes around a pod's --command "...": dropped, so the command inside reads as typed.
                words = shlex.split(command.replace('"', ""), posix=True)
                words = words[words.index("python"):] if "python" in words else []
                if words[:2] == ["python", "-m"] and words[2].startswith(ENTRY_POINTS):
                    found.append((page.name, words[2], words[3:]))
    return found


@functools.cache
def help_flags(module: str) -> frozenset[str]:
    done = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
    # absl ends --help with exit status 1.
    assert done.returncode in (0, 1) and "flags:" in done.stdout, f"{module} --help failed: {done.stderr[-2000:]}"
    return frozenset(re.findall(r"^\s+--(?:\[no\])?(\w+)", done.stdout, flags=re.M))


def flag_names(arguments: list[str]) -> list[str]:
    return [argument[2:].split("=")[0] for argument in arguments if argument.startswith("--")]


def config_field_exists(config, dotted: str) -> bool:
    node = config
    for key in dotted.split("."):
        if not hasattr(node, "keys") or key not in node:
            return False
        node = node[key]
    return True


def test_every_command_shown_parses():
    commands = shown_commands()
    assert len(commands) >= 20 and {module for _, module, _ in commands} >= {
        "marlin_jax.train", "marlin_jax.export", "marlin_jax.extract", "marlin_jax.linear_probe",
        "marlin_jax.finetune", "data_prep.build", "data_prep.demo"}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # the --help runs are subprocesses
        list(pool.map(help_flags, sorted({module for _, module, _ in commands})))
    for page, module, arguments in commands:
        shown = f"{page}: python -m {module} {' '.join(arguments)}"
        names = flag_names(arguments)
        beam_options = module == "data_prep.build" and "runner" in names
        for name in names:
            name = name.replace("-", "_")
            if name.startswith("config."):
                continue
            known = name in help_flags(module) or (name.startswith("no") and name[2:] in help_flags(module))
            assert known or beam_options, f"{shown}: --{name} is not a flag of {module}"
        if beam_options:
            from data_prep.beam_pipeline import pipeline_options
            runner = next(a.split("=")[1] for a in arguments if a.startswith("--runner="))
            own = {f"--{name}" for name in help_flags(module)}
            pipeline_options(runner, 1, [a for a in arguments if a.split("=")[0] not in own])
        config = next((a.split("=", 1)[1] for a in arguments if a.startswith("--config=")), None)
        if config is None and "--config" in arguments:
            config = arguments[arguments.index("--config") + 1]
        overrides = [name[len("config."):] for name in names if name.startswith("config.")]
        if overrides:
            loaded = load_config(config, KINDS.get(module))
            for field in overrides:
                assert config_field_exists(loaded, field), f"{shown}: {config} has no field {field}"


def test_commands_are_found():
    """The parser above sees continued lines and chained commands."""
    assert ("README.md", "marlin_jax.train", ["--config", "marlin_vit_small:demo", "--workdir", "runs/demo_run",
                                              "--config.data.path=runs/demo/shards"]) in shown_commands()


def test_the_pytorch_snippet_runs_as_written(tmp_path, torch, marlin_pytorch):
    """docs/training.md's snippet, run in a fresh interpreter (no stand-in from the test fixtures) on files that
    `Marlin.to_pytorch` writes where the snippet looks for them."""
    import flax.linen as nn
    import jax

    from marlin_jax import Marlin
    from marlin_jax.marlin import resolve_architecture
    from marlin_jax.model import init_params

    text = (REPO_ROOT / "docs" / "training.md").read_text()
    snippet = text.split("<!-- the snippet below is run by tests/test_docs.py -->\n```python\n", 1)[1].split("```")[0]
    architecture = resolve_architecture("marlin_vit_small:demo")
    generator, _ = init_params(jax.random.key(0), architecture)
    Marlin(architecture, nn.meta.unbox(generator)).to_pytorch(tmp_path / "runs/demo_run/exported/marlin_vit_small_demo_step800")
    done = subprocess.run([sys.executable, "-c", snippet + "\nprint(type(model).__name__)"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "Marlin"
