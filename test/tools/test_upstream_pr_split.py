"""docs/upstream-pr.md splits the series into three pull requests in merge order: together they
are the series, no patch is in two, and each prefix of the merge order (PR 1; PR 1 + 2; all)
applies to pristine 0.5.23 by itself, in series order."""
from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
import fork as forktool  # noqa: E402

PATCH_NAME = re.compile(r"`(\d{4}-[a-z0-9-]+)`")


def pr_patches() -> list[list[str]]:
    """Each PR's patch names, from its ``**Patches**:`` paragraph, in the page's order."""
    text = (REPO / "docs" / "upstream-pr.md").read_text()
    prs = []
    for section in re.split(r"^## PR \d+: ", text, flags=re.M)[1:]:
        para = re.search(r"^\*\*Patches\*\*: (.+?)(?:\n\n|\Z)", section, re.M | re.S)
        assert para, section.splitlines()[0]
        prs.append(PATCH_NAME.findall(para.group(1)))
    return prs


def test_the_three_prs_are_the_series_and_apply_in_merge_order() -> None:
    real = forktool.repo_fork(REPO)
    series = [p.path.stem for p in real.patches()]
    prs = pr_patches()
    assert len(prs) == 3
    named = [name for pr in prs for name in pr]
    assert sorted(named) == sorted(series)  # every patch, none twice
    for k in range(1, len(prs) + 1):
        wanted = {name for pr in prs[:k] for name in pr}
        subset = [p for p in real.patches() if p.path.stem in wanted]
        real.compose_patched(subset)  # raises ForkError naming a patch that does not apply
