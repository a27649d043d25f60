"""Data regimes: whose sequences a training step learns from.

A regime is chosen with the ``regime/`` config group and held by the recipe, which calls
``prepare`` once when training starts and ``batch`` on every training batch:

* :class:`Offline`: the dataset's own responses (the default).
* :class:`TeacherGenerated`: the teacher's responses to the training prompts, generated
  once before training (sampling, or the K-best by repeated sampling) and cached on disk,
  keyed by a hash of the teacher's weights, the data, the tokenizer and the generation
  settings, so later runs and sweep jobs reuse them. A cache entry whose manifest does
  not match (stale, foreign) or whose file does not match its checksum (half-written) is
  rebuilt, never used. Sequence-level KD (Kim & Rush 2016) trains on these.
  ``select="closest_to_reference"`` keeps, of ``num_candidates`` samples, the one with
  the highest smoothed sentence BLEU against the reference (Seq-Inter).
* :class:`OnPolicy`: the student's own samples for the batch's prompts, drawn at every
  step without gradient (GKD with lmbda = 1).
* :class:`Mixed`: each batch is on-policy with probability ``lmbda``, else off-policy
  (dataset responses, or the teacher's with ``seq_kd=True``): GKD's student-data fraction.

Token batches carry both the right-padded training view (``input_ids``,
``attention_mask``, ``labels``) and the left-padded prompts (``prompt_ids``,
``prompt_mask``) that generation needs (:mod:`kd.data.lm`).

Deviation: Kim & Rush generate Seq-KD targets with beam search (K=5); our generator
samples (LLM-era practice; ``temperature: 0`` gives greedy decoding, beam size 1), and the
K-best list of Seq-Inter is K independent samples rather than a beam.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kd import ConfigError
from kd.data import IGNORE_INDEX
from kd.data.lm import collate_prompts
from kd.generation import GenerationConfig, generate

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- helpers


def join_prompts_and_responses(
    prompt_ids: Tensor, prompt_mask: Tensor, responses: Tensor, response_mask: Tensor, pad_token_id: int
) -> dict[str, Tensor]:
    """A right-padded training batch from left-padded prompts ``(B, P)`` and generated
    responses ``(B, N)`` (``response_mask`` marks the tokens that count): ``input_ids``,
    ``attention_mask``, ``labels`` (IGNORE_INDEX on prompt and padding), plus the prompts."""
    rows = []
    for p, pm, r, rm in zip(prompt_ids, prompt_mask.bool(), responses, response_mask.bool()):
        rows.append((p[pm], r[rm]))
    length = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long, device=prompt_ids.device)
    labels = torch.full_like(ids, IGNORE_INDEX)
    mask = torch.zeros_like(ids)
    for i, (p, r) in enumerate(rows):
        ids[i, : len(p)] = p
        ids[i, len(p) : len(p) + len(r)] = r
        labels[i, len(p) : len(p) + len(r)] = r
        mask[i, : len(p) + len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "prompt_ids": prompt_ids,
            "prompt_mask": prompt_mask}


def sentence_bleu(candidate: str, reference: str, max_n: int = 4) -> float:
    """Smoothed sentence BLEU of whitespace tokens (add-one smoothing of the n-gram
    precisions for n >= 2, Lin & Och 2004; brevity penalty). For references shorter than
    ``max_n`` words the order drops to their length; one-word strings reduce to unigram
    precision, i.e. word overlap."""
    cand, ref = candidate.split(), reference.split()
    if not cand or not ref:
        return float(cand == ref)
    order = min(max_n, len(ref), len(cand))
    log_precision = 0.0
    for n in range(1, order + 1):
        c = Counter(tuple(cand[i : i + n]) for i in range(len(cand) - n + 1))
        r = Counter(tuple(ref[i : i + n]) for i in range(len(ref) - n + 1))
        hits, total = sum(min(v, r[g]) for g, v in c.items()), sum(c.values())
        if n > 1:
            hits, total = hits + 1, total + 1
        if hits == 0:
            return 0.0
        log_precision += math.log(hits / total) / order
    brevity = min(0.0, 1 - len(ref) / len(cand))
    return math.exp(brevity + log_precision)


def closest_to_reference(candidates: Sequence[str], reference: str) -> int:
    """Index of the candidate with the highest sentence BLEU against ``reference`` (the
    first of equals), Seq-Inter's choice among the teacher's K candidates."""
    return max(range(len(candidates)), key=lambda k: (sentence_bleu(candidates[k], reference), -k))


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 over a model's parameter and buffer names, shapes, dtypes and bytes."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- regimes


class Regime:
    """Base: the dataset's own batches (offline)."""

    name = "offline"
    #: regimes that generate text need token data
    generative = False

    def validate(self, datamodule: Any) -> None:
        """Refuse a datamodule this regime cannot work with (called before any training)."""
        if self.generative and not hasattr(datamodule, "tokenizer"):
            raise ConfigError(
                f"regime={self.name} generates text and needs a language-model datamodule (data=task, data=jsonl, ...); "
                "use regime=offline with classification data"
            )

    def prepare(self, recipe: Any, datamodule: Any) -> None:
        """Called once when training starts (the teacher and student are on their device)."""

    def batch(self, recipe: Any, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The batch a training step learns from."""
        return batch


class Offline(Regime):
    """Train on the dataset's responses."""


def generation_config(datamodule: Any, settings: dict[str, Any]) -> GenerationConfig:
    """Sampling ``settings`` (temperature, top_k, top_p, max_new_tokens or None) completed
    with the datamodule's tokenizer (EOS, pad, true vocabulary) and default budget."""
    tok = datamodule.tokenizer
    return GenerationConfig(
        max_new_tokens=settings.get("max_new_tokens") or datamodule.max_new_tokens,
        temperature=settings["temperature"], top_k=settings["top_k"], top_p=settings["top_p"],
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, vocab_size=len(tok),
    )


class TeacherGenerated(Regime):
    """The teacher's responses to every training prompt, generated once and cached.

    Args:
        cache_dir: root of the generation cache (``paths.cache_dir``).
        temperature: sampling temperature (0 = greedy); top_k, top_p: filters.
        max_new_tokens: generation budget (None: the datamodule's).
        num_candidates: samples per prompt (K).
        select: ``"first"`` (Seq-KD) or ``"closest_to_reference"`` (Seq-Inter: highest
            sentence BLEU against the dataset response).
        batch_size: prompts per generation batch.
        seed: seed of the sampling generator.
    """

    name = "teacher_generated"
    generative = True

    def __init__(self, cache_dir: str = "~/.cache/kd", temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 max_new_tokens: int | None = None, num_candidates: int = 1, select: str = "first",
                 batch_size: int = 128, seed: int = 0) -> None:
        if select not in ("first", "closest_to_reference"):
            raise ConfigError(f"regime.select must be 'first' or 'closest_to_reference' (got {select!r})")
        if num_candidates < 1:
            raise ConfigError(f"regime.num_candidates must be >= 1 (got {num_candidates})")
        self.cache_dir = cache_dir
        self.settings = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "max_new_tokens": max_new_tokens,
                         "num_candidates": num_candidates, "select": select, "seed": seed}
        GenerationConfig(temperature=temperature, top_k=top_k, top_p=top_p)  # validates early
        self.batch_size = batch_size
        self.path: Path | None = None

    def key(self, teacher: nn.Module, datamodule: Any) -> str:
        split = datamodule.splits["train"]
        prompts = hashlib.sha256(json.dumps([p for p, _ in split.encoded]).encode()).hexdigest()
        blob = json.dumps({"teacher": weights_fingerprint(teacher), "prompts": prompts,
                           "tokenizer": sorted(datamodule.tokenizer.get_vocab().items()),
                           "settings": self.settings, "max_new": datamodule.max_new_tokens}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:20]

    def _load(self, directory: Path, key: str, n: int, vocab_size: int) -> list[list[int]] | None:
        manifest, data = directory / "manifest.json", directory / "responses.pt"
        if not manifest.is_file() or not data.is_file():
            return None
        try:
            meta = json.loads(manifest.read_text())
            if meta.get("key") != key or meta.get("count") != n:
                log.warning("generation cache %s is stale or foreign; rebuilding it", directory)
                return None
            if _file_sha256(data) != meta.get("sha256"):
                log.warning("generation cache %s does not match its checksum (half-written?); rebuilding it", directory)
                return None
            responses = torch.load(data, weights_only=True)
            if len(responses) != n or any(t >= vocab_size or t < 0 for r in responses for t in r):
                log.warning("generation cache %s holds ids outside the tokenizer; rebuilding it", directory)
                return None
            return responses
        except Exception as e:  # unreadable: rebuild
            log.warning("generation cache %s is unreadable (%s); rebuilding it", directory, e)
            return None

    def generate_responses(self, teacher: nn.Module, datamodule: Any) -> list[list[int]]:
        """One teacher response per training prompt (token ids, EOS included when emitted)."""
        split = datamodule.splits["train"]
        config = generation_config(datamodule, self.settings)
        device = next(teacher.parameters()).device
        generator = torch.Generator(device=device).manual_seed(self.settings["seed"])
        tok = datamodule.tokenizer
        chosen: list[list[int]] = []
        for start in range(0, len(split), self.batch_size):
            items = [split[i] for i in range(start, min(start + self.batch_size, len(split)))]
            prompts = collate_prompts(items, tok.pad_token_id)
            candidates: list[list[list[int]]] = [[] for _ in items]
            for _ in range(self.settings["num_candidates"]):
                out = generate(teacher, prompts["prompt_ids"].to(device), prompts["prompt_mask"].to(device), config,
                               generator=generator)
                for row, (tokens, keep) in enumerate(zip(out.responses, out.response_mask)):
                    candidates[row].append(tokens[keep].tolist())
            for row, cands in enumerate(candidates):
                if self.settings["select"] == "first" or len(cands) == 1:
                    chosen.append(cands[0])
                else:
                    texts = [tok.decode(c, skip_special_tokens=True) for c in cands]
                    chosen.append(cands[closest_to_reference(texts, split.examples[start + row].response)])
            if (start // self.batch_size) % 20 == 0:
                log.info("teacher generation: %d / %d prompts", min(start + self.batch_size, len(split)), len(split))
        return chosen

    def prepare(self, recipe: Any, datamodule: Any) -> None:
        self.validate(datamodule)
        if recipe.teacher is None:
            raise ConfigError("regime=teacher_generated needs a teacher; choose one with teacher=<config>")
        split = datamodule.splits["train"]
        key = self.key(recipe.teacher, datamodule)
        directory = Path(self.cache_dir).expanduser() / "generations" / key
        self.path = directory
        responses = self._load(directory, key, len(split), len(datamodule.tokenizer))
        if responses is None:
            log.info("generating teacher responses for %d training prompts (cached in %s)", len(split), directory)
            responses = self.generate_responses(recipe.teacher, datamodule)
            tmp = directory.parent / f".{key}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            torch.save(responses, tmp / "responses.pt")
            meta = {"key": key, "count": len(responses), "sha256": _file_sha256(tmp / "responses.pt"),
                    "settings": self.settings}
            (tmp / "manifest.json").write_text(json.dumps(meta, indent=2))
            shutil.rmtree(directory, ignore_errors=True)
            try:
                os.replace(tmp, directory)
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
        else:
            log.info("reusing cached teacher responses %s", directory)
        empty = 0
        for i, response in enumerate(responses):
            if not response:
                empty += 1
                continue
            split.encoded[i] = (split.encoded[i][0], list(response))
        if empty:
            log.warning("%d teacher responses were empty; those examples keep their dataset response", empty)


class OnPolicy(Regime):
    """The student's own samples for each batch's prompts (no gradient through sampling).

    Args:
        temperature: sampling temperature (GKD: 1.0; TRL: 0.9); top_k, top_p: filters.
        max_new_tokens: generation budget (None: the datamodule's).
    """

    name = "on_policy"
    generative = True

    def __init__(self, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 max_new_tokens: int | None = None) -> None:
        self.settings = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "max_new_tokens": max_new_tokens}
        GenerationConfig(temperature=temperature, top_k=top_k, top_p=top_p)

    def sample(self, recipe: Any, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        dm = recipe.trainer.datamodule
        config = generation_config(dm, self.settings)
        out = generate(recipe.student, batch["prompt_ids"], batch["prompt_mask"], config)
        joined = join_prompts_and_responses(batch["prompt_ids"], batch["prompt_mask"], out.responses,
                                            out.response_mask, config.pad_token_id)
        # a cross-tokenizer batch keeps the prompts in the teacher's tokens
        joined.update({k: batch[k] for k in ("teacher_prompt_ids", "teacher_prompt_mask") if k in batch})
        return joined

    def batch(self, recipe: Any, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return self.sample(recipe, batch)


class Mixed(OnPolicy):
    """On-policy with probability ``lmbda`` per batch, else off-policy: dataset responses,
    or the teacher's cached responses with ``seq_kd=True`` (GKD's student-data fraction).

    Args:
        lmbda: probability in [0, 1] that a batch is replaced by student samples.
        seq_kd: off-policy batches use teacher-generated responses.
        seed: seed of the coin flips (reproducible schedules).
        cache_dir: generation cache for ``seq_kd``.
        temperature, top_k, top_p, max_new_tokens: sampling settings (student and teacher).
    """

    name = "mixed"

    def __init__(self, lmbda: float = 0.5, seq_kd: bool = False, seed: int = 0, cache_dir: str = "~/.cache/kd",
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 max_new_tokens: int | None = None) -> None:
        if not 0.0 <= lmbda <= 1.0:
            raise ConfigError(f"regime.lmbda must be in [0, 1] (got {lmbda}); it is the share of on-policy batches")
        super().__init__(temperature, top_k, top_p, max_new_tokens)
        self.lmbda = lmbda
        self.teacher_data = TeacherGenerated(cache_dir, temperature, top_k, top_p, max_new_tokens) if seq_kd else None
        self.rng = torch.Generator().manual_seed(seed)
        self.on_policy_batches = 0
        self.batches = 0

    def prepare(self, recipe: Any, datamodule: Any) -> None:
        if self.teacher_data is not None:
            self.teacher_data.prepare(recipe, datamodule)

    def batch(self, recipe: Any, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        self.batches += 1
        if torch.rand((), generator=self.rng).item() < self.lmbda:
            self.on_policy_batches += 1
            return self.sample(recipe, batch)
        return batch


__all__ = ["Regime", "Offline", "TeacherGenerated", "OnPolicy", "Mixed", "join_prompts_and_responses", "generation_config",
           "sentence_bleu", "closest_to_reference",
           "weights_fingerprint"]
