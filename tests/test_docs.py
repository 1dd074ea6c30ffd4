"""Every reference a user meets (README, help, log lines, docstrings) resolves inside the repository:
a clone has no ../shared, so the design and the methods live in docs/."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [p for d in ("pipeline", "maskserver", "train", "tools", "mimpipe") for p in (ROOT / d).rglob("*.py")]
USER_TEXT = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "configs").glob("*.yaml"), *SOURCES]


def test_nothing_points_outside_the_repository():
    bad = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in USER_TEXT
           for i, line in enumerate(p.read_text().splitlines(), 1)
           if re.search(r"\.\./shared|(?<!docs/)\bMETHODS(\.md)?\b|(?<!docs/)\bDESIGN\.md|\bseeds/", line)]
    assert not bad, "\n".join(bad)


def test_cited_methods_sections_exist():
    methods = (ROOT / "docs/methods.md").read_text()
    sections = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)[. ]", methods, re.M))
    register = set(re.findall(r"^\| (\d+) \|", methods.split("## 7.", 1)[1], re.M))
    cited = [(p, m) for p in USER_TEXT for m in re.finditer(r"docs/methods\.md[ ,]+(\d+(?:\.\d+)?)(?: #(\d+))?",
                                                            p.read_text())]
    assert len(cited) > 40
    missing = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p, m in cited
               if m.group(1) not in sections or (m.group(2) and m.group(2) not in register)]
    assert not missing, missing


def test_cited_design_sections_and_readme_links_exist():
    design = (ROOT / "docs/design.md").read_text()
    heads = re.findall(r"^## (.+)$", design, re.M)
    for p in SOURCES:
        for name in re.findall(r'docs/design\.md "([^"]+)"', p.read_text()):
            assert any(h.startswith(name) for h in heads), f"{p}: docs/design.md {name!r}; sections {heads}"
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)#:]+)\)", readme)
    assert links and all((ROOT / link).exists() for link in links), links
