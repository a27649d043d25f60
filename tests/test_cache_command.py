"""``kd cache`` (kd/cache_command.py) on a cache with good, broken, stale and partial
entries: list, verify, remove by kind, age, staleness and brokenness."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from kd.cache import MARKER, Cache, _verified
from kd.cache_command import entries, main


def _build(cache: Cache, kind: str, name: str, payload: bytes) -> Path:
    def write(tmp: Path) -> dict:
        (tmp / "weights.bin").write_bytes(payload)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "notes.txt").write_text("x" * 10)
        return {"what": kind}

    return cache.get_or_build(kind, name, write, what=kind[:-1])


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    """good: teachers/good, baselines/old (built 40 days ago); corrupted: teachers/flipped
    (one byte, same size); truncated: baselines/cut; stale: teachers/older (another kd);
    partial: a killed build's temporary directory; no marker: generations/nomarker."""
    root = tmp_path / "cache"
    c = Cache(root)
    _build(c, "teachers", "good", b"a" * 1000)
    old = _build(c, "baselines", "old", b"b" * 2000)
    marker = json.loads((old / MARKER).read_text())
    marker["created"] = time.time() - 40 * 86400
    (old / MARKER).write_text(json.dumps(marker))
    flipped = _build(c, "teachers", "flipped", b"c" * 1000)
    data = bytearray((flipped / "weights.bin").read_bytes())
    data[500] ^= 1
    (flipped / "weights.bin").write_bytes(bytes(data))
    cut = _build(c, "baselines", "cut", b"d" * 1000)
    (cut / "weights.bin").write_bytes(b"d" * 10)
    older = _build(c, "teachers", "older", b"e" * 1000)
    marker = json.loads((older / MARKER).read_text())
    marker["kd_version"] = "0.0.1"
    (older / MARKER).write_text(json.dumps(marker))
    (root / "teachers" / ".good2.tmp-123-abc").mkdir()
    (root / "teachers" / ".good2.tmp-123-abc" / "half.bin").write_bytes(b"z" * 300)
    (root / "generations" / "nomarker").mkdir(parents=True)
    (root / "generations" / "nomarker" / "x.pt").write_bytes(b"1")
    _verified.clear()  # a fresh process: nothing verified yet
    return root


def _statuses(root: Path, checksums: bool) -> dict[str, str]:
    return {f"{e.kind}/{e.name}": e.status for e in entries(root, checksums=checksums)}


def test_list_names_every_entry_with_its_size_date_builder_and_status(cache, capsys):
    assert main(["--root", str(cache)]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[1]: line for line in out.splitlines()[1:] if line.split()[:1] in (["teachers"], ["baselines"],
                                                                                             ["generations"])}
    assert set(lines) == {"good", "old", "flipped", "cut", "older", "good2", "nomarker"}
    size = sum(p.stat().st_size for p in (cache / "teachers" / "good").rglob("*") if p.is_file())
    assert 1010 < size < 2048  # the payload and the marker
    assert f" {size / 1024:.1f} KB " in lines["good"] and " ok " in lines["good"] and "teacher: kd " in lines["good"]
    assert time.strftime("%Y-%m-%d", time.localtime(time.time() - 40 * 86400)) in lines["old"]
    assert " stale " in lines["older"] and " partial " in lines["good2"]
    assert " broken " in lines["cut"] and " broken " in lines["nomarker"]
    assert " ok " in lines["flipped"]  # list checks sizes only; verify reads the bytes
    assert "in 7 entries under" in out and "3 ok, 1 stale, 2 broken, 1 partial" in out


def test_verify_reads_every_byte_and_names_the_broken_entries(cache, capsys):
    assert main(["verify", "--root", str(cache)]) == 1
    captured = capsys.readouterr()
    assert f"broken: {cache / 'teachers' / 'flipped'}: its file weights.bin does not match its checksum" in captured.out
    assert f"broken: {cache / 'baselines' / 'cut'}: its file weights.bin is truncated" in captured.out
    assert f"broken: {cache / 'generations' / 'nomarker'}: it has no completeness marker" in captured.out
    assert "4 broken entries; kd cache remove --broken removes them" in captured.err
    assert _statuses(cache, checksums=True)["teachers/good"] == "ok"


def test_remove_by_staleness_brokenness_kind_and_age(cache, capsys):
    assert main(["remove", "--stale", "--root", str(cache)]) == 0
    assert not (cache / "teachers" / "older").exists() and (cache / "teachers" / "good").is_dir()
    assert main(["remove", "--broken", "--dry-run", "--root", str(cache)]) == 0
    assert (cache / "teachers" / "flipped").exists()
    assert "would free" in capsys.readouterr().out
    assert main(["remove", "--broken", "--root", str(cache)]) == 0
    assert sorted(_statuses(cache, checksums=True)) == ["baselines/old", "teachers/good"]
    assert main(["remove", "--kind", "baselines", "--older-than", "30", "--root", str(cache)]) == 0
    assert sorted(_statuses(cache, checksums=True)) == ["teachers/good"]
    assert main(["remove", "--kind", "teachers", "--older-than", "30", "--root", str(cache)]) == 0
    assert sorted(_statuses(cache, checksums=True)) == ["teachers/good"]  # built today: kept
    assert "freed 0 B in 0 entries" in capsys.readouterr().out
    # a kept entry is still served by the cache
    assert Cache(cache).lookup("teachers", "good") == cache / "teachers" / "good"


def test_a_build_in_progress_is_shown_and_never_removed(cache, capsys):
    import fcntl

    lock = cache / ".locks" / "teachers-good2.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert _statuses(cache, checksums=False)["teachers/good2"] == "building"
        assert main(["remove", "--broken", "--root", str(cache)]) == 0
        assert (cache / "teachers" / ".good2.tmp-123-abc").is_dir()
    finally:
        os.close(fd)


def test_kd_cache_through_the_console_script_and_its_refusals(cache, monkeypatch, capsys):
    from kd.cli import main as kd_main

    monkeypatch.setenv("KD_CACHE_DIR", str(cache))
    monkeypatch.setattr(sys, "argv", ["kd", "cache", "remove"])
    with pytest.raises(SystemExit) as done:
        kd_main()
    assert done.value.code == 2
    assert "remove needs a choice of entries; pass --kind, --older-than, --stale or --broken" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["kd", "cache"])
    with pytest.raises(SystemExit) as done:
        kd_main()
    assert done.value.code == 0 and "in 7 entries under " + str(cache) in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["kd", "cache", "--root", str(cache / "nowhere")])
    with pytest.raises(SystemExit) as done:
        kd_main()
    assert done.value.code == 2 and "is not a directory; pass --root" in capsys.readouterr().err
