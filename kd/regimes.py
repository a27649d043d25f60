"""Data regimes: whose sequences a training step learns from.

A regime is chosen with the ``regime/`` config group and held by the recipe, which calls
``prepare(teacher, datamodule)`` once when training starts and ``batch(student, batch,
datamodule)`` on every training batch. Regimes never see the recipe: generative ones use
the datamodule through the narrow :class:`PromptData` interface (tokenizer, prompts,
references, ``replace_responses``) and sample with one :class:`kd.generation.Sampling`.

* :class:`Offline`: the dataset's own responses (the default).
* :class:`TeacherGenerated`: the teacher's responses to the training prompts, generated
  once before training (sampling, or the K-best by repeated sampling) and cached on disk,
  in :mod:`kd.cache` keyed by a hash of the teacher's weights, the prompts, the tokenizer,
  the sampling settings and (for Seq-Inter) the references, so later runs and sweep jobs
  reuse them; stale, foreign or half-written entries are rebuilt, never used. Sequence-level KD (Kim & Rush 2016) trains on these.
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
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from kd import ConfigError
from kd.cache import Cache
from kd.cache import key as cache_key
from kd.data import IGNORE_INDEX
from kd.generation import Sampling, generate

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


# ----------------------------------------------------------------------------- the data interface


@runtime_checkable
class PromptData(Protocol):
    """What a generative regime needs of a datamodule (:class:`kd.data.lm.LMDataModule`
    has it): the tokenizer, the default generation budget, the training prompts and their
    references, and a way to replace the training responses."""

    tokenizer: Any
    max_new_tokens: int

    def prompts(self, split: str = "train") -> list[list[int]]:
        """The split's prompts as token ids (chat template applied), in dataset order."""

    def references(self, split: str = "train") -> list[str]:
        """The split's dataset responses as text, in the same order."""

    def replace_responses(self, split: str, responses: Sequence[Sequence[int] | None]) -> int:
        """Train on ``responses`` (token ids, one per example; None or empty keeps the
        dataset's) from now on; returns how many were replaced."""


# ----------------------------------------------------------------------------- regimes


class Regime:
    """Base: the dataset's own batches (offline).

    The recipe calls :meth:`validate` when it is built, :meth:`prepare` once when training
    starts (models on their device) and :meth:`batch` on every training batch. A regime
    sees the teacher or the student and the datamodule (:class:`PromptData` for generative
    regimes), never the recipe.
    """

    name = "offline"
    #: regimes that generate text need token data (:class:`PromptData`)
    generative = False
    #: regimes whose sequences one teacher generates (they need a single teacher in its own tokens)
    uses_teacher = False

    def validate(self, data: Any) -> None:
        """Refuse a datamodule this regime cannot work with (called before any training)."""
        if self.generative and not isinstance(data, PromptData):
            raise ConfigError(
                f"regime={self.name} generates text and needs a language-model datamodule (data=task, data=jsonl, ...); "
                "use regime=offline with classification data"
            )

    def prepare(self, teacher: nn.Module | None, data: Any) -> None:
        """Called once when training starts (the teacher and student are on their device)."""

    def batch(self, student: nn.Module, batch: dict[str, Tensor], data: Any) -> dict[str, Tensor]:
        """The batch a training step learns from."""
        return batch

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue the same schedule (saved in checkpoints)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


class Offline(Regime):
    """Train on the dataset's responses."""


class TeacherGenerated(Regime):
    """The teacher's responses to every training prompt, generated once and cached.

    Args:
        cache_dir: root of the cache (``paths.cache_dir``; entries under ``generations/``).
        sampling: how the teacher samples (:class:`kd.generation.Sampling`; temperature 0
            is greedy).
        num_candidates: samples per prompt (K).
        select: ``"first"`` (Seq-KD) or ``"closest_to_reference"`` (Seq-Inter: highest
            sentence BLEU against the dataset response).
        batch_size: prompts per generation batch.
        seed: seed of the sampling generator.
    """

    name = "teacher_generated"
    generative = True
    uses_teacher = True

    def __init__(self, cache_dir: str = "~/.cache/kd", sampling: Sampling | Any = None, num_candidates: int = 1,
                 select: str = "first", batch_size: int = 128, seed: int = 0) -> None:
        if select not in ("first", "closest_to_reference"):
            raise ConfigError(f"regime.select must be 'first' or 'closest_to_reference' (got {select!r})")
        if num_candidates < 1:
            raise ConfigError(f"regime.num_candidates must be >= 1 (got {num_candidates})")
        if batch_size < 1:
            raise ConfigError(f"regime.batch_size must be >= 1 (got {batch_size})")
        self.cache = Cache(cache_dir)
        self.sampling = Sampling.of(sampling)
        self.num_candidates, self.select, self.batch_size, self.seed = num_candidates, select, batch_size, seed
        self.path: Path | None = None

    def key(self, teacher: nn.Module, data: PromptData) -> str:
        """Hash of exactly what shapes the generations: the teacher's weights, the training
        prompts, the tokenizer, the sampling settings and budget, K and the seed, and, when
        the selection reads them, the references."""
        prompts = hashlib.sha256(json.dumps(data.prompts("train")).encode()).hexdigest()
        references = data.references("train") if self.select == "closest_to_reference" else None
        return cache_key(weights_fingerprint(teacher), prompts, sorted(data.tokenizer.get_vocab().items()),
                         vars(self.sampling), data.max_new_tokens, self.num_candidates, self.select, self.seed,
                         references, length=20)

    def generate_responses(self, teacher: nn.Module, data: PromptData) -> list[list[int]]:
        """One teacher response per training prompt (token ids, EOS included when emitted)."""
        from kd.data.lm import collate_prompts

        prompts, references = data.prompts("train"), data.references("train")
        tok = data.tokenizer
        config = self.sampling.config(tok, data.max_new_tokens)
        device = next(teacher.parameters()).device
        generator = torch.Generator(device=device).manual_seed(self.seed)
        chosen: list[list[int]] = []
        for start in range(0, len(prompts), self.batch_size):
            items = [{"prompt_ids": p} for p in prompts[start : start + self.batch_size]]
            batch = collate_prompts(items, tok.pad_token_id)
            candidates: list[list[list[int]]] = [[] for _ in items]
            for _ in range(self.num_candidates):
                out = generate(teacher, batch["prompt_ids"].to(device), batch["prompt_mask"].to(device), config,
                               generator=generator)
                for row, (tokens, keep) in enumerate(zip(out.responses, out.response_mask)):
                    candidates[row].append(tokens[keep].tolist())
            for row, cands in enumerate(candidates):
                if self.select == "first" or len(cands) == 1:
                    chosen.append(cands[0])
                else:
                    texts = [tok.decode(c, skip_special_tokens=True) for c in cands]
                    chosen.append(cands[closest_to_reference(texts, references[start + row])])
            if (start // self.batch_size) % 20 == 0:
                log.info("teacher generation: %d / %d prompts", min(start + self.batch_size, len(prompts)), len(prompts))
        return chosen

    def prepare(self, teacher: nn.Module | None, data: Any) -> None:
        self.validate(data)
        if teacher is None:
            raise ConfigError(f"regime={self.name} needs a teacher; choose one with teacher=<config>")
        count, vocab = len(data.prompts("train")), len(data.tokenizer)

        def build(directory: Path) -> dict[str, Any]:
            log.info("generating teacher responses for %d training prompts", count)
            torch.save(self.generate_responses(teacher, data), directory / "responses.pt")
            return {"count": count, "sampling": vars(self.sampling), "num_candidates": self.num_candidates,
                    "select": self.select, "seed": self.seed}

        def validate(directory: Path) -> None:
            responses = torch.load(directory / "responses.pt", weights_only=True)
            if len(responses) != count:
                raise ValueError(f"it holds {len(responses)} responses for {count} prompts")
            if any(t >= vocab or t < 0 for r in responses for t in r):
                raise ValueError("it holds ids outside the tokenizer")

        self.path = self.cache.get_or_build("generations", self.key(teacher, data), build, validate,
                                            what="teacher responses")
        responses = torch.load(self.path / "responses.pt", weights_only=True)
        replaced = data.replace_responses("train", responses)
        if replaced < count:
            log.warning("%d teacher responses were empty; those examples keep their dataset response", count - replaced)


class OnPolicy(Regime):
    """The student's own samples for each batch's prompts (no gradient through sampling).

    Args:
        sampling: how the student samples (GKD: temperature 1; TRL: 0.9).
    """

    name = "on_policy"
    generative = True

    def __init__(self, sampling: Sampling | Any = None) -> None:
        self.sampling = Sampling.of(sampling)

    def sample(self, student: nn.Module, batch: dict[str, Tensor], data: PromptData) -> dict[str, Tensor]:
        config = self.sampling.config(data.tokenizer, data.max_new_tokens)
        out = generate(student, batch["prompt_ids"], batch["prompt_mask"], config)
        joined = join_prompts_and_responses(batch["prompt_ids"], batch["prompt_mask"], out.responses,
                                            out.response_mask, config.pad_token_id)
        # per-row facts carry over: the prompts in a cross-tokenizer teacher's tokens, the routed teacher
        joined.update({k: batch[k] for k in ("teacher_prompt_ids", "teacher_prompt_mask", "teacher_index", "index")
                       if k in batch})
        return joined

    def batch(self, student: nn.Module, batch: dict[str, Tensor], data: Any) -> dict[str, Tensor]:
        return self.sample(student, batch, data)


class Mixed(OnPolicy):
    """On-policy with probability ``lmbda`` per batch, else off-policy: dataset responses,
    or the teacher's cached responses with ``seq_kd=True`` (GKD's student-data fraction).

    Args:
        lmbda: probability in [0, 1] that a batch is replaced by student samples.
        seq_kd: off-policy batches use teacher-generated responses.
        seed: seed of the coin flips (reproducible schedules; the coin's state is saved in
            checkpoints, so a resumed run continues the same schedule).
        cache_dir: generation cache for ``seq_kd``.
        sampling: how the student (and, with ``seq_kd``, the teacher) samples.
        teacher_generated: further :class:`TeacherGenerated` settings for ``seq_kd``
            (``num_candidates``, ``select``, ``batch_size``, ``seed``).
    """

    name = "mixed"

    def __init__(self, lmbda: float = 0.5, seq_kd: bool = False, seed: int = 0, cache_dir: str = "~/.cache/kd",
                 sampling: Sampling | Any = None, teacher_generated: dict[str, Any] | Any = None) -> None:
        if not 0.0 <= lmbda <= 1.0:
            raise ConfigError(f"regime.lmbda must be in [0, 1] (got {lmbda}); it is the share of on-policy batches")
        super().__init__(sampling)
        self.lmbda = lmbda
        extra = dict(teacher_generated or {})
        self.teacher_data = TeacherGenerated(cache_dir, self.sampling, **extra) if seq_kd else None
        self.uses_teacher = seq_kd
        self.rng = torch.Generator().manual_seed(seed)
        self.on_policy_batches = 0
        self.batches = 0

    def prepare(self, teacher: nn.Module | None, data: Any) -> None:
        if self.teacher_data is not None:
            self.teacher_data.prepare(teacher, data)

    def batch(self, student: nn.Module, batch: dict[str, Tensor], data: Any) -> dict[str, Tensor]:
        self.batches += 1
        if torch.rand((), generator=self.rng).item() < self.lmbda:
            self.on_policy_batches += 1
            return self.sample(student, batch, data)
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.get_state(), "batches": self.batches, "on_policy_batches": self.on_policy_batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.rng.set_state(state["rng"])
            self.batches, self.on_policy_batches = state["batches"], state["on_policy_batches"]


__all__ = ["PromptData", "Regime", "Offline", "TeacherGenerated", "OnPolicy", "Mixed", "join_prompts_and_responses",
           "sentence_bleu", "closest_to_reference", "weights_fingerprint"]
