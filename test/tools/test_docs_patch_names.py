"""The docs name patches of the series by their real file names."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# prose naming a patch: "patch `0005-encode-language-buffer-args`"
PATCH_MENTION = re.compile(r"patch `(\d{4}-[a-z0-9-]+)`")


def test_docs_name_patches_of_the_series() -> None:
    """issue 7 item 7: docs/transport.md named the server-arguments patch `0001-...`; every
    patch a page names must be in fork/series under that name."""
    series = {line.strip().removesuffix(".patch")
              for line in (ROOT / "fork" / "series").read_text().splitlines() if line.strip()}
    named = {}
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for match in PATCH_MENTION.finditer(doc.read_text()):
            named.setdefault(match.group(1), doc.name)
    assert "encode-language-buffer-args" in " ".join(named), named  # the mention this guards
    assert {name: doc for name, doc in named.items() if name not in series} == {}
