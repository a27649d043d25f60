"""``kd cache``: look after the cache of trained teachers, baselines, generations, logit
caches and tokenizers (:mod:`kd.cache`), which otherwise grows without bound.

::

    kd cache                     # list: kind, key, size, date, what built it; the total
    kd cache verify              # check every entry (files, sizes, sha256); name the broken
    kd cache remove --kind teachers --older-than 30
    kd cache remove --stale      # entries no run of this kd can use (see below)
    kd cache remove --broken     # entries that fail verification, and dead builds' leftovers

Options: ``--root DIR`` (default: ``$KD_CACHE_DIR``, else ``~/.cache/kd``, as ``kd`` runs
use), ``--dry-run`` for ``remove``.

An entry's status:

* ``ok``: its marker and every file it lists are whole (``list`` checks sizes; ``verify``
  also reads every byte against its sha256);
* ``stale``: whole, but built by another kd version. Every key includes the version
  (:func:`kd.cache.key`), so no run of this kd will look it up again;
* ``broken``: no marker, an unreadable one, a missing, resized or (``verify``) corrupted
  file: a run would remove and rebuild it;
* ``partial``: a temporary directory that a killed build left (``.<key>.tmp-*``); one whose
  build still runs (its lock is held) is shown as ``building`` and never removed.

Removal takes the entry's lock first (:meth:`kd.cache.Cache._lock`), so an entry a run is
building or reading under the lock is skipped, not cut from under it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import kd
from kd.cache import MARKER, Cache, _remove, _verified, default_cache_dir

STATUSES = ("ok", "stale", "broken", "partial", "building")


@dataclass
class Entry:
    kind: str
    name: str
    path: Path
    size: int
    created: float
    built_by: str
    status: str
    why: str = ""

    @property
    def key(self) -> str:
        return self.name


def _size(path: Path) -> int:
    if path.is_file() or path.is_symlink():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _lock_held(cache: Cache, kind: str, name: str) -> bool:
    """Whether a live process holds the lock of entry ``name`` (building it)."""
    path = cache.root / ".locks" / f"{kind}-{name}.lock"
    if not path.exists():
        return False
    try:
        import fcntl
    except ImportError:
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def entries(root: Path, checksums: bool = False) -> list[Entry]:
    """Every entry and leftover under ``root``, with its status (module docstring);
    ``checksums`` reads every file against its recorded sha256."""
    cache = Cache(root)
    found: list[Entry] = []
    if not root.is_dir():
        return found
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for path in sorted(folder.iterdir()):
            kind, stat = folder.name, path.lstat()
            if path.name.startswith(".") and ".tmp-" in path.name:
                name = path.name[1:].split(".tmp-", 1)[0]
                status = "building" if _lock_held(cache, kind, name) else "partial"
                found.append(Entry(kind, name, path, _size(path), stat.st_mtime, "", status,
                                   "a build in progress" if status == "building" else "left by an interrupted build"))
                continue
            if path.name.startswith("."):
                continue
            meta: dict = {}
            with contextlib.suppress(OSError, ValueError):
                loaded = json.loads((path / MARKER).read_text())
                meta = loaded if isinstance(loaded, dict) else {}
            if checksums:
                _verified.pop(str(path), None)  # read every byte again
            problem = cache._problem(path, path.name, None, checksums=checksums)
            status, why = ("broken", problem) if problem else ("ok", "")
            if status == "ok" and meta.get("kd_version") != kd.__version__:
                status, why = "stale", f"built by kd {meta.get('kd_version')}, this is kd {kd.__version__}"
            found.append(Entry(kind, path.name, path, _size(path), float(meta.get("created") or stat.st_mtime),
                               str(meta.get("built_by") or meta.get("info", {}).get("what") or ""), status, why))
    return found


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


def _date(stamp: float) -> str:
    return datetime.datetime.fromtimestamp(stamp).strftime("%Y-%m-%d %H:%M")


def _table(found: list[Entry]) -> str:
    rows = [(e.kind, e.name, _human(e.size), _date(e.created), e.status, e.built_by or "-") for e in found]
    heads = ("kind", "key", "size", "built", "status", "built by")
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(heads)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(heads, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def _select(found: list[Entry], args: argparse.Namespace) -> list[Entry]:
    now = time.time()
    chosen = [e for e in found if e.status != "building"]
    if args.kind:
        chosen = [e for e in chosen if e.kind in args.kind]
    if args.older_than is not None:
        chosen = [e for e in chosen if now - e.created > args.older_than * 86400]
    wanted = {s for s, flag in (("stale", args.stale), ("broken", args.broken), ("partial", args.broken)) if flag}
    if wanted:
        chosen = [e for e in chosen if e.status in wanted]
    return chosen


def main(argv: list[str] | None = None) -> int:
    """``kd cache [list|verify|remove] ...`` (module docstring); returns the exit code:
    ``verify`` exits 1 when an entry is broken, bad arguments exit 2."""
    parser = argparse.ArgumentParser(prog="kd cache", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", nargs="?", default="list", choices=("list", "verify", "remove"))
    parser.add_argument("--root", type=Path, default=None, help="the cache (default: $KD_CACHE_DIR or ~/.cache/kd)")
    parser.add_argument("--kind", action="append", help="only this kind (teachers, baselines, sft, generations, ...)")
    parser.add_argument("--older-than", type=float, default=None, metavar="DAYS", help="only entries built before")
    parser.add_argument("--stale", action="store_true", help="only entries built by another kd version")
    parser.add_argument("--broken", action="store_true", help="only broken entries and interrupted builds' leftovers")
    parser.add_argument("--dry-run", action="store_true", help="say what remove would delete, delete nothing")
    args = parser.parse_args(argv)
    root = (args.root or default_cache_dir()).expanduser()
    if not root.is_dir():
        print(f"kd cache: error: {root} is not a directory; pass --root <the cache> or set KD_CACHE_DIR",
              file=sys.stderr)
        return 2
    if args.action == "remove" and not (args.kind or args.older_than is not None or args.stale or args.broken):
        print("kd cache: error: remove needs a choice of entries; pass --kind, --older-than, --stale or --broken "
              f"(or delete {root} to empty the cache)", file=sys.stderr)
        return 2
    found = entries(root, checksums=args.action == "verify" or (args.action == "remove" and args.broken))
    if args.action == "remove":
        cache, freed, removed = Cache(root), 0, 0
        for e in _select(found, args):
            with cache._lock(e.kind, e.name, e.kind):
                if not args.dry_run:
                    _remove(e.path)
                    _verified.pop(str(e.path), None)
            freed, removed = freed + e.size, removed + 1
            print(f"{'would remove' if args.dry_run else 'removed'} {e.kind}/{e.name} ({e.status}, {_human(e.size)})")
        print(f"{'would free' if args.dry_run else 'freed'} {_human(freed)} in {removed} entr"
              f"{'y' if removed == 1 else 'ies'}")
        return 0
    if args.kind:
        found = [e for e in found if e.kind in args.kind]
    print(_table(found))
    counts = {s: sum(e.status == s for e in found) for s in STATUSES}
    print(f"total {_human(sum(e.size for e in found))} in {len(found)} entr{'y' if len(found) == 1 else 'ies'} "
          f"under {root}: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    broken = [e for e in found if e.status in ("broken", "partial")]
    for e in broken:
        print(f"{e.status}: {e.path}: {e.why}")
    if args.action == "verify" and broken:
        print(f"kd cache: {len(broken)} broken entr{'y' if len(broken) == 1 else 'ies'}; kd cache remove --broken "
              "removes them (a run would rebuild them)", file=sys.stderr)
        return 1
    return 0
