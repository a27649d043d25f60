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
* :class:`TeacherLogits`: the dataset's responses, with the teacher's distribution at
  every response position read from a top-k logit cache (DistillKit-style offline signal,
  RECIPES.md section 8) instead of a teacher forward: one teacher pass over the training
  split, in dataset order, before training stores per position the ``k`` most likely ids
  and their log-probabilities at the loss temperature, ``log_softmax(z / T)`` over the
  tokenizer's vocabulary (logits cut to it as the recipes cut them). Each training batch
  then carries ``teacher_topk``, a :class:`kd.divergences.TopK` with ``(B, L-1, k)`` ids
  and log-probabilities aligned with the recipe's shifted positions (filler at positions
  outside the responses, which the mask drops), and the recipe runs no teacher
  (:meth:`kd.recipe.DistillationRecipe.teacher_outputs`); divergences compare ``k + 1``
  bins, the last one the mass outside the top k (``tail=False``: renormalised top-k, a
  weaker loss). ``k = V`` is the live teacher exactly (up to the storage dtype).
  Classifier data works too: its "position" is the example.

The logit cache's format (version :data:`LOGIT_CACHE_FORMAT`), an entry ``logits/top<k>-<hash>``
of :mod:`kd.cache`: ``ids.npy`` ``(N, k)`` uint16 when the vocabulary has at most 65,536
tokens, else uint32; ``logprobs.npy`` ``(N, k)`` float16 (or float32), descending per
row; ``offsets.npy`` ``(E + 1,)`` int64, example ``i``'s response positions being rows
``offsets[i]:offsets[i+1]`` in order (N positions, E training examples). The arrays are
memory-mapped (``numpy.load(mmap_mode="r")``): a batch reads only its own rows. The key
hashes the teacher's weights (:func:`weights_fingerprint`), the tokenized training split,
the vocabulary size, ``top_k``, the temperature, the log-prob dtype and the format
version; bytes per token (ids + log-probs + offsets, at k = 64 about 256) are logged.

Token batches carry both the right-padded training view (``input_ids``,
``attention_mask``, ``labels``) and the left-padded prompts (``prompt_ids``,
``prompt_mask``) that generation needs (:mod:`kd.data.lm`).

Deviations: Kim & Rush generate Seq-KD targets with beam search (K=5); our generator
samples (LLM-era practice; ``temperature: 0`` gives greedy decoding, beam size 1), and the
K-best list of Seq-Inter is K independent samples rather than a beam. The logit cache is
computed in the teacher's own dtype outside the trainer's autocast (a live teacher under
``precision=bf16-mixed`` runs in bf16) and stores fp16 log-probabilities (about 3
significant digits); DistillKit stores logits, we store log-probabilities at the loss
temperature so the tail mass needs no normaliser. A classifier's rows are found by a hash
of their inputs (the teacher's output depends on nothing else), so ``precision=16-true`` /
``bf16-true``, which cast the inputs, cannot use a classifier's cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

from kd import ConfigError
from kd.cache import Cache
from kd.cache import key as cache_key
from kd.data import IGNORE_INDEX, batch_targets
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
    #: regimes whose data one teacher makes (generated sequences, cached logits): they need a
    #: single teacher in the data's tokens
    uses_teacher = False

    def validate(self, data: Any) -> None:
        """Refuse a datamodule this regime cannot work with (called before any training)."""
        if self.generative and not isinstance(data, PromptData):
            raise ConfigError(
                f"regime={self.name} generates text and needs a language-model datamodule (data=task, data=jsonl, ...); "
                "use regime=offline with classification data"
            )

    def check_recipe(self, recipe: str, needs: Any, teacher: bool, routed: bool,
                     temperature: float | None) -> None:
        """Refuse a recipe this regime cannot serve (called by :func:`kd.build.build` before
        the recipe is built): its name (for messages), its :class:`kd.recipe.Needs`, whether
        the run has a teacher, whether its teachers are routed (``teachers:``) and the
        recipe's loss temperature (None when it has none). Rules that are not this regime's own
        (a recipe's regimes, one teacher where teachers are routed) are :func:`kd.checks.check_recipe`'s."""

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


# ----------------------------------------------------------------------------- teacher logit cache

#: version of the logit cache's on-disk layout (part of every key)
LOGIT_CACHE_FORMAT = 1

#: storage dtypes of the cached log-probabilities
LOGPROB_DTYPES = {"float16": np.float16, "float32": np.float32}


def _row_key(row: Tensor) -> bytes:
    """A classifier input's identity: a hash of its float32 bytes."""
    return hashlib.blake2b(row.detach().to("cpu", torch.float32).contiguous().numpy().tobytes(),
                           digest_size=16).digest()


class TeacherLogits(Regime):
    """Train on the dataset's data with the teacher's top-k log-probabilities read from a
    cache built once (see the module docstring for the format and the key).

    Args:
        cache_dir: root of the cache (``paths.cache_dir``; entries under ``logits/``).
        top_k: tokens (classes) kept per position; clipped to the vocabulary, and
            ``top_k >= V`` stores the full distribution.
        temperature: the loss temperature the log-probabilities are stored at; None takes
            the recipe's (``kd`` fills it from ``recipe.temperature``, else 1.0). A
            temperature other than the recipe's is refused.
        tail: divergences compare ``k + 1`` bins, the last the mass outside the top k
            (default); False renormalises both sides over the top k.
        logprob_dtype: ``"float16"`` (2 bytes a value) or ``"float32"``.
        batch_size: examples per teacher batch while the cache is built.
    """

    name = "teacher_logits"
    uses_teacher = True

    def __init__(self, cache_dir: str = "~/.cache/kd", top_k: int = 64, temperature: float | None = None,
                 tail: bool = True, logprob_dtype: str = "float16", batch_size: int = 64) -> None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ConfigError(f"regime.top_k must be a positive number of tokens (got {top_k!r})")
        if temperature is not None and not temperature > 0:
            raise ConfigError(f"regime.temperature must be > 0 or null (got {temperature})")
        if logprob_dtype not in LOGPROB_DTYPES:
            raise ConfigError(f"regime.logprob_dtype must be one of {sorted(LOGPROB_DTYPES)} (got {logprob_dtype!r})")
        if batch_size < 1:
            raise ConfigError(f"regime.batch_size must be >= 1 (got {batch_size})")
        self.cache = Cache(cache_dir)
        self.top_k, self.tail, self.logprob_dtype, self.batch_size = top_k, bool(tail), logprob_dtype, batch_size
        self.temperature = None if temperature is None else float(temperature)
        self.path: Path | None = None
        #: the memory-mapped arrays (after :meth:`prepare`)
        self.ids: np.ndarray | None = None
        self.logprobs: np.ndarray | None = None
        self.offsets: np.ndarray | None = None
        #: a classifier's training rows by their input (:func:`_row_key`)
        self.rows: dict[bytes, int] | None = None
        #: cache facts: positions, k, vocabulary, bytes per token, ...
        self.info: dict[str, Any] = {}
        #: seconds the last :meth:`prepare` took (building the cache, or finding it)
        self.prepare_seconds = 0.0
        #: whether the last :meth:`prepare` ran the teacher (built the cache)
        self.built = False

    # -- checks

    def validate(self, data: Any) -> None:
        kind = getattr(data, "kd_kind", None)
        if kind not in ("causal_lm", "classifier"):
            raise ConfigError(f"regime={self.name} caches the teacher once per training example of causal-LM or "
                              f"classification data, which {type(data).__name__} is not (masked-LM data draws new "
                              "masks every epoch); use regime=offline")

    def check_recipe(self, recipe: str, needs: Any, teacher: bool, routed: bool,
                     temperature: float | None) -> None:
        if not teacher:
            raise ConfigError(f"regime={self.name} caches a teacher's outputs but recipe {recipe} runs without one; "
                              "choose a teacher with teacher=<config> or use regime=offline")
        if needs.teacher_tokenizer == "own":
            raise ConfigError(f"recipe {recipe} distils a teacher with its own tokenizer, whose positions the logit "
                              "cache (kept in the data's tokens) cannot serve; use regime=offline")
        if needs.hidden_states:
            raise ConfigError(f"recipe {recipe} also distils the teacher's hidden states, which the logit cache does "
                              "not hold; use regime=offline")
        if temperature is not None and self.temperature is not None and not math.isclose(temperature,
                                                                                         self.temperature):
            raise ConfigError(f"regime.temperature={self.temperature:g} stores the teacher at another temperature "
                              f"than recipe {recipe}'s loss (T={temperature:g}); drop the regime.temperature "
                              "override, it follows recipe.temperature")
        if self.temperature is None:
            self.temperature = float(temperature) if temperature is not None else 1.0

    # -- the training split as the cache sees it

    @staticmethod
    def _split(data: Any) -> tuple[Any, Callable[[list], dict[str, Tensor]], np.ndarray, int | None]:
        """The training split, its collate function, each example's number of positions,
        and the vocabulary the teacher's logits are cut to (None: a classifier's)."""
        data.setup()
        split = data.splits["train"]
        if getattr(data, "kd_kind", None) == "causal_lm":
            from kd.data.lm import collate_train

            # labels are shifted (position i predicts token i+1): with an empty prompt (plain
            # text) the first response token has no position predicting it
            counts = np.array([len(response) - (not prompt) for prompt, response in split.encoded], dtype=np.int64)
            return split, partial(collate_train, pad_token_id=data.pad_token_id), counts, len(data.tokenizer)
        from torch.utils.data import default_collate

        return split, default_collate, np.ones(len(split), dtype=np.int64), None

    def _loader(self, split: Any, collate: Callable) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(split, batch_size=self.batch_size, shuffle=False, collate_fn=collate)

    def _data_fingerprint(self, data: Any, split: Any, collate: Callable) -> str:
        """Hash of the tokenized training split (a classifier's: its inputs, whose rows
        :attr:`rows` indexes on the way)."""
        h = hashlib.sha256()
        if getattr(data, "kd_kind", None) == "causal_lm":
            h.update(json.dumps(split.encoded).encode())
            return h.hexdigest()
        self.rows = {}
        position = 0
        for batch in self._loader(split, collate):
            inputs = batch["inputs"]
            h.update(f"{tuple(inputs.shape[1:])}:{inputs.dtype}".encode())
            for row in inputs:
                key = _row_key(row)
                h.update(key)
                self.rows.setdefault(key, position)  # identical inputs share the first one's row
                position += 1
        return h.hexdigest()

    def key(self, teacher: nn.Module, data: Any) -> str:
        """The cache entry's name: ``top<k>-`` and a hash of the teacher's weights, the
        tokenized training split, the vocabulary, top_k, the temperature, the log-prob
        dtype and the format version."""
        split, collate, _, vocab = self._split(data)
        return self._key(teacher, data, split, collate, vocab)

    def _key(self, teacher: nn.Module, data: Any, split: Any, collate: Callable, vocab: int | None) -> str:
        k = self.top_k if vocab is None else min(self.top_k, vocab)  # top_k >= V all store the full teacher
        digest = cache_key(LOGIT_CACHE_FORMAT, weights_fingerprint(teacher), getattr(data, "kd_kind", None),
                           self._data_fingerprint(data, split, collate), vocab, k, self._temperature,
                           self.logprob_dtype, length=20)
        return f"top{k}-{digest}"

    @property
    def _temperature(self) -> float:
        return 1.0 if self.temperature is None else self.temperature

    # -- building and reading the cache

    @staticmethod
    def _teacher_rows(teacher: nn.Module, batch: dict[str, Tensor], vocab: int | None) -> Tensor:
        """The teacher's logits ``(n, V)`` at the batch's positions that count, row-major
        (as :meth:`kd.recipe.DistillationRecipe.outputs` aligns and cuts them)."""
        _, mask = batch_targets(batch)
        if "input_ids" in batch:
            logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        else:
            logits = teacher(batch["inputs"])
            logits = getattr(logits, "logits", logits)
        if vocab is not None:
            if logits.shape[-1] < vocab:
                raise ConfigError(f"the teacher has {logits.shape[-1]} output logits but the tokenizer {vocab} tokens; "
                                  "give the teacher a vocabulary at least as large as the tokenizer's")
            logits = logits[..., :vocab]
        return logits[mask]

    @staticmethod
    def _ids_dtype(vocab: int) -> type:
        return np.uint16 if vocab <= 1 << 16 else np.uint32

    def _build(self, teacher: nn.Module, split: Any, collate: Callable, counts: np.ndarray, vocab: int | None,
               directory: Path) -> dict[str, Any]:
        """One teacher pass over the training split, in order, into ``directory``."""
        from rich.console import Console
        from rich.progress import Progress

        from kd.divergences import to_log_probs

        total = int(counts.sum())
        offsets = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        np.save(directory / "offsets.npy", offsets)
        device = next(iter(teacher.parameters()), torch.empty(0)).device
        store = LOGPROB_DTYPES[self.logprob_dtype]
        floor = float(np.finfo(store).min)  # -inf would turn 0 * log 0 into NaN downstream
        ids = logprobs = None
        width = k = 0
        cursor = 0
        log.info("building the teacher logit cache: %d training examples, %d positions, top-%d at T=%g",
                 len(counts), total, self.top_k, self._temperature)
        mode = teacher.training
        teacher.eval()
        try:
            console = Console(stderr=True)
            live = console.is_terminal or console.is_jupyter  # no bar in log files
            with torch.no_grad(), Progress(console=console, transient=True, disable=not live) as bar:
                task = bar.add_task("teacher logit cache", total=len(counts))
                for batch in self._loader(split, collate):
                    batch = {key: v.to(device) if torch.is_tensor(v) else v for key, v in batch.items()}
                    rows = self._teacher_rows(teacher, batch, vocab)
                    if ids is None:
                        width = rows.shape[-1]
                        k = min(self.top_k, width)
                        ids = np.lib.format.open_memmap(directory / "ids.npy", mode="w+",
                                                        dtype=self._ids_dtype(width), shape=(total, k))
                        logprobs = np.lib.format.open_memmap(directory / "logprobs.npy", mode="w+", dtype=store,
                                                             shape=(total, k))
                    values, index = torch.topk(to_log_probs(rows, self._temperature, dtype=torch.float32), k, dim=-1)
                    n = len(rows)
                    if cursor + n > total:
                        raise RuntimeError(f"the teacher pass found more than the {total} response positions the "
                                           "training split holds")
                    ids[cursor : cursor + n] = index.cpu().numpy()
                    logprobs[cursor : cursor + n] = values.clamp(min=floor).cpu().numpy()
                    cursor += n
                    bar.advance(task, len(next(iter(batch.values()))))
        finally:
            teacher.train(mode)
        if cursor != total:
            raise RuntimeError(f"the teacher pass found {cursor} response positions where the training split holds "
                               f"{total}")
        ids.flush()
        logprobs.flush()
        del ids, logprobs
        size = sum((directory / f).stat().st_size for f in ("ids.npy", "logprobs.npy", "offsets.npy"))
        return {"format": LOGIT_CACHE_FORMAT, "examples": len(counts), "positions": total, "k": k, "vocab": width,
                "temperature": self._temperature, "ids_dtype": np.dtype(self._ids_dtype(width)).name,
                "logprob_dtype": self.logprob_dtype, "bytes": size, "bytes_per_token": size / total}

    def _open(self, directory: Path, counts: np.ndarray, vocab: int | None) -> None:
        """Memory-map an entry's arrays, checking that they fit the training split
        (raises ValueError when they do not: :class:`kd.cache.Cache` then rebuilds it)."""
        from kd.cache import MARKER

        info = json.loads((directory / MARKER).read_text()).get("info", {})
        offsets = np.load(directory / "offsets.npy")
        ids = np.load(directory / "ids.npy", mmap_mode="r")
        logprobs = np.load(directory / "logprobs.npy", mmap_mode="r")
        k, width = info.get("k"), info.get("vocab")
        if info.get("format") != LOGIT_CACHE_FORMAT or not k or not width or (vocab is not None and width != vocab):
            raise ValueError("its facts do not describe this format and vocabulary")
        if offsets.shape != (len(counts) + 1,) or offsets[0] != 0 or not np.array_equal(np.diff(offsets), counts):
            raise ValueError("its offsets do not match the training split")
        if ids.shape != (offsets[-1], k) or logprobs.shape != ids.shape:
            raise ValueError(f"its arrays have shapes {ids.shape} and {logprobs.shape}, not ({offsets[-1]}, {k})")
        if ids.dtype != self._ids_dtype(width) or logprobs.dtype != LOGPROB_DTYPES[self.logprob_dtype]:
            raise ValueError(f"its arrays are {ids.dtype} and {logprobs.dtype}")
        for block in (ids[:4096], ids[-4096:]):  # large entries are checked by size only (kd.cache)
            if block.size and int(block.max()) >= width:
                raise ValueError("it holds ids outside the vocabulary")
        self.ids, self.logprobs, self.offsets = ids, logprobs, offsets

    def prepare(self, teacher: nn.Module | None, data: Any) -> None:
        self.validate(data)
        if teacher is None:
            raise ConfigError(f"regime={self.name} needs a teacher; choose one with teacher=<config>")
        started = time.perf_counter()
        self.built = False
        split, collate, counts, vocab = self._split(data)
        name = self._key(teacher, data, split, collate, vocab)

        def build(directory: Path) -> dict[str, Any]:
            self.built = True
            return self._build(teacher, split, collate, counts, vocab, directory)

        self.path = self.cache.get_or_build("logits", name, build, lambda d: self._open(d, counts, vocab),
                                            what="teacher logit cache")
        self._open(self.path, counts, vocab)
        self.info = self.cache.meta("logits", name)
        self.prepare_seconds = time.perf_counter() - started
        info = self.info
        log.info("teacher logit cache %s: %d positions of %d examples, top-%d of %d at T=%g, %.1f bytes per token "
                 "(ids %s, log-probs %s, offsets)", self.path, info["positions"], info["examples"], info["k"],
                 info["vocab"], info["temperature"], info["bytes_per_token"], info["ids_dtype"], info["logprob_dtype"])

    @property
    def bytes_per_token(self) -> float:
        """The cache's bytes per cached position (after :meth:`prepare`)."""
        return float(self.info["bytes_per_token"])

    def batch(self, student: nn.Module, batch: dict[str, Tensor], data: Any) -> dict[str, Tensor]:
        from kd.divergences import TopK

        if self.ids is None or self.offsets is None or self.logprobs is None:
            raise RuntimeError(f"regime={self.name} gives batches only after prepare() built or found its cache")
        _, mask = batch_targets(batch)
        if "input_ids" in batch:
            if "index" not in batch:
                raise ConfigError(f"regime={self.name} looks training rows up by their example index, which these "
                                  "batches lack; use kd.data.lm.LMDataModule (its batches carry 'index')")
            index = np.asarray(batch["index"].tolist(), dtype=np.int64)
            counts = mask.sum(-1).cpu().numpy()
        else:
            inputs = batch["inputs"]
            rows_of = self.rows or {}
            index = np.asarray([rows_of.get(_row_key(row), -1) for row in inputs.cpu()], dtype=np.int64)
            counts = np.ones(len(index), dtype=np.int64)
        if (index < 0).any() or (index >= len(self.offsets) - 1).any():
            raise RuntimeError(f"a training row is not in the teacher logit cache {self.path} (rows of another "
                               "split, or classifier inputs cast by precision=16-true/bf16-true)")
        starts, ends = self.offsets[index], self.offsets[index + 1]
        if not np.array_equal(ends - starts, counts):
            raise RuntimeError(f"the teacher logit cache {self.path} holds other response lengths than this batch; "
                               "delete that directory to rebuild it")
        rows = np.concatenate([np.arange(a, b) for a, b in zip(starts, ends)])
        device = mask.device
        k = self.ids.shape[1]
        shape = (*mask.shape, k)
        ids = torch.arange(k, device=device).expand(shape).clone()  # filler outside the mask: uniform over k ids
        logprobs = torch.full(shape, -math.log(k), device=device)
        ids[mask] = torch.from_numpy(self.ids[rows].astype(np.int64)).to(device)
        logprobs[mask] = torch.from_numpy(self.logprobs[rows].astype(np.float32)).to(device)
        return {**batch, "teacher_topk": TopK(ids, logprobs, self.tail)}


__all__ = ["PromptData", "Regime", "Offline", "TeacherGenerated", "OnPolicy", "Mixed", "TeacherLogits",
           "join_prompts_and_responses", "sentence_bleu", "closest_to_reference", "weights_fingerprint",
           "LOGIT_CACHE_FORMAT", "LOGPROB_DTYPES"]

