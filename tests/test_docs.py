"""The docs stand alone: every docstring citation of docs/algorithms.md names a heading that exists,
and nothing in the repository cites a document it does not contain."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [
    p
    for d in ("feature_circuits", "experiments", "scripts", "tests")
    for p in (ROOT / d).rglob("*.py")
    if p.resolve() != Path(__file__).resolve()
]
CITATION = re.compile(r'algorithms\.md[\s,;:(]*"([A-Za-z][^"]*)"')


def _headings() -> set[str]:
    text = (ROOT / "docs" / "algorithms.md").read_text()
    return {m.group(1).strip() for m in re.finditer(r"^#+\s+(.+)$", text, flags=re.M)}


def test_every_citation_names_a_heading():
    headings = _headings()
    cited: dict[str, list[str]] = {}
    for path in SOURCES:
        text = " ".join(path.read_text().split())  # citations wrap across docstring lines
        for m in CITATION.finditer(text):
            cited.setdefault(m.group(1), []).append(str(path.relative_to(ROOT)))
    assert cited, "no citation found: the pattern is broken"
    missing = {name: where for name, where in cited.items() if name not in headings}
    assert not missing, f"citations of headings docs/algorithms.md does not have: {missing}"


def test_no_citation_of_outside_documents():
    bad = []
    for path in [*SOURCES, ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"spec section|spec §|ALGORITHMS\.md|\.\./shared", line):
                bad.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not bad, "\n".join(bad)
