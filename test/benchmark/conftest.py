"""Shared by the benchmark scripts' tests: their writers' round trip."""

from __future__ import annotations

import json

import pytest


@pytest.fixture
def write_reports(tmp_path):
    """``write(module, results, name)``: ``module.REPORT.write`` on ``results`` saved as
    ``<tmp>/<name>.json`` and a doc holding the module's generated block; checks that the
    ``.md`` is the table, the ``.png`` a PNG, and that only the doc's block changed. Returns
    the table."""

    def write(module, results: dict, name: str) -> str:
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(results))
        doc = tmp_path / "doc.md"
        begin, end = module.REPORT.begin, module.REPORT.end
        doc.write_text(f"intro\n{begin}\nold\n{end}\noutro\n")
        table = module.REPORT.write(results, path, doc)
        assert path.with_suffix(".md").read_text() == table
        assert path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert doc.read_text() == f"intro\n{begin}\n{table}{end}\noutro\n"
        return table

    return write
