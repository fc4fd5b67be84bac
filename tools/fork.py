#!/usr/bin/env python3
"""Compose the SGLang fork: pinned upstream 0.5.23 + this repository.

The fork is never vendored. It is three things:
  * the pinned upstream wheel (``fork/pin.toml``), installed once into a shared environment that is
    never modified after it is built;
  * an ordered patch series (``fork/series``, ``fork/patches/*.patch``) of minimal changes to
    existing upstream files, in upstream's repository layout (``python/sglang/...``);
  * new modules, ordinary files at their in-tree paths under ``python/sglang/``.

``apply`` composes them into ``<checkout>/.fork/overlay/sglang`` (a private copy of the pristine
package with the series applied and the new modules symlinked in, so edits to new modules take
effect without a rebuild) and a small per-checkout venv whose ``sys.path`` puts the overlay in front
of the shared environment. Two checkouts never share anything but the read-only environment.

Subcommands: setup, apply, check, refresh, new, diff, wheel, env (``--help`` on each).
Only the standard library is used, so the tool runs before any environment exists.
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import csv
import difflib
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = "sglang"
UPSTREAM_PREFIX = "python/"  # where the package lives in upstream's repository
REPO_ROOT = Path(__file__).resolve().parent.parent


# Upstream's pre-commit formatters, in check mode (versions pinned in fork/pin.toml).
LINTERS = (("black", ["--diff", "--quiet"]),
           ("isort", ["--diff", "--quiet", "--profile", "black", "--project", "sglang"]))


class ForkError(RuntimeError):
    """A problem the user must fix; printed without a traceback."""


def log(msg: str) -> None:
    print(f"[fork] {msg}", file=sys.stderr, flush=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def record_hash(data: bytes) -> str:
    """Hash in the format of a wheel's RECORD file."""
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


# --------------------------------------------------------------------------------------------
# Patches
# --------------------------------------------------------------------------------------------
@dataclass
class Patch:
    """One patch of the series: a commit-like message and a unified diff."""

    path: Path
    subject: str
    body: str
    diff: str

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def files(self) -> list[str]:
        """Package-relative paths (``sglang/...``) the patch touches."""
        out = []
        for m in re.finditer(r"^diff --git a/(\S+) b/(\S+)$", self.diff, re.M):
            out.append(strip_upstream_prefix(m.group(2)))
        return out

    @classmethod
    def read(cls, path: Path) -> "Patch":
        text = path.read_text()
        head, sep, diff = text.partition("\ndiff --git ")
        diff = ("diff --git " + diff) if sep else ""
        subject, body = "", []
        for line in head.splitlines():
            if line.startswith("Subject: "):
                subject = line[len("Subject: "):].strip()
            elif subject and line != "---":
                body.append(line)
        return cls(path, subject, "\n".join(body).strip(), diff)

    def render(self) -> str:
        parts = [f"Subject: {self.subject}", ""]
        if self.body:
            parts += [self.body, ""]
        parts.append("---")
        text = "\n".join(parts) + "\n"
        return text + self.diff


def strip_upstream_prefix(path: str) -> str:
    if not path.startswith(UPSTREAM_PREFIX + PACKAGE + "/"):
        raise ForkError(f"patch path {path!r} is not under {UPSTREAM_PREFIX}{PACKAGE}/")
    return path[len(UPSTREAM_PREFIX):]


def unified_diff(rel: str, old: bytes | None, new: bytes | None) -> str:
    """A git-style unified diff of one file; ``rel`` is package-relative (``sglang/...``)."""
    up = UPSTREAM_PREFIX + rel
    old_lines = old.decode().splitlines(keepends=True) if old is not None else []
    new_lines = new.decode().splitlines(keepends=True) if new is not None else []
    if old_lines == new_lines and (old is None) == (new is None):
        return ""
    header = [f"diff --git a/{up} b/{up}\n"]
    if old is None:
        header.append("new file mode 100644\n")
    if new is None:
        header.append("deleted file mode 100644\n")
    body = list(
        difflib.unified_diff(
            old_lines,
            new_lines,
            fromfile="/dev/null" if old is None else f"a/{up}",
            tofile="/dev/null" if new is None else f"b/{up}",
            n=3,
        )
    )
    out = []
    for line in body:
        if not line.endswith("\n"):
            line += "\n\\ No newline at end of file\n"
        out.append(line)
    return "".join(header + out)


def copy_tree_subset(root: Path, rels, work: Path) -> Path:
    """Copy the files ``rels`` (relative to ``root``; missing ones skipped) into ``work``."""
    work.mkdir(parents=True, exist_ok=True)
    for rel in rels:
        src = root / rel
        if src.is_file():
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, work / rel)
    return work


def git_apply(patch_text: str, workdir: Path, *, reverse: bool = False, check: bool = False) -> None:
    """Apply a patch strictly (no fuzz) to files under ``workdir`` (which holds ``sglang/``)."""
    if not patch_text.strip():
        return  # a patch just created with `new`, nothing in it yet
    args = ["git", "apply", "-p2", "--whitespace=nowarn"]
    if reverse:
        args.append("--reverse")
    if check:
        args.append("--check")
    env = dict(os.environ, GIT_CEILING_DIRECTORIES=str(workdir.parent))
    proc = subprocess.run(args, input=patch_text.encode(), cwd=workdir, env=env, capture_output=True)
    if proc.returncode != 0:
        raise ForkError(proc.stderr.decode().strip() or "git apply failed")


# --------------------------------------------------------------------------------------------
# The fork of one checkout
# --------------------------------------------------------------------------------------------
def formatter_diffs(python: str, paths: list[Path]) -> dict[Path, list[tuple[str, str]]]:
    """For each of ``paths``: (tool, unified diff it would apply) for each of :data:`LINTERS`,
    one run of each tool over all the files (a process per file and tool cost ~0.5 s each)."""
    out: dict[Path, list[tuple[str, str]]] = {path: [] for path in paths}
    if not paths:
        return out
    for tool, args in LINTERS:
        r = subprocess.run([python, "-m", tool, *args, *map(str, paths)], capture_output=True, text=True)
        # rc 1 is also "No module named ...": a formatter that did not run must not pass
        if r.returncode not in (0, 1) or (r.returncode == 1 and not r.stdout):
            raise ForkError(f"{tool} failed on {len(paths)} files ({python}): {r.stderr.strip()}")
        by_file = diffs_by_file(r.stdout, paths)
        for path in paths:
            out[path].append((tool, by_file.get(path, "")))
    return out


def diffs_by_file(text: str, paths: list[Path]) -> dict[Path, str]:
    """Split a formatter's ``--diff`` output over several files at each file's ``--- PATH`` /
    ``+++ PATH`` header (black: the path as given; isort: resolved, ``PATH:before``). A header
    that names none of ``paths`` is an error: a diff must not be dropped."""
    names = sorted(((name, path) for path in paths for name in {str(path), str(path.resolve())}),
                   key=lambda np: -len(np[0]))
    chunks: dict[Path, list[str]] = {}
    current = None
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.startswith("--- ") and i + 1 < len(lines) and lines[i + 1].startswith("+++ "):
            head = line[4:]
            current = next((path for name, path in names if head.startswith(name)
                            and head[len(name):len(name) + 1] in (":", "\t", "\n", " ", "")), None)
            if current is None:
                raise ForkError(f"a formatter's diff names a file that was not linted: {line.strip()}")
        if current is not None:
            chunks.setdefault(current, []).append(line)
    return {path: "".join(chunk) for path, chunk in chunks.items()}


def changed_old_lines(diff: str) -> set[int]:
    """1-based lines of the original file that a unified diff removes or inserts next to."""
    lines: set[int] = set()
    old = 0
    for ln in diff.splitlines():
        m = re.match(r"@@ -(\d+)(?:,\d+)? \+\d+(?:,\d+)? @@", ln)
        if m:
            old = int(m.group(1))
        elif ln.startswith(("---", "+++")):
            continue
        elif ln.startswith("-"):
            lines.add(old)
            old += 1
        elif ln.startswith("+"):
            lines.add(max(old - 1, 1))
        elif ln.startswith(" "):
            old += 1
    return lines


def added_lines(before: bytes, after: bytes) -> set[int]:
    """1-based lines of ``after`` that are not in ``before`` (what a patch adds or changes)."""
    a = before.decode().splitlines()
    b = after.decode().splitlines()
    out: set[int] = set()
    for tag, _i1, _i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if tag in ("replace", "insert"):
            out.update(range(j1 + 1, j2 + 1))
    return out


@dataclass
class Fork:
    """Everything needed to compose one checkout's fork. Paths are parameters so tests can use a
    small fake upstream instead of the real 120 MB package."""

    repo: Path
    upstream_site: Path  # site-packages of the pristine install (holds sglang/ and its dist-info)
    version: str
    wheel: Path | None = None
    wheel_sha256: str | None = None
    state: Path = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.state is None:
            self.state = self.repo / ".fork"

    # ---- layout ----------------------------------------------------------------------------
    @property
    def series_file(self) -> Path:
        return self.repo / "fork" / "series"

    @property
    def patch_dir(self) -> Path:
        return self.repo / "fork" / "patches"

    @property
    def new_module_root(self) -> Path:
        return self.repo / "python"

    @property
    def overlay(self) -> Path:
        return self.state / "overlay"

    @property
    def manifest_file(self) -> Path:
        return self.state / "manifest.json"

    @property
    def pristine(self) -> Path:
        return self.upstream_site / PACKAGE

    def patches(self) -> list[Patch]:
        if not self.series_file.exists():
            return []
        names = [
            ln.strip()
            for ln in self.series_file.read_text().splitlines()
            if ln.strip() and not ln.startswith("#")
        ]
        missing = [n for n in names if not (self.patch_dir / n).exists()]
        if missing:
            raise ForkError(f"series names missing patches: {', '.join(missing)}")
        return [Patch.read(self.patch_dir / n) for n in names]

    def new_modules(self) -> list[str]:
        """Package-relative paths of the repository's new files under python/sglang/."""
        root = self.new_module_root / PACKAGE
        if not root.exists():
            return []
        out = []
        for p in sorted(root.rglob("*")):
            if p.is_file() and "__pycache__" not in p.parts and not p.name.endswith(".pyc"):
                out.append(p.relative_to(self.new_module_root).as_posix())
        return out

    # ---- pristine upstream --------------------------------------------------------------------
    def dist_info(self) -> Path:
        cands = sorted(self.upstream_site.glob(f"{PACKAGE}-*.dist-info"))
        if len(cands) != 1:
            raise ForkError(f"expected one {PACKAGE} dist-info in {self.upstream_site}, found {len(cands)}")
        return cands[0]

    def upstream_record(self) -> dict[str, str]:
        with open(self.dist_info() / "RECORD", newline="") as f:
            return {row[0]: row[1] for row in csv.reader(f) if row and row[1]}

    def verify_pristine(self, rels: list[str] | None = None) -> None:
        """The upstream install is the pinned version and the files we build on are untouched."""
        meta = (self.dist_info() / "METADATA").read_text()
        m = re.search(r"^Version: (\S+)$", meta, re.M)
        if not m or m.group(1) != self.version:
            raise ForkError(f"upstream install is {PACKAGE} {m and m.group(1)}, pinned {self.version}")
        record = self.upstream_record()
        for rel in rels if rels is not None else list(record):
            if rel not in record:
                continue  # a file the series creates
            path = self.upstream_site / rel
            if not path.exists() or record_hash(path.read_bytes()) != record[rel]:
                raise ForkError(f"pristine upstream file {rel} was modified or removed in {self.upstream_site}")

    def pristine_bytes(self, rel: str) -> bytes | None:
        p = self.upstream_site / rel
        return p.read_bytes() if p.is_file() else None

    # ---- composing ------------------------------------------------------------------------------
    def series_id(self) -> str:
        h = hashlib.sha256(self.version.encode())
        h.update(str(self.upstream_site).encode())
        for p in self.patches():
            h.update(p.path.read_bytes())
        return h.hexdigest()

    def compose_patched(self, patches: list[Patch] | None = None) -> dict[str, bytes | None]:
        """Apply ``patches`` (default: the whole series) to pristine copies of the files they touch,
        in a scratch directory outside any git work tree. Returns package-relative path -> bytes
        (None for a file the series deletes)."""
        patches = self.patches() if patches is None else patches
        touched = sorted({f for p in patches for f in p.files})
        self.verify_pristine(touched)
        with tempfile.TemporaryDirectory(prefix="fork-compose-") as tmp:
            work = copy_tree_subset(self.upstream_site, touched, Path(tmp) / "w")
            for p in patches:
                try:
                    git_apply(p.diff, work)
                except ForkError as e:
                    raise ForkError(f"patch {p.name} does not apply to pristine {PACKAGE} {self.version}:\n{e}") from None
            return {rel: ((work / rel).read_bytes() if (work / rel).exists() else None) for rel in touched}

    def read_manifest(self) -> dict | None:
        try:
            return json.loads(self.manifest_file.read_text())
        except (OSError, ValueError):
            return None

    def overlay_edits(self) -> list[str]:
        """Overlay files that differ from what the last compose wrote (unrefreshed edits)."""
        man = self.read_manifest()
        if man is None:
            return []
        edits = []
        for rel, digest in man["patched"].items():
            p = self.overlay / rel
            now = sha256_file(p) if p.is_file() else None
            if now != digest:
                edits.append(rel)
        for rel in self.changed_unpatched(man):
            edits.append(rel)
        return sorted(set(edits))

    def changed_unpatched(self, man: dict) -> list[str]:
        """Upstream files edited in the overlay that no patch touches yet (cheap: size + mtime)."""
        out = []
        stamps = man.get("stamps", {})
        for rel, (size, mtime) in stamps.items():
            p = self.overlay / rel
            try:
                st = p.lstat()
            except OSError:
                out.append(rel)
                continue
            if st.st_size != size or st.st_mtime_ns != mtime:
                if self.pristine_bytes(rel) != p.read_bytes():
                    out.append(rel)
        return out

    def apply(self, force: bool = False) -> Path:
        """Compose the overlay. Fast when nothing changed (only new-module links are synced)."""
        man = self.read_manifest()
        sid = self.series_id()
        if man is not None and man.get("series_id") == sid and self.overlay.is_dir():
            edits = self.overlay_edits()
            if edits and not force:
                raise ForkError(
                    "the overlay has edits that are not in the patch series: "
                    + ", ".join(edits)
                    + "\n  keep them: `tools/fork.py refresh`; drop them: `tools/fork.py apply --force`"
                )
            if not edits:
                self._sync_new_modules(man)
                self.manifest_file.write_text(json.dumps(man, indent=1, sort_keys=True))
                log("overlay up to date (skipping compose; new-module links synced)")
                return self.overlay
        elif man is not None and self.overlay.is_dir() and not force:
            edits = self.overlay_edits()
            if edits:
                raise ForkError(
                    "the series changed but the overlay has unrefreshed edits: "
                    + ", ".join(edits)
                    + "\n  `tools/fork.py refresh` first, or `tools/fork.py apply --force` to drop them"
                )
        self._compose_fresh(sid)
        return self.overlay

    def _compose_fresh(self, sid: str) -> None:
        patched = self.compose_patched()
        self.state.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix="overlay.", dir=self.state))
        log(f"composing {PACKAGE} {self.version} + {len(self.patches())} patches into {self.overlay}")
        shutil.copytree(self.pristine, staging / PACKAGE, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
        for rel, data in patched.items():
            dst = staging / rel
            if data is None:
                dst.unlink(missing_ok=True)
            else:
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(data)
        man = {
            "series_id": sid,
            "version": self.version,
            "upstream_site": str(self.upstream_site),
            "patched": {rel: hashlib.sha256(d).hexdigest() for rel, d in patched.items() if d is not None},
            "new_modules": [],
            "stamps": {},
        }
        old = self.overlay.with_name("overlay.old")
        if self.overlay.exists():
            if old.exists():
                shutil.rmtree(old)
            self.overlay.rename(old)
        staging.rename(self.overlay)
        if old.exists():
            shutil.rmtree(old)
        man["stamps"] = self._stamps(man)
        self._sync_new_modules(man)
        self.manifest_file.write_text(json.dumps(man, indent=1, sort_keys=True))

    def _stamps(self, man: dict) -> dict[str, list[int]]:
        out = {}
        for p in (self.overlay / PACKAGE).rglob("*"):
            if p.is_file() and not p.is_symlink() and "__pycache__" not in p.parts:
                rel = p.relative_to(self.overlay).as_posix()
                if rel not in man["patched"]:
                    st = p.stat()
                    out[rel] = [st.st_size, st.st_mtime_ns]
        return out

    def _sync_new_modules(self, man: dict) -> None:
        """Link each new module into the overlay; remove links to modules that are gone."""
        wanted = self.new_modules()
        record = self.upstream_record()
        for rel in wanted:
            if rel in record or rel in man["patched"]:
                raise ForkError(
                    f"{UPSTREAM_PREFIX}{rel} exists upstream: change it with a patch, not a copy in python/"
                )
        for rel in set(man["new_modules"]) - set(wanted):
            (self.overlay / rel).unlink(missing_ok=True)
        for rel in wanted:
            dst = self.overlay / rel
            target = self.new_module_root / rel
            if dst.is_symlink() and os.readlink(dst) == str(target):
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            if dst.exists() or dst.is_symlink():
                dst.unlink()
            dst.symlink_to(target)
        man["new_modules"] = wanted

    # ---- check --------------------------------------------------------------------------------
    def check(self) -> list[str]:
        """Problems that make the composed fork differ from the repository (empty = clean)."""
        problems: list[str] = []
        try:
            self.verify_pristine(sorted({f for p in self.patches() for f in p.files}))
            patched = self.compose_patched()
        except ForkError as e:
            return [str(e)]
        man = self.read_manifest()
        if man is None or not self.overlay.is_dir():
            return ["the fork is not composed: run `tools/fork.py apply`"]
        if man.get("series_id") != self.series_id():
            problems.append("the overlay was composed from another series or upstream: run `tools/fork.py apply`")
        for rel, data in patched.items():
            p = self.overlay / rel
            have = p.read_bytes() if p.is_file() and not p.is_symlink() else None
            if have != data:
                problems.append(f"{rel}: overlay differs from pristine + series (refresh or apply --force)")
        for rel in self.changed_unpatched(man):
            if rel not in patched:
                problems.append(f"{rel}: upstream file edited in the overlay but in no patch (run refresh)")
        for rel in self.new_modules():
            p = self.overlay / rel
            if not (p.is_symlink() and os.readlink(p) == str(self.new_module_root / rel)):
                problems.append(f"{UPSTREAM_PREFIX}{rel}: new module not linked into the overlay (run apply)")
        for rel in man.get("new_modules", []):
            if not (self.new_module_root / rel).exists():
                problems.append(f"{UPSTREAM_PREFIX}{rel}: removed from the repository but still linked (run apply)")
        return problems

    # ---- refresh ------------------------------------------------------------------------------
    def refresh(self, target: str | None = None, add_files: tuple[str, ...] = ()) -> list[str]:
        """Regenerate one patch (default: the last) from the edited overlay files.

        The patch's new content is the overlay with every later patch reverse-applied, diffed
        against pristine + every earlier patch (quilt semantics). The last patch takes every
        edit; an earlier one only the edits of the files it already touches and of ``add_files``.
        Every other edit stays in the overlay as an unrefreshed edit."""
        patches = self.patches()
        if not patches:
            raise ForkError("the series is empty: create a patch with `tools/fork.py new NAME -m SUBJECT`")
        idx = len(patches) - 1 if target is None else next(
            (i for i, p in enumerate(patches) if p.name == target or p.path.stem == target), -1)
        if idx < 0:
            raise ForkError(f"no patch named {target!r} in the series")
        man = self.read_manifest()
        if man is None:
            raise ForkError("the fork is not composed: run `tools/fork.py apply` first")
        all_edits = set(self.overlay_edits())
        edited = set(patches[idx].files) | set(add_files)
        if idx == len(patches) - 1:
            edited |= all_edits
        kept = {f: (self.overlay / f).read_bytes() for f in sorted(all_edits - edited) if (self.overlay / f).is_file()}
        before = self.compose_patched(patches[:idx])
        later = patches[idx + 1:]
        with tempfile.TemporaryDirectory(prefix="fork-refresh-") as tmp:
            later_files = {f for p in later for f in p.files}
            work = copy_tree_subset(self.overlay, edited | later_files, Path(tmp) / "w")
            for p in reversed(later):
                try:
                    git_apply(p.diff, work, reverse=True)
                except ForkError as e:
                    raise ForkError(f"cannot take later patch {p.name} out of the edited overlay:\n{e}") from None
            chunks = []
            for rel in sorted(edited):
                base = before.get(rel, self.pristine_bytes(rel))
                mine = (work / rel).read_bytes() if (work / rel).exists() else None
                chunks.append(unified_diff(rel, base, mine))
        patch = patches[idx]
        patch.diff = "".join(chunks)
        patch.path.write_text(patch.render())
        self.apply(force=True)
        for rel, data in kept.items():  # edits that belong elsewhere stay, still unrefreshed
            (self.overlay / rel).write_bytes(data)
        if kept:
            log(f"left as unrefreshed edits (refresh their patch, or name them with --file): {', '.join(kept)}")
        return sorted(rel for rel, c in zip(sorted(edited), chunks) if c)

    def new_patch(self, name: str, subject: str, body: str = "") -> Path:
        if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
            raise ForkError(f"bad patch name {name!r}")
        existing = self.patches()
        fname = name if name.endswith(".patch") else f"{len(existing) + 1:04d}-{name}.patch"
        path = self.patch_dir / fname
        if path.exists():
            raise ForkError(f"{path} exists")
        self.patch_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(Patch(path, subject, body, "").render())
        with open(self.series_file, "a") as f:
            f.write(fname + "\n")
        return path

    # ---- diff ---------------------------------------------------------------------------------
    def combined_diff(self) -> str:
        """What an upstream pull request would contain: series + new modules vs pristine."""
        chunks = []
        for rel, data in sorted(self.compose_patched().items()):
            chunks.append(unified_diff(rel, self.pristine_bytes(rel), data))
        for rel in self.new_modules():
            chunks.append(unified_diff(rel, None, (self.new_module_root / rel).read_bytes()))
        return "".join(chunks)

    def diff_stat(self) -> list[tuple[str, int, int, bool]]:
        """(path, lines added, lines removed, is an upstream file) per file of the combined diff."""
        out = []
        for rel, data in sorted(self.compose_patched().items()):
            before, after = (self.pristine_bytes(rel) or b"").decode(), (data or b"").decode()
            plus = minus = 0
            for ln in difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="", n=0):
                if ln.startswith("+") and not ln.startswith("+++"):
                    plus += 1
                elif ln.startswith("-") and not ln.startswith("---"):
                    minus += 1
            out.append((UPSTREAM_PREFIX + rel, plus, minus, True))
        for rel in self.new_modules():
            out.append((UPSTREAM_PREFIX + rel, len((self.new_module_root / rel).read_bytes().splitlines()), 0, False))
        return out

    # ---- lint ---------------------------------------------------------------------------------
    def lint(self, python: str = sys.executable) -> list[str]:
        """Upstream's pre-commit formatters (black; isort --profile black, sglang first-party) in
        check mode: every new module whole, and in each patched upstream file the lines the series
        adds (pristine 0.5.23 itself is not clean under black 24, and we do not reformat upstream).
        Returns one problem per file and formatter."""
        problems = []
        new = [self.new_module_root / rel for rel in self.new_modules() if rel.endswith(".py")]
        patched = {rel: data for rel, data in sorted(self.compose_patched().items())
                   if rel.endswith(".py") and data is not None}
        with tempfile.TemporaryDirectory(prefix="fork-lint-") as tmp:
            copies = {rel: Path(tmp) / rel for rel in patched}
            for rel, path in copies.items():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(patched[rel])
            diffs = formatter_diffs(python, new + list(copies.values()))
        for path in new:
            for tool, diff in diffs[path]:
                if diff:
                    problems.append(f"{tool} would change {path}")
        for rel, path in copies.items():
            added = added_lines(self.pristine_bytes(rel) or b"", patched[rel])
            for tool, diff in diffs[path]:
                hit = sorted(changed_old_lines(diff) & added)
                if hit:
                    lines = ", ".join(map(str, hit[:8]))
                    problems.append(f"{tool} would change lines the series adds to {rel}: {lines}")
        return problems

    # ---- wheel --------------------------------------------------------------------------------
    def build_wheel(self, out_dir: Path, local: str) -> Path:
        """``sglang-<version>+<local>`` from the pinned wheel, the series and the new modules;
        installable with ``pip install --no-deps`` over an existing install of the pinned release."""
        if self.wheel is None or not self.wheel.is_file():
            raise ForkError(f"pinned wheel not found: {self.wheel}")
        if self.wheel_sha256 and sha256_file(self.wheel) != self.wheel_sha256:
            raise ForkError(f"{self.wheel} does not match the pinned sha256")
        if not re.fullmatch(r"[A-Za-z0-9]+(\.[A-Za-z0-9]+)*", local):
            raise ForkError(f"bad local version label {local!r}")
        new_version = f"{self.version}+{local}"
        replace = self.compose_patched()
        add = {rel: (self.new_module_root / rel).read_bytes() for rel in self.new_modules()}
        old_di = f"{PACKAGE}-{self.version}.dist-info/"
        new_di = f"{PACKAGE}-{new_version}.dist-info/"
        name = self.wheel.name.replace(f"{PACKAGE}-{self.version}-", f"{PACKAGE}-{new_version}-", 1)
        out_dir.mkdir(parents=True, exist_ok=True)
        out = out_dir / name
        records: list[tuple[str, str, int]] = []
        with zipfile.ZipFile(self.wheel) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zout:
            def put(arc: str, data: bytes, info: zipfile.ZipInfo | None = None) -> None:
                zi = zipfile.ZipInfo(arc, date_time=info.date_time if info else (2026, 1, 1, 0, 0, 0))
                zi.external_attr = info.external_attr if info else 0o644 << 16
                zi.compress_type = zipfile.ZIP_DEFLATED
                zout.writestr(zi, data)
                records.append((arc, record_hash(data), len(data)))

            for info in zin.infolist():
                arc = info.filename
                if arc.endswith("/"):
                    continue
                if arc.startswith(old_di):
                    if arc == old_di + "RECORD":
                        continue
                    data = zin.read(info)
                    if arc == old_di + "METADATA":
                        data = re.sub(rb"^Version: .*$", f"Version: {new_version}".encode(), data, count=1, flags=re.M)
                    put(new_di + arc[len(old_di):], data, info)
                elif arc in replace:
                    if replace[arc] is not None:
                        put(arc, replace[arc], info)
                else:
                    put(arc, zin.read(info), info)
            for rel, data in sorted(replace.items()):
                if data is not None and rel not in zin.namelist():
                    put(rel, data)
            for rel, data in sorted(add.items()):
                put(rel, data)
            buf = io.StringIO()
            w = csv.writer(buf, lineterminator="\n")
            for arc, h, n in records:
                w.writerow([arc, h, n])
            w.writerow([new_di + "RECORD", "", ""])
            zout.writestr(new_di + "RECORD", buf.getvalue())
        return out


# --------------------------------------------------------------------------------------------
# Environments: the shared pinned one and the per-checkout overlay venv
# --------------------------------------------------------------------------------------------
@dataclass
class Pin:
    version: str
    python: str
    wheel: str
    sha256: str
    requirements: list[str]

    @classmethod
    def load(cls, repo: Path = REPO_ROOT) -> "Pin":
        data = tomllib.loads((repo / "fork" / "pin.toml").read_text())
        up = data["upstream"]
        return cls(up["version"], up["python"], up["wheel"], up["sha256"], data["environment"]["requirements"])


def cache_root() -> Path:
    return Path(os.environ.get("SGLANG_FORK_CACHE", Path.home() / ".cache" / "sglang-fork"))


def shared_env_dir(pin: Pin) -> Path:
    return Path(os.environ.get("SGLANG_FORK_ENV") or cache_root() / "envs" / f"{PACKAGE}-{pin.version}-py{pin.python.replace('.', '')}")


def site_packages(env: Path, python: str) -> Path:
    return env / "lib" / f"python{python}" / "site-packages"


@contextlib.contextmanager
def file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def run_with_progress(cmd: list[str], what: str) -> None:
    """Stream a long command's milestones with elapsed time, so a 10-minute install shows life."""
    t0 = time.time()
    log(f"{what}: {' '.join(cmd)}")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []
    n = 0
    assert proc.stdout is not None
    for line in proc.stdout:
        tail = (tail + [line.rstrip()])[-40:]
        if line.startswith(("Collecting", "Installing", "Successfully", "ERROR")):
            n += 1
            if n % 10 == 0 or not line.startswith("Collecting"):
                print(f"  [{time.time() - t0:6.0f}s] {line.rstrip()[:160]}", file=sys.stderr, flush=True)
    if proc.wait() != 0:
        raise ForkError(f"{what} failed:\n" + "\n".join(tail))
    log(f"{what}: done in {time.time() - t0:.0f}s")


def ensure_shared_env(pin: Pin) -> Path:
    """Build the shared environment once (pinned wheel + requirements); reuse it afterwards."""
    env = shared_env_dir(pin)
    marker = env / ".sglang-fork-complete"
    constraints = REPO_ROOT / "fork" / "constraints.txt"
    want = json.dumps({"wheel": pin.sha256, "requirements": sorted(pin.requirements),
                       "constraints": sha256_file(constraints) if constraints.exists() else None}, sort_keys=True)
    if marker.exists() and marker.read_text() == want:
        log(f"shared environment ready (skipping install): {env}")
        return env
    with file_lock(cache_root() / "locks" / (env.name + ".lock")):
        if marker.exists() and marker.read_text() == want:
            log(f"shared environment ready (built by another process): {env}")
            return env
        wheels = cache_root() / "wheels"
        wheel = wheels / pin.wheel
        py = f"python{pin.python}"
        if not wheel.exists() or sha256_file(wheel) != pin.sha256:
            run_with_progress([py, "-m", "pip", "download", "--no-deps", "-d", str(wheels),
                               f"{PACKAGE}=={pin.version}"], "downloading the pinned wheel")
        if sha256_file(wheel) != pin.sha256:
            raise ForkError(f"{wheel} does not match the pinned sha256 {pin.sha256}")
        if marker.exists() or (env / "pyvenv.cfg").exists():
            log("updating requirements of the shared environment")
        else:
            log(f"building the shared environment in {env} (about 8 minutes, ~11 GB)")
            subprocess.run([py, "-m", "venv", str(env)], check=True)
        # constraints.txt pins every transitive dependency to what this repository was tested with.
        extra = ["-c", str(constraints)] if constraints.exists() else []
        run_with_progress([str(env / "bin" / "python"), "-m", "pip", "install", "--progress-bar", "off", *extra,
                           str(wheel), *pin.requirements], "installing pinned sglang and requirements")
        marker.write_text(want)
    return env


def has_gpu() -> bool:
    return Path("/dev/nvidia0").exists() or shutil.which("nvidia-smi") is not None


def ensure_checkout_venv(repo: Path, pin: Pin, env: Path, *, pristine: bool = False) -> Path:
    """A small venv private to this checkout: overlay first, then the shared environment.

    ``pristine=True`` makes ``.fork/pristine-venv`` instead: the same venv without the overlay,
    i.e. unpatched upstream (the pinned wheel as installed in the shared environment), plus the
    test bed and the CPU platform plugin. It is the baseline that fork outputs are compared to.
    """
    venv = repo / ".fork" / ("pristine-venv" if pristine else "venv")
    sp = site_packages(venv, pin.python)
    want_plugin = not has_gpu()
    if not (venv / "bin" / "python").exists():
        log(f"creating the checkout venv {venv}")
        # No pip of its own: pip and setuptools come from the shared environment through the .pth.
        subprocess.run([f"python{pin.python}", "-m", "venv", "--without-pip", str(venv)], check=True)
    overlay_pth = sp / "00_sglang_fork_overlay.pth"
    if pristine:
        overlay_pth.unlink(missing_ok=True)
    else:
        overlay_pth.write_text(str(repo / ".fork" / "overlay") + "\n")
    (sp / "01_epd_testbed.pth").write_text(str(repo / "testbed") + "\n")
    (sp / "zz_sglang_fork_shared_env.pth").write_text(
        f"import site; site.addsitedir({str(site_packages(env, pin.python))!r})\n")
    has_plugin = any(sp.glob("sglang_cpu_platform-*.dist-info"))
    if want_plugin and not has_plugin:
        log("installing the CPU platform plugin (no GPU on this host)")
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps",
                        "--no-build-isolation", "-e", str(repo / "testbed" / "cpu_platform")], check=True)
    elif not want_plugin and has_plugin:
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "uninstall", "-q", "-y",
                        "sglang-cpu-platform"], check=True)
    return venv


def compile_bytecode(venv: Path, roots: list[Path]) -> None:
    """Write ``__pycache__`` for the composed overlay (its files are copies, without the shared
    environment's bytecode) and the test bed. Where ``PYTHONDONTWRITEBYTECODE`` is set (this
    machine sets it), every process would otherwise compile each sglang module it imports from
    source: 4-5 of a server process's ~25 CPU-seconds of imports, and 61.6 s -> 46.2 s from
    launch to healthy for one colocated test-bed server. Up-to-date files are skipped."""
    t0 = time.time()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run([str(venv / "bin" / "python"), "-m", "compileall", "-q", "-j", "0",
                    *map(str, roots)], check=True, env=env, stdout=subprocess.DEVNULL)
    log(f"bytecode up to date ({time.time() - t0:.1f} s)")


def repo_fork(repo: Path = REPO_ROOT) -> Fork:
    pin = Pin.load(repo)
    env = shared_env_dir(pin)
    return Fork(
        repo=repo,
        upstream_site=site_packages(env, pin.python),
        version=pin.version,
        wheel=cache_root() / "wheels" / pin.wheel,
        wheel_sha256=pin.sha256,
    )


def local_version(repo: Path) -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=repo, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "python", "fork"], cwd=repo,
                               capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "fork"
    return f"fork.g{sha}" + (".dirty" if dirty else "")


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tools/fork.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("setup", help="build/reuse the shared env, compose the fork, make the checkout venv")
    p = sub.add_parser("apply", help="compose the fork into .fork/overlay")
    p.add_argument("--force", action="store_true", help="drop overlay edits that are not in the series")
    sub.add_parser("check", help="fail if a patch does not apply or the overlay differs from the repo")
    p = sub.add_parser("refresh", help="regenerate a patch (default: the last) from edited overlay files")
    p.add_argument("patch", nargs="?")
    p.add_argument("--file", dest="files", action="append", default=[],
                   help="also put this upstream file (sglang/...) into the patch; repeatable")
    p = sub.add_parser("new", help="append a new empty patch to the series")
    p.add_argument("name")
    p.add_argument("-m", "--subject", required=True)
    p.add_argument("--body", default="")
    sub.add_parser("lint", help="check new modules and patched upstream files with black and isort")
    p = sub.add_parser("diff", help="print the combined diff against pristine upstream (the upstream PR)")
    p.add_argument("--stat", action="store_true", help="lines added/removed per file, upstream files first")
    p = sub.add_parser("wheel", help="build sglang-<version>+<local> for deployment")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "dist")
    p.add_argument("--local", default=None, help="local version label (default: fork.g<git sha>)")
    p = sub.add_parser("env", help="print the python of this checkout's fork")
    p.add_argument("--pristine", action="store_true",
                   help="print (creating it if needed) a python with unpatched upstream instead")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "setup":
            pin = Pin.load()
            env = ensure_shared_env(pin)
            fork = repo_fork()
            fork.apply()
            venv = ensure_checkout_venv(REPO_ROOT, pin, env)
            compile_bytecode(venv, [fork.overlay, REPO_ROOT / "testbed"])
            log(f"fork ready: {venv / 'bin' / 'python'}")
            return 0
        fork = repo_fork()
        if args.cmd == "apply":
            fork.apply(force=args.force)
            log(f"composed: {fork.overlay}")
        elif args.cmd == "check":
            problems = fork.check()
            if problems:
                for pr in problems:
                    print(f"fork check: FAIL: {pr}", file=sys.stderr)
                return 1
            log(f"check ok: {len(fork.patches())} patches apply cleanly; overlay matches the repository")
        elif args.cmd == "refresh":
            files = fork.refresh(args.patch, tuple(args.files))
            log(f"refreshed {args.patch or fork.patches()[-1].name}: {', '.join(files) or 'no changes'}")
        elif args.cmd == "new":
            log(f"created {fork.new_patch(args.name, args.subject, args.body)}")
        elif args.cmd == "lint":
            problems = fork.lint()
            for pr in problems:
                print(f"fork lint: FAIL: {pr}", file=sys.stderr)
            if problems:
                return 1
            log("lint ok: new modules and the lines the series adds pass black and isort")
        elif args.cmd == "diff" and args.stat:
            rows = fork.diff_stat()
            for upstream in (True, False):
                part = [r for r in rows if r[3] == upstream]
                for path, plus, minus, _ in part:
                    print(f"{'+' + str(plus):>7} {'-' + str(minus):>6}  {path}")
                what = "upstream files changed" if upstream else "new modules"
                print(f"{'+' + str(sum(r[1] for r in part)):>7} {'-' + str(sum(r[2] for r in part)):>6}  "
                      f"{len(part)} {what}\n")
        elif args.cmd == "diff":
            sys.stdout.write(fork.combined_diff())
        elif args.cmd == "wheel":
            out = fork.build_wheel(args.out, args.local or local_version(REPO_ROOT))
            print(out)
        elif args.cmd == "env":
            if args.pristine:
                pin = Pin.load()
                venv = ensure_checkout_venv(REPO_ROOT, pin, shared_env_dir(pin), pristine=True)
                print(venv / "bin" / "python")
            else:
                print(REPO_ROOT / ".fork" / "venv" / "bin" / "python")
    except ForkError as e:
        print(f"fork {args.cmd}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
