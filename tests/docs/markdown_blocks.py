"""The fenced code blocks of the README and of the documentation site, each with the file and
line it starts on, so that a test can name the block it refuses."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
README = ROOT / "README.md"

_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    heading: str  # the nearest heading above the block

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def blocks_of(path: Path) -> list[Block]:
    """Every fenced block of one Markdown file, in order (an unclosed one runs to the end)."""
    found: list[Block] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    heading = ""
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if match is None:
            if lines[i].startswith("#"):
                heading = lines[i].strip()
            i += 1
            continue
        indent, fence = len(match["indent"]), match["fence"]
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            body.append(lines[j][indent:])
            j += 1
        lang = match["info"].strip().split(" ")[0].lower()
        found.append(Block(path, i + 1, lang, "\n".join(body) + "\n", heading))
        i = j + 1
    return found


def all_blocks() -> list[Block]:
    return [block for path in markdown_files() for block in blocks_of(path)]


def install_block(blocks: list[Block]) -> Block:
    """The first ```sh block after the README's "## Install" heading: the one
    tests/integration/test_install.py runs."""
    return next(b for b in blocks if b.path == README and b.heading == "## Install" and b.lang == "sh")
