"""The README's "paper in the code" table points at lines that still hold what it names."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_paper_to_code_table_points_at_the_named_definitions():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## The paper in the code"):text.index("## Tour of the package")]
    anchors = re.findall(r"`([\w/]+\.py):(\d+)` `(\w+)`", section)
    assert len(anchors) >= 15
    for file, line, name in anchors:
        at = (ROOT / file).read_text().splitlines()[int(line) - 1]
        defines = rf"\b(def|class) {name}\b|^{name}\s*[:=]|\bself\.{name}\s*[:=]"  # a def, a class, an assignment
        assert re.search(defines, at), f"{file}:{line} is not {name}: {at!r}"
