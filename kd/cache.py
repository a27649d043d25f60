"""One content-addressed cache for everything kd builds once and reuses: trained teachers,
SFT students, scratch baselines, teacher generations, trained tokenizers, converted
pretrained models (and, later, teacher logit caches).

An entry is a directory ``<root>/<kind>/<name>`` whose name carries a hash of exactly what
shapes the artifact (:func:`key`). Its life cycle:

1. **lookup**: the entry is complete when its ``entry.json`` (the completeness marker,
   written last) names this entry and every file it lists still has its recorded size and
   sha256, and the caller's own ``validate`` accepts it. Anything else (stale, foreign,
   truncated, corrupted, a directory without its marker, a plain file where the entry's
   directory should be) is removed, with a log line saying why, and rebuilt. Sizes are
   checked on every lookup; the checksums once per process and entry (an entry whose
   files keep their inode, size and mtime since it was verified is not read again: hashing
   SmolLM2's 540 MB of weights costs about a second).
2. **build**: under an exclusive file lock (``<root>/.locks/<kind>-<name>.lock``), so concurrent
   sweep jobs build an entry once and the others wait (saying so) and reuse it; temporary
   directories that a killed build of the same entry left behind are removed first; the
   builder writes into a private temporary directory, the marker goes in last, files are
   made readable by everyone who can read the cache (``rw-r--r--``, directories
   ``rwxr-xr-x``, whatever the umask, so a cache shared by a group works), and the
   directory is renamed into place (atomic on one filesystem): a crash never leaves a
   half-written entry that passes the lookup.

Entries are plain directories: delete one to force a rebuild, or the whole root to start
afresh. ``kd`` keeps the root at ``paths.cache_dir`` (``$KD_CACHE_DIR``, default
``~/.cache/kd``); code that builds a :class:`Cache` (or a regime) from Python without a
root gets the same directory from :func:`default_cache_dir`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kd

log = logging.getLogger(__name__)

#: the name of the completeness marker inside every entry
MARKER = "entry.json"

#: the modes of a published entry's files and directories (set explicitly: the umask does not apply)
FILE_MODE, DIR_MODE = 0o644, 0o755

#: entry directory -> the signature (marker text, each file's inode, size and mtime) it had when
#: this process last checked its checksums: unchanged entries are not hashed again
_verified: dict[str, tuple] = {}


def _plain(value: Any) -> Any:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def key(*parts: Any, length: int = 16) -> str:
    """A stable hex digest of ``parts`` (plain values or OmegaConf nodes, resolved) and the
    kd version: the same parts give the same key in every process."""
    blob = json.dumps([kd.__version__, [_plain(p) for p in parts]], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


#: data files up to this size are fingerprinted by the sha256 of all their bytes (about 0.1 s
#: for 64 MiB); larger ones by their size, modification time and the sha256 of
#: :data:`SAMPLE` bytes at their start, middle and end (:func:`file_fingerprint`)
FULL_HASH_MAX = 64 << 20
SAMPLE = 1 << 20

#: (path, device, inode, size, mtime_ns, ctime_ns) -> fingerprint: each data file is hashed
#: once per process while it stays as it was (any write, even one that restores the size and
#: modification time, changes its ctime)
_fingerprints: dict[tuple, dict[str, Any]] = {}


def file_fingerprint(path: str | os.PathLike) -> dict[str, Any] | None:
    """What a data file holds, for cache keys: ``{"sha256": ...}`` of all its bytes when it
    has at most :data:`FULL_HASH_MAX` bytes (content alone: a copy or a ``touch`` keeps it);
    above that, its size, modification time and the sha256 of its first, middle and last
    :data:`SAMPLE` bytes (a full hash of a multi-gigabyte dump would cost seconds at every
    run; the sample catches a rewrite that keeps the time, the time an edit elsewhere).
    None for a path that is not a file (loading it will say so). Computed once per process
    and file state (:data:`_fingerprints`)."""
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    try:
        stat = os.stat(path)
    except OSError:
        return None
    if not os.path.isfile(path):
        return None
    memo = (path, stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    if memo not in _fingerprints:
        if stat.st_size <= FULL_HASH_MAX:
            _fingerprints[memo] = {"sha256": file_sha256(path)}
        else:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for start in (0, (stat.st_size - SAMPLE) // 2, stat.st_size - SAMPLE):
                    f.seek(start)
                    h.update(f.read(SAMPLE))
            _fingerprints[memo] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sampled_sha256": h.hexdigest()}
    return _fingerprints[memo]


def files_fingerprint(paths: Any) -> dict[str, dict[str, Any] | None]:
    """:func:`file_fingerprint` of each of ``paths`` (one path or several; a directory
    stands for every file under it, hidden ones excluded), by path."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: dict[str, dict[str, Any] | None] = {}
    for path in paths:
        path = Path(path).expanduser()
        if path.is_dir():
            for file in sorted(path.rglob("*")):
                rel = file.relative_to(path).parts
                if file.is_file() and not any(part.startswith(".") for part in rel):
                    out[str(file)] = file_fingerprint(file)
        else:
            out[str(path)] = file_fingerprint(path)
    return out


def _inventory(directory: Path) -> dict[str, dict[str, Any]]:
    return {str(path.relative_to(directory)): {"size": path.stat().st_size, "sha256": file_sha256(path)}
            for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MARKER)}


def _set_modes(directory: Path) -> None:
    """Give ``directory`` and everything in it :data:`FILE_MODE` / :data:`DIR_MODE`."""
    directory.chmod(DIR_MODE)
    for path in directory.rglob("*"):
        if not path.is_symlink():
            path.chmod(DIR_MODE if path.is_dir() else FILE_MODE)


def _remove(path: Path) -> None:
    """Remove whatever is at ``path``: a directory tree, or a plain file or link."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def default_cache_dir() -> Path:
    """``$KD_CACHE_DIR``, else ``~/.cache/kd`` (the same default as ``paths.cache_dir``):
    the root of every cache kd keeps when none is named."""
    return Path(os.environ.get("KD_CACHE_DIR") or Path.home() / ".cache" / "kd").expanduser()


class Cache:
    """The cache under ``root`` (see the module docstring).

    Args:
        root: the cache directory (created on first use); ``~`` is expanded. None:
            :func:`default_cache_dir` (``$KD_CACHE_DIR``, else ``~/.cache/kd``).
    """

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = default_cache_dir() if root is None else Path(root).expanduser()

    def path(self, kind: str, name: str) -> Path:
        """Where entry ``name`` of ``kind`` lives (whether or not it exists)."""
        return self.root / kind / name

    # ------------------------------------------------------------------ lookup

    def _problem(self, directory: Path, name: str, validate: Callable[[Path], None] | None,
                 checksums: bool = True) -> str | None:
        """Why ``directory`` is not a usable entry ``name`` (None: it is); ``checksums=False``
        checks the files' presence and sizes only."""
        marker = directory / MARKER
        if not directory.is_dir():
            return "it is not a directory"
        if not marker.is_file():
            return "it has no completeness marker (interrupted?)"
        try:
            text = marker.read_text()
            meta = json.loads(text)
        except (OSError, ValueError) as e:
            return f"its marker is unreadable ({e})"
        if not isinstance(meta, dict) or meta.get("name") != name:
            return "it belongs to another entry"
        files = meta.get("files")
        if not isinstance(files, dict) or not all(isinstance(r, dict) for r in files.values()):
            return "its marker lists no files"
        signature: list[Any] = [text]
        for rel, record in files.items():
            path = directory / rel
            if not path.is_file():
                return f"its file {rel} is missing"
            stat = path.stat()
            if stat.st_size != record.get("size"):
                return f"its file {rel} is truncated or changed"
            if not isinstance(record.get("sha256"), str):
                return f"its marker has no checksum for {rel} (written by an older kd)"
            signature.append((rel, stat.st_ino, stat.st_size, stat.st_mtime_ns))
        if checksums and _verified.get(str(directory)) != tuple(signature):  # once per process, unless files changed
            for rel, record in files.items():
                if file_sha256(directory / rel) != record["sha256"]:
                    _verified.pop(str(directory), None)
                    return f"its file {rel} does not match its checksum (corrupted or changed)"
            _verified[str(directory)] = tuple(signature)
        if validate is not None:
            try:
                validate(directory)
            except Exception as e:  # the caller's reader refused it: rebuild
                return f"it is unreadable ({e})"
        return None

    def lookup(self, kind: str, name: str, validate: Callable[[Path], None] | None = None) -> Path | None:
        """The complete entry, or None (an unusable directory is removed, with a log line)."""
        directory = self.path(kind, name)
        if not directory.exists() and not directory.is_symlink():
            return None
        problem = self._problem(directory, name, validate)
        if problem is None:
            return directory
        log.warning("cache entry %s is unusable: %s; rebuilding it", directory, problem)
        _verified.pop(str(directory), None)
        _remove(directory)
        return None

    def meta(self, kind: str, name: str) -> dict[str, Any]:
        """The ``info`` an entry was published with (its marker's ``info`` field)."""
        return json.loads((self.path(kind, name) / MARKER).read_text()).get("info", {})

    # ------------------------------------------------------------------ build

    @contextlib.contextmanager
    def _lock(self, kind: str, name: str, what: str) -> Iterator[bool]:
        """Hold the entry's lock; yields whether it is a real (POSIX) lock."""
        folder = self.root / ".locks"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{kind}-{name}.lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o664)
            with contextlib.suppress(OSError):  # group-writable whatever the umask (NFS locks need a writable file)
                os.fchmod(fd, 0o664)
        except PermissionError:  # another user's lock file in a shared cache: locally, flock needs only reading
            fd = os.open(path, os.O_RDONLY)
        try:
            try:
                import fcntl
            except ImportError:  # no POSIX locks (Windows): publish-once still keeps entries whole
                yield False
                return
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.warning("waiting for the lock %s: another process is building the %s %s", path, what,
                            self.path(kind, name))
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield True
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _clear_leftovers(self, kind: str, name: str) -> None:
        """Under the entry's lock: remove the temporary directories of builds of this entry
        that died (a live build of it would hold the lock), and a plain file where the
        kind's folder should be."""
        folder = self.root / kind
        if folder.is_symlink() or folder.exists() and not folder.is_dir():
            log.warning("%s is not a directory; removing it", folder)
            _remove(folder)
        if not folder.is_dir():
            return
        prefix = f".{name}.tmp-"
        for path in folder.iterdir():
            if path.name.startswith(prefix):
                log.warning("removing %s, left by an interrupted build of the %s", path, kind)
                _remove(path)

    def get_or_build(
        self,
        kind: str,
        name: str,
        build: Callable[[Path], dict[str, Any] | None],
        validate: Callable[[Path], None] | None = None,
        what: str | None = None,
    ) -> Path:
        """The entry ``name`` of ``kind``, built by ``build(tmp_dir)`` when missing or unusable.

        ``build`` writes the artifact's files into the empty directory it is given and may
        return a dict of facts to keep with it (:meth:`meta`). ``validate(directory)`` (an
        optional reader) raises when a stored entry cannot be used. ``what`` names the
        artifact in log lines (default: ``kind``).
        """
        what = what or kind
        found = self.lookup(kind, name, validate)
        if found is not None:
            log.info("reusing cached %s %s", what, found)
            return found
        try:
            (self.root / ".locks").mkdir(parents=True, exist_ok=True)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            raise kd.ConfigError(f"the cache {self.root} is read-only and lacks the {what} {self.path(kind, name)}; "
                                 "build it once with a writable paths.cache_dir (KD_CACHE_DIR), or use a cache "
                                 "that holds it") from None
        with self._lock(kind, name, what) as locked:
            found = self.lookup(kind, name, validate)  # another job may have built it meanwhile
            if found is not None:
                log.info("reusing cached %s %s (built by another job)", what, found)
                return found
            if locked:
                self._clear_leftovers(kind, name)
            final = self.path(kind, name)
            log.info("building the %s once (cached afterwards in %s)", what, final)
            with atomic_directory(final) as tmp:  # replaces whatever unusable directory is left there
                started = time.perf_counter()
                info = build(tmp) or {}
                marker = {"name": name, "kind": kind, "kd_version": kd.__version__, "info": info, "created": time.time(),
                          "built_by": f"{what}: " + " ".join(["kd", *sys.argv[1:]])[:500],
                          "build_s": round(time.perf_counter() - started, 2), "files": _inventory(tmp)}
                (tmp / MARKER).write_text(json.dumps(marker, indent=2, default=str))  # last: the entry is complete
                _set_modes(tmp)
        return final


def partial_path(target: str | os.PathLike) -> Path:
    """A private temporary name beside ``target`` (hidden, unique to this process and call),
    to write into and then rename over ``target``."""
    target = Path(target)
    return target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``target``; when the block ends without an error
    it replaces ``target`` (an older one is removed first), else it is deleted: a process
    killed while writing never leaves a half-written ``target``."""
    target = Path(target)
    partial = partial_path(target)
    try:
        partial.mkdir(parents=True)
        yield partial
        _remove(target)  # a directory, or a plain file or link in its place
        os.replace(partial, target)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):  # a full disk: say which target, keep nothing half-written
            raise kd.ConfigError(kd.disk_full(target)) from None
        raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file renamed over it: whole or not at all."""
    path = Path(path)
    partial = partial_path(path)
    try:
        with open(partial, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise kd.ConfigError(kd.disk_full(path)) from None
        raise
    finally:
        partial.unlink(missing_ok=True)


__all__ = ["Cache", "MARKER", "FILE_MODE", "DIR_MODE", "key", "file_sha256", "file_fingerprint", "files_fingerprint",
           "partial_path", "atomic_directory", "atomic_write_text"]
