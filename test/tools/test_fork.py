"""The fork tool, on a small fake upstream (a pristine site-packages and a pinned wheel), and one
check of the real repository against the real pinned install."""
from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
import fork as forktool  # noqa: E402

MODEL_V1 = "".join(f"line {i}\n" for i in range(1, 21))
UPSTREAM_FILES = {
    "sglang/__init__.py": "__version__ = '0.5.23'\n",
    "sglang/srt/__init__.py": "",
    "sglang/srt/models/__init__.py": "",
    "sglang/srt/models/foo.py": MODEL_V1,
    "sglang/srt/models/bar.py": "def bar():\n    return 1\n",
}


def _record(files: dict[str, bytes], dist_info: str) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    for rel, data in files.items():
        w.writerow([rel, forktool.record_hash(data), len(data)])
    w.writerow([f"{dist_info}/RECORD", "", ""])
    return buf.getvalue()


@pytest.fixture()
def fake(tmp_path: Path) -> forktool.Fork:
    """A pristine upstream install + pinned wheel + an empty repository."""
    site = tmp_path / "site"
    di = "sglang-0.5.23.dist-info"
    files = {rel: text.encode() for rel, text in UPSTREAM_FILES.items()}
    files[f"{di}/METADATA"] = b"Metadata-Version: 2.1\nName: sglang\nVersion: 0.5.23\n"
    files[f"{di}/WHEEL"] = b"Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    for rel, data in files.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_bytes(data)
    (site / di / "RECORD").write_text(_record(files, di))
    wheel = tmp_path / "sglang-0.5.23-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for rel, data in files.items():
            z.writestr(rel, data)
        z.writestr(f"{di}/RECORD", _record(files, di))
    repo = tmp_path / "repo"
    (repo / "fork" / "patches").mkdir(parents=True)
    (repo / "fork" / "series").write_text("")
    return forktool.Fork(repo=repo, upstream_site=site, version="0.5.23", wheel=wheel,
                         wheel_sha256=forktool.sha256_file(wheel))


def _edit(fork: forktool.Fork, rel: str, old: str, new: str) -> None:
    p = fork.overlay / rel
    text = p.read_text()
    assert old in text
    p.write_text(text.replace(old, new, 1))


def _add_patch(fork: forktool.Fork, name: str, rel: str, old: str, new: str) -> Path:
    path = fork.new_patch(name, f"Change {rel}")
    fork.apply()
    _edit(fork, rel, old, new)
    fork.refresh()
    return path


def test_empty_series_composes_pristine_copy(fake: forktool.Fork) -> None:
    fake.apply()
    for rel, text in UPSTREAM_FILES.items():
        p = fake.overlay / rel
        assert p.read_text() == text and not p.is_symlink()
    assert fake.check() == []
    assert fake.combined_diff() == ""


def test_patch_applies_and_diff_is_exact(fake: forktool.Fork) -> None:
    path = _add_patch(fake, "foo-hook", "sglang/srt/models/foo.py", "line 10\n", "line 10\nhook()\n")
    assert path.name == "0001-foo-hook.patch"
    assert (fake.overlay / "sglang/srt/models/foo.py").read_text() == MODEL_V1.replace("line 10\n", "line 10\nhook()\n")
    assert fake.check() == []
    expected = (
        "diff --git a/python/sglang/srt/models/foo.py b/python/sglang/srt/models/foo.py\n"
        "--- a/python/sglang/srt/models/foo.py\n"
        "+++ b/python/sglang/srt/models/foo.py\n"
        "@@ -8,6 +8,7 @@\n"
        " line 8\n line 9\n line 10\n+hook()\n line 11\n line 12\n line 13\n"
    )
    assert fake.combined_diff() == expected
    # The pristine install is untouched.
    assert (fake.upstream_site / "sglang/srt/models/foo.py").read_text() == MODEL_V1


def test_combined_diff_applies_to_pristine_with_git(fake: forktool.Fork, tmp_path: Path) -> None:
    _add_patch(fake, "foo", "sglang/srt/models/foo.py", "line 3\n", "line three\n")
    new = fake.new_module_root / "sglang/srt/disaggregation/thing.py"
    new.parent.mkdir(parents=True)
    new.write_text("X = 1\n")
    fake.apply()
    up = tmp_path / "upstream-checkout"
    for rel, text in UPSTREAM_FILES.items():
        (up / "python" / rel).parent.mkdir(parents=True, exist_ok=True)
        (up / "python" / rel).write_text(text)
    subprocess.run(["git", "init", "-q"], cwd=up, check=True)
    subprocess.run(["git", "apply", "-"], input=fake.combined_diff().encode(), cwd=up, check=True)
    assert (up / "python/sglang/srt/disaggregation/thing.py").read_text() == "X = 1\n"
    assert (up / "python/sglang/srt/models/foo.py").read_text() == (fake.overlay / "sglang/srt/models/foo.py").read_text()


def test_new_module_edits_take_effect_without_rebuild(fake: forktool.Fork) -> None:
    mod = fake.new_module_root / "sglang/srt/newpkg/__init__.py"
    mod.parent.mkdir(parents=True)
    mod.write_text("VALUE = 1\n")
    fake.apply()
    assert (fake.overlay / "sglang/srt/newpkg/__init__.py").read_text() == "VALUE = 1\n"
    mod.write_text("VALUE = 2\n")
    assert (fake.overlay / "sglang/srt/newpkg/__init__.py").read_text() == "VALUE = 2\n"
    assert fake.check() == []
    # A module added later is reported by check until apply links it.
    (mod.parent / "more.py").write_text("")
    assert any("more.py: new module not linked" in p for p in fake.check())
    fake.apply()
    assert fake.check() == []
    (mod.parent / "more.py").unlink()
    assert any("more.py: removed from the repository" in p for p in fake.check())
    fake.apply()
    assert not (fake.overlay / "sglang/srt/newpkg/more.py").exists() and fake.check() == []


def test_new_module_may_not_shadow_upstream_file(fake: forktool.Fork) -> None:
    shadow = fake.new_module_root / "sglang/srt/models/bar.py"
    shadow.parent.mkdir(parents=True)
    shadow.write_text("def bar():\n    return 2\n")
    with pytest.raises(forktool.ForkError, match="exists upstream: change it with a patch"):
        fake.apply()


def test_broken_patch_fails_check_with_clear_message(fake: forktool.Fork) -> None:
    path = _add_patch(fake, "foo", "sglang/srt/models/foo.py", "line 5\n", "line five\n")
    path.write_text(path.read_text().replace(" line 4\n", " line FOUR\n"))
    problems = fake.check()
    assert len(problems) == 1
    assert "patch 0001-foo.patch does not apply to pristine sglang 0.5.23" in problems[0]
    assert "sglang/srt/models/foo.py" in problems[0]
    with pytest.raises(forktool.ForkError, match="does not apply"):
        fake.apply(force=True)
    proc = subprocess.run([sys.executable, str(REPO / "tools/fork.py"), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0


def test_unrefreshed_edit_fails_check_and_blocks_apply(fake: forktool.Fork) -> None:
    fake.apply()
    _edit(fake, "sglang/srt/models/bar.py", "return 1", "return 3")
    problems = fake.check()
    assert problems == ["sglang/srt/models/bar.py: upstream file edited in the overlay but in no patch (run refresh)"]
    with pytest.raises(forktool.ForkError, match="edits that are not in the patch series: sglang/srt/models/bar.py"):
        fake.apply()
    fake.apply(force=True)
    assert (fake.overlay / "sglang/srt/models/bar.py").read_text() == UPSTREAM_FILES["sglang/srt/models/bar.py"]


def test_refresh_middle_patch_keeps_later_patches(fake: forktool.Fork) -> None:
    first = _add_patch(fake, "one", "sglang/srt/models/foo.py", "line 2\n", "line two\n")
    second = _add_patch(fake, "two", "sglang/srt/models/foo.py", "line 18\n", "line eighteen\n")
    _edit(fake, "sglang/srt/models/foo.py", "line 3\n", "line three\n")
    fake.refresh("0001-one")
    one = forktool.Patch.read(first).diff
    two = forktool.Patch.read(second).diff
    assert "+line two\n+line three\n" in one and "eighteen" not in one
    assert "+line eighteen\n" in two and "three" not in two
    assert fake.check() == []
    text = (fake.overlay / "sglang/srt/models/foo.py").read_text()
    assert text == MODEL_V1.replace("line 2\nline 3\n", "line two\nline three\n").replace("line 18\n", "line eighteen\n")
    assert forktool.Patch.read(first).subject == "Change sglang/srt/models/foo.py"


def test_modified_pristine_install_is_detected(fake: forktool.Fork) -> None:
    _add_patch(fake, "foo", "sglang/srt/models/foo.py", "line 5\n", "line five\n")
    (fake.upstream_site / "sglang/srt/models/foo.py").write_text(MODEL_V1 + "tampered\n")
    problems = fake.check()
    assert problems == [f"pristine upstream file sglang/srt/models/foo.py was modified or removed in {fake.upstream_site}"]


def test_wheel_installs_over_pinned_release(fake: forktool.Fork, tmp_path: Path) -> None:
    _add_patch(fake, "foo", "sglang/srt/models/foo.py", "line 5\n", "line five\n")
    new = fake.new_module_root / "sglang/srt/disaggregation/thing.py"
    new.parent.mkdir(parents=True)
    new.write_text("X = 1\n")
    fake.apply()
    wheel = fake.build_wheel(tmp_path / "dist", "fork.gabc123")
    assert wheel.name == "sglang-0.5.23+fork.gabc123-py3-none-any.whl"
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    target = forktool.site_packages(venv, f"{sys.version_info[0]}.{sys.version_info[1]}")
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q", "install", "--no-deps", "--no-index"]
    subprocess.run(pip + [str(fake.wheel)], check=True)
    assert (target / "sglang/srt/models/foo.py").read_text() == MODEL_V1
    subprocess.run(pip + [str(wheel)], check=True)
    assert (target / "sglang/srt/models/foo.py").read_text() == MODEL_V1.replace("line 5\n", "line five\n")
    assert (target / "sglang/srt/disaggregation/thing.py").read_text() == "X = 1\n"
    assert sorted(p.name for p in target.glob("sglang-*.dist-info")) == ["sglang-0.5.23+fork.gabc123.dist-info"]
    meta = (target / "sglang-0.5.23+fork.gabc123.dist-info/METADATA").read_text()
    assert "Version: 0.5.23+fork.gabc123\n" in meta
    # Every file in the wheel's RECORD hashes correctly.
    with zipfile.ZipFile(wheel) as z:
        rows = list(csv.reader(io.StringIO(z.read("sglang-0.5.23+fork.gabc123.dist-info/RECORD").decode())))
        for arc, digest, _size in rows:
            if digest:
                assert forktool.record_hash(z.read(arc)) == digest, arc


def test_real_repository_series_checks_clean() -> None:
    """The repository's own series against the real pinned install (what CI composed)."""
    real = forktool.repo_fork(REPO)
    assert real.check() == []


def test_refresh_takes_only_its_own_edits(fake: forktool.Fork) -> None:
    """Refreshing an earlier patch never swallows edits of other files; they stay unrefreshed."""
    first = _add_patch(fake, "one", "sglang/srt/models/foo.py", "line 2\n", "line two\n")
    _add_patch(fake, "two", "sglang/srt/models/foo.py", "line 18\n", "line eighteen\n")
    _edit(fake, "sglang/srt/models/bar.py", "return 1", "return 4")  # in no patch yet
    _edit(fake, "sglang/srt/models/foo.py", "line 3\n", "line three\n")
    fake.refresh("0001-one")
    assert "bar.py" not in forktool.Patch.read(first).diff
    assert (fake.overlay / "sglang/srt/models/bar.py").read_text() == "def bar():\n    return 4\n"
    assert fake.check() == ["sglang/srt/models/bar.py: upstream file edited in the overlay but in no patch (run refresh)"]
    fake.refresh("0001-one", add_files=("sglang/srt/models/bar.py",))
    assert "+    return 4\n" in forktool.Patch.read(first).diff
    assert fake.check() == []


def test_lint_names_unformatted_new_modules_and_patched_lines(fake: forktool.Fork) -> None:
    """issue 7 item 15: black and isort (upstream's pre-commit settings) check every new module
    whole and, in patched upstream files, the lines the series adds (not upstream's own lines)."""
    mod = fake.new_module_root / "sglang" / "srt" / "models" / "newmod.py"
    mod.parent.mkdir(parents=True)
    mod.write_text("import sys\nimport os\n\nx = {'a':1}\n")
    _add_patch(fake, "one", "sglang/srt/models/bar.py", "return 1", "return {'b':2}")
    problems = fake.lint()
    assert problems == [
        f"black would change {mod}",
        f"isort would change {mod}",
        "black would change lines the series adds to sglang/srt/models/bar.py: 2",
    ], problems
    mod.write_text('import os\nimport sys\n\nx = {"a": 1}\n')
    _edit(fake, "sglang/srt/models/bar.py", "return {'b':2}", 'return {"b": 2}')
    fake.refresh()
    assert fake.lint() == []



def test_formatter_diffs_are_split_per_file(tmp_path: Path) -> None:
    """One formatter run covers every linted file; its output is split at each file's header
    (black names the path as given, isort the resolved path with ``:before``), a removed line
    that starts with ``-- `` stays in its file's diff, and a header naming no linted file fails
    rather than dropping that diff."""
    a, b = tmp_path / "a.py", tmp_path / "ab.py"
    black = (f"--- {a}\t2026-01-01\n+++ {a}\t2026-01-01\n@@ -1 +1 @@\n--- x = {{}}\n+# x\n"
             f"--- {b}\t2026-01-01\n+++ {b}\t2026-01-01\n@@ -2 +2 @@\n-y=1\n+y = 1\n")
    assert forktool.diffs_by_file(black, [a, b]) == {
        a: f"--- {a}\t2026-01-01\n+++ {a}\t2026-01-01\n@@ -1 +1 @@\n--- x = {{}}\n+# x\n",
        b: f"--- {b}\t2026-01-01\n+++ {b}\t2026-01-01\n@@ -2 +2 @@\n-y=1\n+y = 1\n",
    }
    isort = f"--- {b.resolve()}:before\t2026\n+++ {b.resolve()}:after\t2026\n@@ -3 +3 @@\n-import b\n"
    assert list(forktool.diffs_by_file(isort, [a, b])) == [b]
    assert forktool.changed_old_lines(forktool.diffs_by_file(isort, [a, b])[b]) == {3}
    with pytest.raises(forktool.ForkError, match="not linted"):
        forktool.diffs_by_file(f"--- /elsewhere/c.py\t1\n+++ /elsewhere/c.py\t1\n", [a, b])


def test_real_repository_passes_lint() -> None:
    """issue 7 item 15: the fork's Python (new modules and patched upstream files) is black- and
    isort-clean, so a formatting slip fails the suite."""
    real = forktool.repo_fork(REPO)
    assert real.lint() == []
