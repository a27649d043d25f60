"""Cache keys follow the contents of data files: an edited file (even one keeping its size
and modification time) trains a new teacher, baseline and tokenizer and regenerates the
teacher's responses and logits; an unchanged one is hashed once per process."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from omegaconf import open_dict

from tests.conftest import compose_cfg

#: a letter permutation: the rewritten file has other words but exactly as many bytes
ROT13 = str.maketrans("abcdefghijklmnopqrstuvwxyz", "nopqrstuvwxyzabcdefghijklm")


def _records(n: int = 64) -> list[dict[str, str]]:
    words = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "grass", "honey", "mango"]
    out = []
    for i in range(n):
        a, b = words[i % len(words)], words[(3 * i + 1) % len(words)]
        out.append({"prompt": f"join {a} {b}", "response": f"{b} {a}"})
    return out


def _write(path: Path, records: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _rewrite_keeping_size_and_time(path: Path, records: list[dict[str, str]]) -> None:
    """Rewrite ``path`` with ``records`` in ROT13 (other words, as many bytes) and give it back
    its modification time."""
    before = path.stat()
    _write(path, [{k: v.translate(ROT13) for k, v in r.items()} for r in records])
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


TINY_JSONL = ["data=jsonl", "data.vocab_size=300", "data.max_length=48", "data.batch_size=8",
              "data.eval_batch_size=16", "data.generation_eval_size=4", "data.max_new_tokens=4",
              "teacher=task_llama", "student=task_llama", "teacher.fit.max_epochs=1", "trainer.max_epochs=1",
              "student.hidden_size=32", "teacher.model.hidden_size=32", "teacher.model.num_layers=1",
              "trainer.enable_progress_bar=false", "logger=none"]


def _run(data: Path, root: Path, cache: Path) -> dict:
    from kd.runs import train

    cfg = compose_cfg([*TINY_JSONL, f"data.source.train={data}"], root)
    with open_dict(cfg):
        cfg.paths.cache_dir = str(cache)
    return train(cfg)


def _entries(cache: Path, kind: str) -> set[str]:
    folder = cache / kind
    return {p.name for p in folder.iterdir() if not p.name.startswith(".")} if folder.is_dir() else set()


def test_an_edited_data_file_trains_a_new_teacher_baseline_and_tokenizer(tmp_path):
    data, cache = tmp_path / "train.jsonl", tmp_path / "cache"
    _write(data, _records())
    first = _run(data, tmp_path / "one", cache)
    kinds = ("teachers", "baselines", "tokenizers")
    before = {kind: _entries(cache, kind) for kind in kinds}
    assert all(len(names) == 1 for names in before.values()), before

    _rewrite_keeping_size_and_time(data, _records())
    second = _run(data, tmp_path / "two", cache)
    after = {kind: _entries(cache, kind) for kind in kinds}
    for kind in kinds:  # a new entry of each kind beside the old one (not reused)
        assert len(after[kind]) == 2 and before[kind] < after[kind], (kind, before[kind], after[kind])
    assert second["teacher"] != first["teacher"]

    # the second run's table comes from the new data alone: the same as a run with an empty cache
    fresh = _run(data, tmp_path / "three", tmp_path / "fresh-cache")
    assert set(fresh["results"]) == set(second["results"])
    for row, metrics in fresh["results"].items():
        for name, value in metrics.items():
            assert second["results"][row][name] == pytest.approx(value, abs=1e-6), (row, name)


# ----------------------------------------------------------------------------- the fingerprint itself


def _same_size_and_time(path: Path, content: bytes) -> None:
    before = path.stat()
    assert len(content) == before.st_size
    path.write_bytes(content)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_a_file_fingerprint_is_its_content(tmp_path):
    from kd.cache import file_fingerprint, files_fingerprint

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_bytes(b"0123456789" * 100)
    b.write_bytes(b"0123456789" * 100)
    os.utime(b, ns=(0, 10**18))
    assert file_fingerprint(a) == file_fingerprint(b)  # same bytes: same fingerprint, whatever the name and time
    old = file_fingerprint(a)
    _same_size_and_time(a, b"0123456789" * 50 + b"X123456789" + b"0123456789" * 49)  # one byte, same size and mtime
    assert file_fingerprint(a) != old
    edited = file_fingerprint(a)
    os.utime(a, ns=(0, 10**18))  # a touch alone keeps it
    assert file_fingerprint(a) == edited
    assert file_fingerprint(tmp_path / "missing.jsonl") is None
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.json").write_text("[]")
    (tmp_path / "sub" / ".hidden").write_text("x")  # hidden files of a directory are left out
    assert files_fingerprint(tmp_path / "sub") == {str(tmp_path / "sub" / "d.json"): {"sha256": hashlib.sha256(
        b"[]").hexdigest()}}


def test_a_file_is_hashed_once_per_process_until_it_changes(tmp_path, monkeypatch):
    import kd.cache

    calls = []
    real = kd.cache.file_sha256
    monkeypatch.setattr(kd.cache, "file_sha256", lambda path: calls.append(path) or real(path))
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"abcdef" * 10)
    first = kd.cache.file_fingerprint(path)
    assert kd.cache.file_fingerprint(path) == first and len(calls) == 1  # memoised
    _same_size_and_time(path, b"abcdeg" * 10)
    assert kd.cache.file_fingerprint(path) != first and len(calls) == 2  # rehashed: its ctime moved


def test_a_large_file_is_fingerprinted_by_size_time_and_samples(tmp_path, monkeypatch):
    import kd.cache

    monkeypatch.setattr(kd.cache, "FULL_HASH_MAX", 100)
    monkeypatch.setattr(kd.cache, "SAMPLE", 10)
    path = tmp_path / "big.jsonl"
    content = bytearray(b"a" * 1000)
    path.write_bytes(bytes(content))
    first = kd.cache.file_fingerprint(path)
    assert set(first) == {"size", "mtime_ns", "sampled_sha256"}
    content[495] = ord("b")  # inside the middle sample (bytes 495..504)
    _same_size_and_time(path, bytes(content))
    assert kd.cache.file_fingerprint(path) != first
    os.utime(path, ns=(0, path.stat().st_mtime_ns + 1))  # an edit outside the samples shows in the time
    assert kd.cache.file_fingerprint(path)["mtime_ns"] != first["mtime_ns"]


# ----------------------------------------------------------------------------- the keys that use it


def test_the_run_key_follows_the_data_file_contents(tmp_path):
    from kd.subruns import run_key

    data = tmp_path / "train.jsonl"
    _write(data, _records())
    cfg = compose_cfg([*TINY_JSONL, f"data.source.train={data}"], tmp_path)
    key = run_key(cfg)
    os.utime(data, ns=(0, 10**18))
    assert run_key(cfg) == key  # the time alone is no change
    _rewrite_keeping_size_and_time(data, _records())
    assert run_key(cfg) != key


def test_the_data_files_of_a_config_are_found_without_loading(tmp_path):
    from kd.subruns import data_files

    data = tmp_path / "train.jsonl"
    _write(data, _records())
    assert data_files(compose_cfg([*TINY_JSONL, f"data.source.train={data}"], tmp_path).data) == [str(data)]
    assert data_files(compose_cfg(["data=task"], tmp_path).data) == []  # no files: its runs' keys are as before
    assert data_files(compose_cfg(["data=digits"], tmp_path).data) == []  # no source


def test_sources_fingerprint_the_files_they_read(tmp_path):
    from kd.data.sources import HFDatasetSource, JsonlSource, TextWindows

    data = tmp_path / "train.jsonl"
    _write(data, _records())
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("one two three four five six\nseven eight nine ten\n" * 5)
    sources = [JsonlSource(str(data)), HFDatasetSource("json", data_files={"train": str(data)}),
               HFDatasetSource("json", data_files=str(tmp_path / "*.jsonl")), TextWindows(str(corpus), words=3)]
    local = tmp_path / "local"
    local.mkdir()
    (local / "train.jsonl").write_text(data.read_text())
    sources.append(HFDatasetSource(str(local), data_files="train.jsonl"))
    before = [s.fingerprint() for s in sources]
    _rewrite_keeping_size_and_time(data, _records())
    _rewrite_keeping_size_and_time(local / "train.jsonl", _records())
    _same_size_and_time(corpus, corpus.read_bytes().replace(b"one", b"uno"))
    for source, old in zip(sources, before):
        assert source.fingerprint() != old, type(source).__name__
    assert HFDatasetSource(str(local), data_files="train.jsonl").files() == [str(local), str(local / "train.jsonl")]
    assert TextWindows("lee").files() == [] and HFDatasetSource("org/name").files() == []


def test_teacher_generation_and_logit_cache_keys_follow_the_data_file(tmp_path):
    """Both keys hash the tokenized training split (contents, not files): an edited file,
    same size and time, gives new keys."""
    import torch

    from kd.data.lm import LMDataModule
    from kd.data.sources import JsonlSource
    from kd.logit_cache import LogitCache
    from kd.models import tiny_causal_lm
    from kd.regimes import TeacherGenerated

    data = tmp_path / "train.jsonl"
    _write(data, _records())
    torch.manual_seed(0)
    teacher = tiny_causal_lm(vocab_size=300, hidden_size=16, num_layers=1, num_heads=2, max_position_embeddings=48)

    def keys() -> tuple[str, str]:
        dm = LMDataModule(JsonlSource(str(data)), vocab_size=300, max_length=48, cache_dir=str(tmp_path / "cache"))
        dm.setup()
        return (TeacherGenerated(cache_dir=str(tmp_path / "cache")).key(teacher, dm),
                LogitCache(cache_dir=str(tmp_path / "cache")).key(teacher, dm))

    before = keys()
    assert keys() == before
    _rewrite_keeping_size_and_time(data, _records())
    after = keys()
    assert after[0] != before[0] and after[1] != before[1]
