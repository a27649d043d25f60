"""kd.cache: build once, reuse, and rebuild whatever is not a complete entry.

Every test counts the builder's calls: a cache that rebuilt a good entry, or reused a bad
one, fails here. The concurrency test runs two real processes against one entry.
"""

from __future__ import annotations

import json
import logging
import os
import random
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import kd
import kd.cache
from kd.cache import MARKER, Cache, file_sha256, key

REPO = Path(__file__).resolve().parents[1]
PAYLOAD = random.Random(0).randbytes(4096)  # a small "weights" file


class Builder:
    """A build callable that writes two files and counts its calls."""

    def __init__(self, payload: bytes = PAYLOAD) -> None:
        self.calls: list[Path] = []
        self.payload = payload

    def __call__(self, directory: Path) -> dict:
        assert directory.is_dir() and not any(directory.iterdir())  # an empty private directory
        self.calls.append(directory)
        (directory / "weights.bin").write_bytes(self.payload)
        (directory / "sub").mkdir()
        (directory / "sub" / "config.json").write_text(json.dumps({"build": len(self.calls)}))
        return {"build": len(self.calls)}


def leftovers(cache: Cache, kind: str) -> list[str]:
    """Temporary build directories left in the kind's folder."""
    folder = cache.root / kind
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name) if folder.exists() else []


def assert_complete(cache: Cache, kind: str, name: str, build_no: int) -> Path:
    entry = cache.path(kind, name)
    assert (entry / "weights.bin").read_bytes() == PAYLOAD
    assert json.loads((entry / "sub" / "config.json").read_text()) == {"build": build_no}
    marker = json.loads((entry / MARKER).read_text())
    assert marker["name"] == name and marker["kind"] == kind
    assert set(marker["files"]) == {"weights.bin", str(Path("sub") / "config.json")}
    assert marker["files"]["weights.bin"] == {"size": len(PAYLOAD), "sha256": file_sha256(entry / "weights.bin")}
    assert cache.meta(kind, name) == {"build": build_no}
    assert leftovers(cache, kind) == []
    return entry


def warnings_from_cache(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "kd.cache" and r.levelno >= logging.WARNING]


@pytest.fixture
def cache(tmp_path: Path) -> Cache:
    return Cache(tmp_path / "cache")


def test_builds_once_then_reuses_without_building(cache, caplog):
    caplog.set_level(logging.INFO, logger="kd.cache")
    build = Builder()
    first = cache.get_or_build("things", "a-1", build)
    assert first == cache.path("things", "a-1") == cache.root / "things" / "a-1"
    assert len(build.calls) == 1 and build.calls[0] != first  # built elsewhere, then renamed into place
    assert_complete(cache, "things", "a-1", 1)
    stamp = (first / "weights.bin").stat().st_mtime_ns

    assert cache.get_or_build("things", "a-1", build) == first
    assert Cache(cache.root).get_or_build("things", "a-1", build) == first  # a fresh Cache object (another run)
    assert len(build.calls) == 1 and (first / "weights.bin").stat().st_mtime_ns == stamp
    assert cache.lookup("things", "a-1") == first and cache.lookup("things", "other") is None
    assert warnings_from_cache(caplog) == []
    assert any("reusing" in r.getMessage() for r in caplog.records if r.name == "kd.cache")

    # another name or kind is another entry
    cache.get_or_build("things", "a-2", build)
    cache.get_or_build("others", "a-1", build)
    assert len(build.calls) == 3


@pytest.mark.parametrize("marker", [None, "{not json", "[]"], ids=["no-marker", "garbage-marker", "list-marker"])
def test_a_directory_without_a_valid_marker_is_removed_and_rebuilt(cache, caplog, marker):
    entry = cache.path("things", "a")
    entry.mkdir(parents=True)
    (entry / "weights.bin").write_bytes(b"half-written")
    (entry / "stale.txt").write_text("from an interrupted build")
    if marker is not None:
        (entry / MARKER).write_text(marker)
    build = Builder()
    assert cache.get_or_build("things", "a", build) == entry
    assert len(build.calls) == 1
    assert_complete(cache, "things", "a", 1)
    assert not (entry / "stale.txt").exists()  # nothing of the old directory survives
    assert len(warnings_from_cache(caplog)) == 1 and str(entry) in warnings_from_cache(caplog)[0]


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda f: f.write_bytes(f.read_bytes()[:-1]), "truncated"),
        (lambda f: f.write_bytes(f.read_bytes() + b"\0"), "truncated or changed"),
        (lambda f: f.write_bytes(bytes([f.read_bytes()[0] ^ 0xFF]) + f.read_bytes()[1:]), "checksum"),
        (lambda f: f.unlink(), "missing"),
    ],
    ids=["truncated", "grown", "same-size-flipped-byte", "deleted"],
)
def test_a_damaged_file_triggers_a_rebuild_and_a_log_line(cache, caplog, damage, reason):
    build = Builder()
    entry = cache.get_or_build("things", "a", build)
    weights = entry / "weights.bin"
    size = weights.stat().st_size
    damage(weights)
    if reason == "checksum":
        assert weights.stat().st_size == size and weights.read_bytes() != PAYLOAD
    caplog.set_level(logging.WARNING, logger="kd.cache")
    assert cache.get_or_build("things", "a", build) == entry
    assert len(build.calls) == 2
    assert_complete(cache, "things", "a", 2)
    [line] = warnings_from_cache(caplog)
    assert "weights.bin" in line and reason in line and "rebuilding" in line

    assert cache.get_or_build("things", "a", build) == entry and len(build.calls) == 2  # whole again: reused


def test_a_same_size_corruption_of_a_file_over_64_mib_is_caught(cache, caplog):
    big = random.Random(1).randbytes(1 << 20) * 65  # 65 MiB: once checked by its size only

    def build(directory: Path) -> None:
        (directory / "model.safetensors").write_bytes(big)

    entry = cache.get_or_build("teachers", "t", build)
    record = json.loads((entry / MARKER).read_text())["files"]["model.safetensors"]
    assert record == {"size": len(big), "sha256": file_sha256(entry / "model.safetensors")}
    with open(entry / "model.safetensors", "r+b") as f:  # one flipped byte deep inside the weights
        f.seek(40 << 20)
        f.write(bytes([big[40 << 20] ^ 0xFF]))
    assert (entry / "model.safetensors").stat().st_size == len(big)
    assert cache.lookup("teachers", "t") is None and not entry.exists()
    [line] = warnings_from_cache(caplog)
    assert "model.safetensors does not match its checksum" in line


def test_checksums_are_read_once_per_process_and_entry(cache, monkeypatch):
    build = Builder()
    entry = cache.get_or_build("things", "a", build)
    hashed: list[Path] = []
    real = kd.cache.file_sha256
    monkeypatch.setattr(kd.cache, "file_sha256", lambda path: hashed.append(Path(path)) or real(path))

    assert cache.lookup("things", "a") == entry and len(hashed) == 2  # the first open in this process reads it
    for _ in range(3):
        assert cache.get_or_build("things", "a", build) == entry
    assert Cache(cache.root).lookup("things", "a") == entry  # another Cache object, the same process
    assert len(hashed) == 2 and len(build.calls) == 1  # then sizes only

    # a file rewritten since (its mtime or inode changes) is read again
    weights = entry / "weights.bin"
    stat = weights.stat()
    weights.write_bytes(bytes([PAYLOAD[0] ^ 0xFF]) + PAYLOAD[1:])
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert cache.lookup("things", "a") is None and len(hashed) > 2

    # an entry verified in this process is not read again; the next process reads it
    entry = cache.get_or_build("things", "a", build)
    assert cache.lookup("things", "a") == entry
    stat = weights.stat()
    weights.write_bytes(bytes([PAYLOAD[0] ^ 0xFF]) + PAYLOAD[1:])  # same size, same mtime: bit rot
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert cache.lookup("things", "a") == entry
    monkeypatch.setattr(kd.cache, "_verified", {})  # what a new process starts with
    assert cache.lookup("things", "a") is None


@pytest.mark.parametrize("obstacle", ["file", "dangling-link", "kind-folder-is-a-file"])
def test_a_plain_file_where_the_entry_should_be_is_replaced(cache, caplog, obstacle):
    entry = cache.path("things", "a")
    if obstacle == "kind-folder-is-a-file":
        entry.parent.parent.mkdir(parents=True)
        entry.parent.write_text("not a folder")
    else:
        entry.parent.mkdir(parents=True)
        entry.write_text("not an entry") if obstacle == "file" else entry.symlink_to(cache.root / "nowhere")
    build = Builder()
    assert cache.get_or_build("things", "a", build) == entry and len(build.calls) == 1
    assert_complete(cache, "things", "a", 1)
    assert any(str(entry.parent if obstacle.startswith("kind") else entry) in line
               for line in warnings_from_cache(caplog))


KILLED = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from kd.cache import Cache

    def build(directory):
        (directory / "weights.bin").write_bytes(b"x" * 1000)
        Path(sys.argv[2]).touch()
        time.sleep(60)

    Cache(sys.argv[1]).get_or_build("things", "a", build)
    """
)


def test_temporary_directories_of_a_killed_build_are_removed_by_the_next_build(cache, tmp_path, caplog):
    started = tmp_path / "started"
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(cache.root), str(started)], cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert started.exists()
    finally:
        proc.kill()  # SIGKILL mid-build: no cleanup runs
        proc.wait()
    [left] = leftovers(cache, "things")
    assert (cache.root / "things" / left / "weights.bin").is_file()
    cache.get_or_build("other", "b", Builder())  # another entry's build leaves it alone
    assert leftovers(cache, "things") == [left]

    build = Builder()
    assert cache.get_or_build("things", "a", build) == cache.path("things", "a") and len(build.calls) == 1
    assert_complete(cache, "things", "a", 1)  # no leftovers
    assert any(left in line and "interrupted build" in line for line in warnings_from_cache(caplog))


def test_published_files_are_readable_by_the_group_whatever_the_umask(cache):
    old = os.umask(0o077)
    try:
        entry = cache.get_or_build("things", "a", Builder())
    finally:
        os.umask(old)
    assert stat.S_IMODE(entry.stat().st_mode) == kd.cache.DIR_MODE == 0o755
    assert stat.S_IMODE((entry / "sub").stat().st_mode) == 0o755
    for name in ("weights.bin", "sub/config.json", MARKER):
        assert stat.S_IMODE((entry / name).stat().st_mode) == kd.cache.FILE_MODE == 0o644, name
    lock = cache.root / ".locks" / "things-a.lock"
    assert stat.S_IMODE(lock.stat().st_mode) & 0o060 == 0o060  # other users of the cache can lock it


def test_a_run_waiting_on_another_process_lock_says_so(cache, caplog):
    import fcntl

    caplog.set_level(logging.INFO, logger="kd.cache")
    lock = cache.root / ".locks" / "teachers-t.lock"
    lock.parent.mkdir(parents=True)
    holder = open(lock, "a+")  # another open file description: flock conflicts as between processes
    fcntl.flock(holder, fcntl.LOCK_EX)
    release = threading.Timer(0.5, lambda: (fcntl.flock(holder, fcntl.LOCK_UN), holder.close()))
    release.start()
    try:
        started = time.monotonic()
        cache.get_or_build("teachers", "t", Builder(), what="teacher")
        assert time.monotonic() - started >= 0.4
    finally:
        release.join()
    [line] = [ln for ln in warnings_from_cache(caplog) if "waiting" in ln]
    assert str(lock) in line and str(cache.path("teachers", "t")) in line and "teacher" in line
    assert "\n" not in line

    caplog.clear()
    cache.get_or_build("teachers", "u", Builder())  # a free lock: no such line
    assert not [ln for ln in warnings_from_cache(caplog) if "waiting" in ln]


def test_a_marker_naming_another_entry_triggers_a_rebuild(cache, caplog):
    build = Builder()
    a = cache.get_or_build("things", "a", build)
    b = cache.get_or_build("things", "b", build)
    (b / MARKER).write_text((a / MARKER).read_text())  # b's files, a's marker: not b
    assert cache.lookup("things", "b") is None and not b.exists()
    assert "another entry" in warnings_from_cache(caplog)[0]
    assert cache.get_or_build("things", "b", build) == b and len(build.calls) == 3
    assert_complete(cache, "things", "b", 3)
    assert cache.get_or_build("things", "a", build) == a and len(build.calls) == 3  # a is untouched


def test_an_entry_the_validator_refuses_is_rebuilt(cache, caplog):
    build = Builder()
    entry = cache.get_or_build("things", "a", build)
    seen: list[Path] = []

    def accept(directory: Path) -> None:
        seen.append(directory)

    def refuse(directory: Path) -> None:
        seen.append(directory)
        raise ValueError("cannot parse config.json")

    assert cache.get_or_build("things", "a", build, validate=accept) == entry
    assert len(build.calls) == 1 and seen == [entry]  # the validator sees the stored entry

    assert cache.get_or_build("things", "a", build, validate=refuse, what="test thing") == entry
    assert len(build.calls) == 2
    assert_complete(cache, "things", "a", 2)
    [line] = warnings_from_cache(caplog)
    assert "unreadable" in line and "cannot parse config.json" in line
    assert cache.get_or_build("things", "a", build, validate=accept) == entry and len(build.calls) == 2


def test_a_failed_build_leaves_nothing_and_the_next_call_builds(cache):
    calls = []

    def broken(directory: Path) -> None:
        calls.append(directory)
        (directory / "weights.bin").write_bytes(b"partial")
        raise RuntimeError("out of disk")

    with pytest.raises(RuntimeError, match="out of disk"):
        cache.get_or_build("things", "a", broken)
    assert len(calls) == 1 and not calls[0].exists()
    assert not cache.path("things", "a").exists() and leftovers(cache, "things") == []
    assert cache.lookup("things", "a") is None

    build = Builder()
    assert cache.get_or_build("things", "a", build) == cache.path("things", "a") and len(build.calls) == 1
    assert_complete(cache, "things", "a", 1)


def test_a_failed_rebuild_does_not_leave_the_old_unusable_entry(cache):
    entry = cache.path("things", "a")
    entry.mkdir(parents=True)
    (entry / "weights.bin").write_bytes(b"no marker")

    def broken(directory: Path) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        cache.get_or_build("things", "a", broken)
    assert not entry.exists() and leftovers(cache, "things") == []


WORKER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from kd.cache import Cache, key

    root, counter, ready, me = sys.argv[1:5]
    Path(ready, me).touch()
    deadline = time.monotonic() + 30
    while len(os.listdir(ready)) < 2 and time.monotonic() < deadline:  # start together
        time.sleep(0.005)

    def build(directory):
        with open(counter, "a") as f:
            f.write(me + "\\n")
        time.sleep(0.5)  # long enough for the other process to arrive while this one builds
        (directory / "data.txt").write_text("built by " + me)
        return {"by": me}

    path = Cache(root).get_or_build("things", "shared", build)
    print(path)
    print(key({"b": [1, 2], "a": {"x": 1.5}}, 3))
    """
)


def test_concurrent_processes_build_an_entry_once(tmp_path):
    root, counter, ready = tmp_path / "cache", tmp_path / "counter.txt", tmp_path / "ready"
    ready.mkdir()
    procs = [
        subprocess.Popen([sys.executable, "-c", WORKER, str(root), str(counter), str(ready), f"w{i}"], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        outs.append(out.split())
    builders = counter.read_text().splitlines()
    assert len(builders) == 1 and builders[0] in {"w0", "w1"}
    (path0, key0), (path1, key1) = outs
    cache = Cache(root)
    assert Path(path0) == Path(path1) == cache.path("things", "shared")
    assert (Path(path0) / "data.txt").read_text() == f"built by {builders[0]}"
    assert cache.meta("things", "shared") == {"by": builders[0]}
    assert leftovers(cache, "things") == []
    # the same parts give the same key in every process
    assert key0 == key1 == key({"a": {"x": 1.5}, "b": [1, 2]}, 3)


def test_key_is_stable_order_free_and_sensitive_to_every_value():
    base = key({"a": 1, "b": {"c": [1, 2], "d": "x"}}, 512, 2)
    assert base == key({"b": {"d": "x", "c": [1, 2]}, "a": 1}, 512, 2)  # dict order is irrelevant
    assert len(base) == 16 and int(base, 16) >= 0
    assert len(key("x", length=32)) == 32
    changed = [
        key({"a": 2, "b": {"c": [1, 2], "d": "x"}}, 512, 2),
        key({"a": 1, "b": {"c": [2, 1], "d": "x"}}, 512, 2),  # list order matters
        key({"a": 1, "b": {"c": [1, 2], "d": "y"}}, 512, 2),
        key({"a": 1, "b": {"c": [1, 2], "d": "x"}, "e": None}, 512, 2),
        key({"a": 1, "b": {"c": [1, 2], "d": "x"}}, 513, 2),
        key({"a": 1, "b": {"c": [1, 2], "d": "x"}}, 2, 512),
        key({"a": 1, "b": {"c": [1, 2], "d": "x"}}, 512),
    ]
    assert base not in changed and len(set(changed)) == len(changed)

    # OmegaConf nodes hash like the plain containers they hold (interpolations resolved)
    cfg = OmegaConf.create({"b": {"d": "x", "c": [1, 2]}, "a": "${n}", "n": 1})
    plain = {"a": 1, "b": {"c": [1, 2], "d": "x"}, "n": 1}
    assert key(cfg, 512, 2) == key(plain, 512, 2)
    assert key(cfg.b.c) == key([1, 2])
    assert key(cfg, 512, 2) != key({**plain, "n": 2}, 512, 2)


def test_key_changes_with_the_kd_version(monkeypatch):
    before = key({"a": 1})
    monkeypatch.setattr(kd, "__version__", kd.__version__ + ".post1")
    assert key({"a": 1}) != before


# ----------------------------------------------------------------------------- callers


def test_the_trained_tokenizer_is_cached_per_data_and_settings(tmp_path, monkeypatch, caplog):
    import kd.data.tokenizer as tokenizer_module
    from kd.data.lm import _trained_tokenizer

    from kd.data.sources import TaskSource
    trained = []
    real = tokenizer_module.task_tokenizer

    def counting(*args, **kwargs):
        trained.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(tokenizer_module, "task_tokenizer", counting)
    source = TaskSource(train_size=200, val_size=10, test_size=10, seed=0)
    train = source.load()["train"]
    first = _trained_tokenizer(train, 300, 2, str(tmp_path), source.fingerprint())
    again = _trained_tokenizer(train, 300, 2, str(tmp_path), source.fingerprint())
    assert len(trained) == 1 and again.get_vocab() == first.get_vocab() and again.chat_template == first.chat_template
    [entry] = Cache(tmp_path).root.joinpath("tokenizers").glob("bpe300-*")
    assert entry.name == f"bpe300-{key(source.fingerprint(), 300, 2)}" and (entry / MARKER).is_file()

    _trained_tokenizer(train, 300, 3, str(tmp_path), source.fingerprint())  # other settings: another entry
    assert len(trained) == 2

    (entry / "tokenizer.json").write_text("{}")  # damaged: rebuilt, with a log line
    rebuilt = _trained_tokenizer(train, 300, 2, str(tmp_path), source.fingerprint())
    assert len(trained) == 3 and rebuilt.get_vocab() == first.get_vocab()
    assert any("tokenizer.json" in line for line in warnings_from_cache(caplog))

    _trained_tokenizer(train, 300, 2, None, source.fingerprint())  # no cache directory: trained every time
    assert len(trained) == 4


def test_a_read_only_cache_lacking_an_entry_is_one_sentence_naming_it(tmp_path, monkeypatch):
    """Any kind of entry (a tokenizer, teacher generations, a logit cache...) that a read-only
    cache lacks is refused in one sentence naming it, not a PermissionError from deep inside;
    an entry it holds is still served. (Root ignores permission bits, so the refusal of the
    filesystem is simulated where the cache first writes.)"""
    import errno
    from pathlib import Path

    from kd import ConfigError
    from kd.cache import Cache

    cache = Cache(tmp_path / "cache")
    held = cache.get_or_build("tokenizers", "held", lambda d: (d / "vocab.txt").write_text("a b"))
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if self.name == ".locks" or str(self).startswith(str(tmp_path / "cache")):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    assert cache.get_or_build("tokenizers", "held", lambda d: None) == held
    with pytest.raises(ConfigError) as err:
        cache.get_or_build("generations", "missing", lambda d: None, what="teacher generations")
    assert str(err.value) == (f"the cache {tmp_path / 'cache'} is read-only and lacks the teacher generations "
                              f"{tmp_path / 'cache' / 'generations' / 'missing'}; build it once with a writable "
                              "paths.cache_dir (KD_CACHE_DIR), or use a cache that holds it")
