"""Every ```python block of README.md and docs/**/*.md runs as pasted, and shows what it prints.

Each block is executed on its own, in a fresh namespace (so it must hold its
imports and data), in a temporary working directory. When the next fenced
block after it (blank lines between only) is a ```text block, that is the
block's printed output and is compared with doctest's rules (ELLIPSIS,
NORMALIZE_WHITESPACE): write `...` where a figure is not deterministic.

A block that sets `XLA_FLAGS` (for example 8 virtual CPU devices for the
sharding guide) runs in a fresh Python process, as it would when pasted into
one; the others run in this process, with JAX's rank promotion allowed and
warnings shown rather than raised, as a user has them (conftest.py and
pytest's filterwarnings make both strict for the library's own tests).

Also checked: the API reference documents every public name, and the README
stays a README (short, with the two make commands and the recommended default).
"""

import contextlib
import dataclasses
import doctest
import inspect
import io
import os
import pathlib
import re
import subprocess
import sys
import warnings

import jax
import pytest

import optaxclip
from optaxclip import privacy

ROOT = pathlib.Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")


@dataclasses.dataclass
class Block:
    path: pathlib.Path
    line: int  # 1-based line of the opening fence
    info: str
    source: str
    expected: str | None = None
    end: int = 0  # 0-based index of the closing fence's line

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def fenced_blocks(path: pathlib.Path) -> list[Block]:
    """The fenced blocks of a Markdown file, in order (indented fences, as in list items, included)."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, info = len(m["indent"]), m["fence"], m["info"].strip()
        body, j = [], i + 1
        while j < len(lines) and not re.match(
            rf"^ {{0,{indent + 3}}}{fence[0]}{{{len(fence)},}}\s*$", lines[j]
        ):
            body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j])
            j += 1
        blocks.append(Block(path, i + 1, info, "\n".join(body) + "\n", end=j))
        i = j + 1
    return blocks


def python_blocks(path: pathlib.Path) -> list[Block]:
    """The ```python blocks, each with the ```text block that directly follows it as its output."""
    lines = path.read_text().splitlines()
    blocks = fenced_blocks(path)
    out = []
    for k, b in enumerate(blocks):
        if b.info.split()[:1] != ["python"]:
            continue
        nxt = blocks[k + 1] if k + 1 < len(blocks) else None
        between = lines[b.end + 1 : nxt.line - 1] if nxt else []
        if nxt and nxt.info == "text" and all(not s.strip() for s in between):
            b.expected = nxt.source
        out.append(b)
    return out


def doc_files() -> list[pathlib.Path]:
    docs = sorted(p for p in (ROOT / "docs").rglob("*.md") if "_build" not in p.parts)
    return [ROOT / "README.md", *docs]


BLOCKS = [b for path in doc_files() for b in python_blocks(path)]


def run_in_process(block: Block) -> str:
    code = compile(block.source, block.id, "exec")
    namespace = {"__name__": "__main__"}
    out = io.StringIO()
    # As a user runs it: rank promotion allowed and warnings shown, not raised (conftest and
    # pytest's filterwarnings make both strict for the library's own tests).
    with contextlib.redirect_stdout(out), jax.numpy_rank_promotion("allow"), warnings.catch_warnings():
        warnings.simplefilter("default")
        exec(code, namespace)
    return out.getvalue()


def run_in_subprocess(block: Block) -> str:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", block.source], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"{block.id} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_block_runs_as_pasted(block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    printed = run_in_subprocess(block) if "XLA_FLAGS" in block.source else run_in_process(block)
    if block.expected is not None:
        assert output_matches(block.expected, printed), (
            f"{block.id} printed:\n{printed}\nthe page shows:\n{block.expected}"
        )


def output_matches(expected: str, printed: str) -> bool:
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    return doctest.OutputChecker().check_output(expected, printed, flags)


def test_output_check_can_fail():
    assert output_matches("loss 0.12...\n", "loss 0.1234\n")
    assert not output_matches("loss 0.12\n", "loss 0.13\n")
    assert not output_matches("a\nb\n", "a\n")


def test_blocks_found():
    """The collector sees the blocks (a parser bug must not turn this file into zero tests)."""
    files = {b.path.name for b in BLOCKS}
    assert {"README.md", "dp.md", "sharding.md"} <= files, files
    assert sum(b.expected is not None for b in BLOCKS) >= 5


def test_fence_parser_handles_indented_and_output_blocks(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "text\n\n```python\nprint(1)\n```\n\n```text\n1\n```\n\n- item\n\n  ```python\n  x = 2\n  ```\n"
        "\n```bash\nls\n```\n\n```python\nprint(3)\n```\n"
    )
    blocks = python_blocks(page)
    assert [b.source for b in blocks] == ["print(1)\n", "x = 2\n", "print(3)\n"]
    assert [b.expected for b in blocks] == ["1\n", None, None]


def documented_names() -> set[str]:
    names = set()
    for page in (ROOT / "docs" / "api").glob("*.md"):
        text = page.read_text()
        module = "optaxclip.privacy" if "currentmodule:: optaxclip.privacy" in text else "optaxclip"
        for name in re.findall(r"^\.\. auto(?:function|class):: ([\w.]+)$", text, re.M):
            names.add(name if "." in name else f"{module}.{name}")
    return names


def test_api_reference_documents_every_public_name():
    public = {f"optaxclip.{n}" for n in optaxclip.__all__}
    public |= {
        f"optaxclip.privacy.{n}"
        for n, obj in vars(privacy).items()
        if not n.startswith("_") and inspect.isfunction(obj) and obj.__module__ == privacy.__name__
    }
    documented = documented_names()
    assert public - documented == set(), "not in docs/api/*.md"
    assert documented - public == set(), "documented but not public"


def test_readme_is_a_readme():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    for must in ("make demo", "make test", "make docs", "pip install", "optaxclip.guard_clip()"):
        assert must in text, must
    quickstart = next(b for b in python_blocks(ROOT / "README.md"))
    assert "optax.chain(optaxclip.guard_clip(), optax.adam(1e-3))" in quickstart.source
    assert len([s for s in quickstart.source.splitlines() if s.strip()]) <= 22  # a screenful
