"""The docs run as printed and point at real files.

Every ```python block in README.md, models/README.md and ops/*/README.md is executed in a
fresh namespace on this one process (tiny sizes, so the whole file takes seconds). A block
that cannot run on one process says so on the line before it:

    <!-- doctest: skip (needs 2 ranks) -->

and is skipped with that reason. Relative links in README.md and models/README.md must name a
file inside the repository (a link out of the checkout breaks for everyone who clones it).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["README.md", "models/README.md"] + sorted(
    str(p.relative_to(ROOT)) for p in ROOT.glob("ops/*/README.md"))
LINKED_DOCS = ["README.md", "models/README.md"]
OPTIONAL = {"transformers", "matplotlib"}  # extras a snippet may need (pip install -e '.[test]')
SKIP = re.compile(r"<!--\s*doctest:\s*skip\s*(?:\((?P<why>[^)]*)\))?\s*-->")
FENCE = re.compile(r"^```(?P<lang>\S*)\s*$")

# Blocks in files this test's owner does not edit, broken today (names undefined on one
# process). strict: once a block is fixed its entry must go, so the list never goes stale.
KNOWN_BROKEN: dict[tuple[str, int], str] = {}  # (path, block index) -> why it cannot run yet


def fenced_blocks(path: str | Path, language: str) -> list[tuple[int, int, str, str | None]]:
    """(index from 1, first code line, code, skip reason or None) for each ```language block."""
    lines = (ROOT / path).read_text().splitlines()
    blocks, i, index = [], 0, 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m or not m["lang"]:
            i += 1
            continue
        start, lang = i, m["lang"]
        i += 1
        while i < len(lines) and not lines[i].startswith("```"):
            i += 1
        if lang == language:
            index += 1
            before = next((ln for ln in reversed(lines[:start]) if ln.strip()), "")
            skip = SKIP.search(before)
            why = (skip["why"] or "marked skip") if skip else None
            blocks.append((index, start + 2, "\n".join(lines[start + 1:i]), why))
        i += 1
    return blocks


def python_blocks(path: str | Path) -> list[tuple[int, int, str, str | None]]:
    return fenced_blocks(path, "python")


def _cases():
    for path in DOCS:
        for index, line, code, why in python_blocks(path):
            marks = []
            if why is not None:
                marks.append(pytest.mark.skip(reason=why))
            elif (path, index) in KNOWN_BROKEN:
                marks.append(pytest.mark.xfail(reason=KNOWN_BROKEN[(path, index)], strict=True))
            yield pytest.param(path, line, code, id=f"{path}:{line}", marks=marks)


@pytest.mark.parametrize("path,line,code", list(_cases()))
def test_python_block_runs_as_printed(path, line, code):
    # compiled under the doc's name and line, so a traceback points into the README
    compiled = compile("\n" * (line - 1) + code, str(ROOT / path), "exec")
    try:
        exec(compiled, {"__name__": f"doc:{path}:{line}"})
    except ModuleNotFoundError as e:
        if e.name not in OPTIONAL:
            raise
        pytest.skip(f"optional dependency {e.name} is not installed")


def test_every_python_block_is_found(tmp_path):
    # the extractor must see the blocks it claims to run (a fence it misses is never tested)
    assert [b[0] for b in python_blocks("models/README.md")] == [1, 2, 3]
    assert len(python_blocks("README.md")) >= 2
    doc = tmp_path / "doc.md"
    doc.write_text("text\n\n<!-- doctest: skip (needs 2 ranks) -->\n\n```python\nx = 1\n```\n"
                   "```bash\nls\n```\n```python\ny = 2\nz = 3\n```\n")
    assert python_blocks(doc) == [(1, 6, "x = 1", "needs 2 ranks"), (2, 12, "y = 2\nz = 3", None)]


def test_readme_commands_assume_the_activated_venv():
    # README.md says once to `source .venv/bin/activate`; a command spelled `.venv/bin/seqshard`
    # elsewhere would make readers wonder which of the two ways is right
    for path in LINKED_DOCS:
        for _, line, code, _ in fenced_blocks(path, "bash"):
            for n, text in enumerate(code.splitlines(), line):
                if ".venv/bin/" in text:
                    assert text.strip() == "source .venv/bin/activate", f"{path}:{n}: {text}"


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("path", LINKED_DOCS)
def test_relative_links_stay_inside_the_repository(path):
    text = (ROOT / path).read_text()
    bad = []
    for target in LINK.findall(text) + re.findall(r"`(\.\./[^`\s]+)`", text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a URL or an anchor in the same page
        file = (ROOT / path).parent / target.split("#")[0]
        resolved = file.resolve()
        if not resolved.is_relative_to(ROOT) or not resolved.exists():
            bad.append(target)
    assert not bad, f"{path}: links outside the repository or to missing files: {bad}"
