"""The repository stands alone: no tracked file points outside it, and every decision cited exists.

A clone with nothing beside it must run, test and explain itself. Design notes that lived outside the
repository are summarised in docs/DECISIONS.md; comments cite that file ("DECISIONS D4", "DECISIONS R5").
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Built from pieces so that this file does not match its own patterns.
FORBIDDEN = [
    re.compile(re.escape("../" + "shared")),
    re.compile(r"\b" + "SP" + r"EC\b"),
    re.compile(re.escape("PERFOR" + "MANCE.md")),
    re.compile(re.escape("ECO" + "SYSTEM.md")),
    re.compile(re.escape("PE" + "ERS.md")),
    re.compile(r"\bthe " + "iss" + r"ue\b", re.IGNORECASE),
]
CITATION = re.compile(r"\b([DR]\d{1,2})\b")
HEADING = re.compile(r"^### ([DR]\d{1,2})\. ", re.MULTILINE)


def tracked_text_files() -> dict[str, str]:
    """``{path: text}`` for every file ``git ls-files`` lists, binary files (with a NUL byte) left out."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:  # a source archive without .git
        pytest.skip(f"not a git checkout ({e}); the self-containment check needs `git ls-files`")
    files = {}
    for name in out.decode().split("\0"):
        path = ROOT / name
        if not name or not path.is_file():  # deleted in the work tree but not yet committed
            continue
        data = path.read_bytes()
        if b"\0" in data:
            continue
        files[name] = data.decode("utf-8", errors="replace")
    return files


@pytest.fixture(scope="module")
def files() -> dict[str, str]:
    found = tracked_text_files()
    assert "docs/DECISIONS.md" in found and "README.md" in found
    return found


def test_no_tracked_file_points_outside_the_repository(files):
    hits = [
        f"{name}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)!r}"
        for name, text in files.items()
        for pattern in FORBIDDEN
        for m in pattern.finditer(text)
    ]
    assert not hits, "tracked files cite material outside the repository (cite docs/DECISIONS.md instead):\n" + \
        "\n".join(hits)


def test_the_patterns_can_fail():
    samples = ["see ../" + "shared/docs", "SP" + "EC B.4", "(" + "SP" + "EC)", "PERFOR" + "MANCE.md",
               "ECO" + "SYSTEM.md 4", "PE" + "ERS.md", "by The " + "Iss" + "ue's criterion"]
    for sample in samples:
        assert any(p.search(sample) for p in FORBIDDEN), sample
    for fine in ["CheckpointSpec", "SPECIAL_TOKENS", "tissue", "issues"]:
        assert not any(p.search(fine) for p in FORBIDDEN), fine


def test_every_cited_decision_exists(files):
    decisions = files["docs/DECISIONS.md"]
    defined = set(HEADING.findall(decisions))
    assert {f"D{i}" for i in range(1, 11)} <= defined  # the original numbering is kept
    cited: dict[str, set[str]] = {}
    for name, text in files.items():
        if name == "docs/DECISIONS.md":
            continue
        for line in text.splitlines():
            if "DECISIONS" in line:
                for ref in CITATION.findall(line):
                    cited.setdefault(ref, set()).add(name)
    assert cited, "nothing cites docs/DECISIONS.md"
    missing = {ref: sorted(where) for ref, where in cited.items() if ref not in defined}
    assert not missing, f"cited but not defined in docs/DECISIONS.md: {missing}"


def test_readme_points_to_decisions(files):
    section = files["README.md"].split("## Decisions", 1)
    assert len(section) == 2, "README.md has no Decisions section"
    assert "docs/DECISIONS.md" in section[1].split("\n## ", 1)[0]
