"""`python tests/bench/version_child.py SPEC ARGS...`: the relay's own CLI (`python -m PACKAGE
ARGS...`), then a check that it ran the version it was meant to (see tests/bench/bench_versions.py).

SPEC is a JSON object:
  run     the package run as `python -m`: "relay" (before the rename) or "outbox_relay";
  ours    top-level names whose every loaded module must come from under one of `roots`;
  roots   folders the version's code lives in;
  theirs  top-level names of the other version, of which no module may be loaded at all;
  report  a file to write, as JSON, the `__file__` of every loaded module of `ours`.

The check runs after the CLI has returned, so it also covers the plugins that the registry loads
through entry points (both versions declare the same entry point groups, and it is the first
distribution on sys.path that wins). A failed check exits 3 with the reason on stderr.

Run as a script, not with -m: -m puts the working directory first on sys.path, and a checkout's
`relay/` folder there would shadow the base version's `relay` package. This file therefore
imports nothing of the project.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path
from typing import TypedDict

#: Wrong imports named in the message of a failed check (one wrong package imports dozens).
_SHOWN = 5


class Spec(TypedDict):
    """What the child runs and checks (see the module's docstring)."""

    run: str
    ours: list[str]
    roots: list[str]
    theirs: list[str]
    report: str


def loaded_files(names: list[str]) -> dict[str, str]:
    """`__file__` of every loaded module whose top-level name is in `names` (namespace packages,
    without a file, are left out)."""
    files: dict[str, str] = {}
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] in names and getattr(module, "__file__", None):
            files[name] = str(module.__file__)
    return files


def wrong_imports(spec: Spec) -> list[str]:
    """What was imported from somewhere else than the version's folders, or from the other version."""
    roots = [Path(root).resolve() for root in spec["roots"]]
    wrong = [
        f"{name} from {path}"
        for name, path in loaded_files(spec["ours"]).items()
        if not any(Path(path).resolve().is_relative_to(root) for root in roots)
    ]
    wrong += [
        f"{name} (the other version) from {path}" for name, path in loaded_files(spec["theirs"]).items()
    ]
    if spec["run"] not in sys.modules:
        wrong.append(f"{spec['run']} was never imported")
    return wrong


def main() -> None:
    spec: Spec = json.loads(sys.argv[1])
    sys.argv = [spec["run"], *sys.argv[2:]]
    code: int | str | None = 0
    try:
        runpy.run_module(spec["run"], run_name="__main__", alter_sys=True)
    except SystemExit as exit_:
        code = exit_.code
    wrong = wrong_imports(spec)
    if wrong:
        more = f"; and {len(wrong) - _SHOWN} more" if len(wrong) > _SHOWN else ""
        sys.stderr.write(f"imported from the wrong version: {'; '.join(wrong[:_SHOWN])}{more}\n")
        sys.exit(3)
    Path(spec["report"]).write_text(json.dumps(loaded_files(spec["ours"])))
    sys.exit(code)


if __name__ == "__main__":
    main()
