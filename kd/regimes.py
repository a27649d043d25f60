"""Data regimes: whose sequences a training step learns from.

A regime is chosen with the ``regime/`` config group and held by the recipe, which calls
``prepare(teacher, datamodule)`` once when training starts and ``batch(student, batch,
datamodule)`` on every training batch. Regimes never see the recipe: generative ones use
the datamodule through the narrow :class:`PromptData` interface (tokenizer, prompts,
references, ``replace_responses``) and sample with one :class:`kd.generation.Sampling`.

* :class:`Offline`: the dataset's own responses (the default).
* :class:`TeacherGenerated`: the teacher's responses to the training prompts, generated
  once before training (sampling, or the K-best by repeated sampling; a served teacher's
  server samples them, :meth:`kd.served.ServedTeacher.sample`) and cached on disk,
  in :mod:`kd.cache` keyed by a hash of the teacher's weights, the prompts, the tokenizer,
  the sampling settings and (for Seq-Inter) the references, so later runs and sweep jobs
  reuse them; stale, foreign or half-written entries are rebuilt, never used. Sequence-level KD (Kim & Rush 2016) trains on these.
  ``select="closest_to_reference"`` keeps, of ``num_candidates`` samples, the one with
  the highest smoothed sentence BLEU against the reference (Seq-Inter).
* :class:`OnPolicy`: the student's own samples for the batch's prompts, drawn at every
  step without gradient (GKD with lmbda = 1), by kd's sampler or, with ``engine=vllm``, an
  in-process vLLM engine holding the student's weights (:mod:`kd.rollouts`); with
  ``overlap=True`` one step off policy (the next batch sampled while this one trains).
* :class:`Mixed`: each batch is on-policy with probability ``lmbda``, else off-policy
  (dataset responses, or the teacher's with ``seq_kd=True``): GKD's student-data fraction.
* :class:`Speculative`: speculative KD's interleaved samples (Xu et al. 2025): the student
  proposes each token, the teacher replaces those outside its top-K (:mod:`kd.speculative`);
  replaced tokens are marked in the batch (``replaced``).
* :class:`Adaptive`: DistiLLM's adaptive off-policy approach (Ko et al. 2024): the share of
  student-generated batches starts low and rises when the validation loss rises, and the
  student's samples are replayed from a buffer.
* :class:`TeacherLogits`: the dataset's responses, with the teacher's distribution at
  every response position read from a top-k logit cache (DistillKit-style offline signal,
  docs/spec.md section 8) instead of a teacher forward: one teacher pass over the training
  split, in dataset order, before training stores per position the ``k`` most likely ids
  and their log-probabilities at the loss temperature, ``log_softmax(z / T)`` over the
  tokenizer's vocabulary (logits cut to it as the recipes cut them). Each training batch
  then carries ``teacher_topk``, a :class:`kd.signals.TopK` with ``(B, L-1, k)`` ids
  and log-probabilities aligned with the recipe's shifted positions (filler at positions
  outside the responses, which the mask drops), and the recipe runs no teacher
  (:meth:`kd.recipe.DistillationRecipe.teacher_outputs`); divergences compare ``k + 1``
  bins, the last one the mass outside the top k (``tail=False``: renormalised top-k, a
  weaker loss). ``k = V`` is the live teacher exactly (up to the storage dtype).
  Classifier data works too: its "position" is the example (:mod:`kd.logit_cache`).

The logit cache itself (its on-disk format, its key, the teacher pass) is
:mod:`kd.logit_cache`; :class:`TeacherLogits` reads it.

Token batches carry both the right-padded training view (``input_ids``,
``attention_mask``, ``labels``) and the left-padded prompts (``prompt_ids``,
``prompt_mask``) that generation needs (:mod:`kd.data.lm`; :mod:`kd.batches` lists every
key). On-policy batches keep the data batch's per-row keys (:data:`kd.batches.ROW_KEYS`).

Deviations: Kim & Rush generate Seq-KD targets with beam search (K=5); our generator
samples (LLM-era practice; ``temperature: 0`` gives greedy decoding, beam size 1), and the
K-best list of Seq-Inter is K independent samples rather than a beam. The logit cache's
deviations are in :mod:`kd.logit_cache`.

Regimes built from Python without a ``cache_dir`` keep their caches under
:func:`kd.cache.default_cache_dir` (``$KD_CACHE_DIR``, else ``~/.cache/kd``), as ``kd``
runs do (``paths.cache_dir``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections import Counter, deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from kd import ConfigError, batches
from kd.batches import join_prompts_and_responses
from kd.cache import Cache
from kd.console import progress
from kd.cache import key as cache_key
from kd.data import IGNORE_INDEX
from kd.generation import Sampling, generate
from kd.logit_cache import LOGPROB_DTYPES, LogitCache, weights_fingerprint
from kd.rollouts import Rollouts

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- helpers


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
    #: the form of the teacher's signal its batches carry (:data:`kd.signals.SIGNAL_FORMS`;
    #: None: the live teacher's), refused for a loss that does not take it (:mod:`kd.checks`)
    teacher_signal: str | None = None

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

    #: regimes whose :meth:`prepare` takes the run's :class:`kd.teachers.Teachers` (one
    #: teacher or routed ones) instead of the single teacher
    routes_teachers = False

    def set_progress(self, step: int, total: int) -> None:
        """Told before every training batch: optimizer steps done and planned."""

    def on_validation(self, metrics: dict[str, float]) -> None:
        """Told after every validation of a training run (not the sanity check): the
        logged ``val/...`` values."""

    def metrics(self) -> dict[str, float]:
        """Numbers about the last :meth:`batch` that the training step logs as
        ``train/regime/<name>`` (the rollout engine's staleness and sync time,
        :mod:`kd.rollouts`; a regime's own counters). A subclass extends its parent's."""
        return {}

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
        cache_dir: root of the cache (``paths.cache_dir``; entries under ``generations/``);
            None: :func:`kd.cache.default_cache_dir`.
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

    def __init__(self, cache_dir: str | None = None, sampling: Sampling | Any = None, num_candidates: int = 1,
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
        prompts, references = data.prompts("train"), data.references("train")
        tok = data.tokenizer
        config = self.sampling.config(tok, data.max_new_tokens)
        if hasattr(teacher, "sample"):  # a served teacher (kd.served): the server samples, seeded per candidate
            drawn = [teacher.sample(prompts, config, seed=self.seed + 1_000_003 * c) for c in range(self.num_candidates)]
            if self.select == "first" or self.num_candidates == 1:
                return drawn[0]
            return [cands[closest_to_reference([tok.decode(c, skip_special_tokens=True) for c in cands], ref)]
                    for cands, ref in zip(zip(*drawn), references)]
        device = next(teacher.parameters()).device
        generator = torch.Generator(device=device).manual_seed(self.seed)
        chosen: list[list[int]] = []
        with progress("teacher generation", len(prompts), unit="prompts") as advance:
            for start in range(0, len(prompts), self.batch_size):
                chosen += self._generate_batch(teacher, tok, prompts, references, start, config, generator, device)
                advance(min(self.batch_size, len(prompts) - start))
                if (start // self.batch_size) % 20 == 0:
                    log.info("teacher generation: %d / %d prompts", min(start + self.batch_size, len(prompts)),
                             len(prompts))
        return chosen

    def _generate_batch(self, teacher: nn.Module, tok: Any, prompts: list, references: list, start: int,
                        config: Any, generator: torch.Generator, device: Any) -> list[list[int]]:
        """The chosen responses of the prompts from ``start`` on (one batch)."""
        from kd.data.lm import collate_prompts

        chosen: list[list[int]] = []
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
        engine: what samples: ``kd`` (kd's sampler) or ``vllm`` (an in-process vLLM engine,
            :mod:`kd.rollouts`).
        vllm: the vLLM engine's settings (:class:`kd.rollouts.VLLMSettings`: ``sync_every``,
            ``memory``, ...).
        overlap: one step off-policy (needs ``engine=vllm``): while step ``t`` trains, a
            background thread samples batch ``t``'s prompts with the weights of step ``t``
            (synced before the step's update), and step ``t + 1`` trains on those samples, so
            every batch is exactly one optimizer step stale (``train/regime/rollout_staleness`` adds
            it to the engine's ``sync_every`` staleness). The first step samples its batch
            twice: at once for itself and in the background for step 1; the samples of the
            last batch are never trained on, and a resumed run starts the pipeline anew.
    """

    name = "on_policy"
    generative = True

    def __init__(self, sampling: Sampling | Any = None, engine: str = "kd", vllm: Any = None,
                 overlap: bool = False) -> None:
        self.sampling = Sampling.of(sampling)
        self.rollouts = Rollouts(engine, vllm, where="regime")
        if overlap and engine != "vllm":
            raise ConfigError("regime.overlap=true samples the next batch on the vLLM engine while the student "
                              "trains (kd's sampler would read weights the optimizer is changing); set "
                              "regime.engine=vllm or regime.overlap=false")
        self.overlap = bool(overlap)
        self._pending: Any = None  # (future of the next step's batch, its staleness in optimizer steps)
        self._executor: Any = None
        self._staleness = 0

    def _join(self, batch: dict[str, Tensor], out: Any, pad: int) -> dict[str, Tensor]:
        joined = join_prompts_and_responses(batch["prompt_ids"], batch["prompt_mask"], out.responses,
                                            out.response_mask, pad)
        # per-row facts carry over: the prompts in a cross-tokenizer teacher's tokens, the routed teacher
        joined.update(batches.carried_rows(batch))
        return joined

    def sample(self, student: nn.Module, batch: dict[str, Tensor], data: PromptData) -> dict[str, Tensor]:
        config = self.sampling.config(data.tokenizer, data.max_new_tokens)
        out = self.rollouts.generate(student, batch["prompt_ids"], batch["prompt_mask"], config)
        self._staleness = self.rollouts.staleness
        return self._join(batch, out, config.pad_token_id)

    def _launch(self, student: nn.Module, batch: dict[str, Tensor], data: PromptData) -> None:
        from concurrent.futures import ThreadPoolExecutor

        config = self.sampling.config(data.tokenizer, data.max_new_tokens)
        run = self.rollouts.start(student, batch["prompt_ids"], batch["prompt_mask"], config)
        staleness = self.rollouts.staleness + 1  # trained one optimizer step after these weights
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kd-rollouts")
        self._pending = (self._executor.submit(lambda: self._join(batch, run(), config.pad_token_id)), staleness)

    def batch(self, student: nn.Module, batch: dict[str, Tensor], data: Any) -> dict[str, Tensor]:
        if not self.overlap:
            return self.sample(student, batch, data)
        if self._pending is None:  # the pipeline's first step: this batch now, its next samples in the background
            current = self.sample(student, batch, data)
        else:
            future, self._staleness = self._pending
            current = future.result()
        self._launch(student, batch, data)  # with this step's weights, before its update
        return current

    def metrics(self) -> dict[str, float]:
        out = self.rollouts.metrics()
        if out:
            out["rollout_staleness"] = float(self._staleness)
        return out

    def __getstate__(self) -> dict[str, Any]:  # a copy starts its own pipeline
        state = dict(self.__dict__)
        state["_pending"] = state["_executor"] = None
        return state


class Mixed(OnPolicy):
    """On-policy with probability ``lmbda`` per batch, else off-policy: dataset responses,
    or the teacher's cached responses with ``seq_kd=True`` (GKD's student-data fraction).

    Args:
        lmbda: probability in [0, 1] that a batch is replaced by student samples.
        seq_kd: off-policy batches use teacher-generated responses.
        seed: seed of the coin flips (reproducible schedules; the coin's state is saved in
            checkpoints, so a resumed run continues the same schedule).
        cache_dir: generation cache for ``seq_kd`` (None: :func:`kd.cache.default_cache_dir`).
        sampling: how the student (and, with ``seq_kd``, the teacher) samples.
        teacher_generated: further :class:`TeacherGenerated` settings for ``seq_kd``
            (``num_candidates``, ``select``, ``batch_size``, ``seed``).
        engine, vllm: what samples the student (:class:`OnPolicy`); the teacher's
            ``seq_kd`` responses are always kd's sampler's.
    """

    name = "mixed"

    def __init__(self, lmbda: float = 0.5, seq_kd: bool = False, seed: int = 0, cache_dir: str | None = None,
                 sampling: Sampling | Any = None, teacher_generated: dict[str, Any] | Any = None,
                 engine: str = "kd", vllm: Any = None) -> None:
        if not 0.0 <= lmbda <= 1.0:
            raise ConfigError(f"regime.lmbda must be in [0, 1] (got {lmbda}); it is the share of on-policy batches")
        super().__init__(sampling, engine, vllm)
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
        self.last_on_policy = False
        if torch.rand((), generator=self.rng).item() < self.lmbda:
            self.last_on_policy = True
            self.on_policy_batches += 1
            return self.sample(student, batch, data)
        return batch

    def metrics(self) -> dict[str, float]:
        return self.rollouts.metrics() if getattr(self, "last_on_policy", False) else {}

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.get_state(), "batches": self.batches, "on_policy_batches": self.on_policy_batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.rng.set_state(state["rng"])
            self.batches, self.on_policy_batches = state["batches"], state["on_policy_batches"]


# ----------------------------------------------------------------------------- speculative KD


class Speculative(OnPolicy):
    """Speculative KD (SKD; Xu et al., ICLR 2025): the student proposes every token and
    the teacher replaces the proposals that are not among its ``top_k`` with its own
    samples (:mod:`kd.speculative` states the algorithm and its deviations). Each batch is
    sampled afresh for the batch's prompts, with KV caches for the student and the teacher.

    The batch carries ``replaced`` (:data:`kd.batches.REPLACED`), ``(B, L)`` bool aligned
    with ``input_ids``: the teacher's tokens. Their share of the batch's response tokens
    is logged (``train/regime/replaced_share``; ``replaced_share_epoch`` is the epoch's
    mean over batches). Routed teachers verify their own rows; a row without a teacher
    keeps the student's proposals.

    Args:
        top_k: K of the verification (the paper's default 25); ``top_k >= V`` is on-policy
            sampling, ``top_k = 1`` with greedy sampling the teacher's greedy answer.
        sampling: how both models sample (:class:`kd.generation.Sampling`).
    """

    name = "speculative"
    routes_teachers = True

    def __init__(self, top_k: int = 25, sampling: Sampling | Any = None) -> None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ConfigError(f"regime.top_k must be a positive number of tokens (got {top_k!r}); the paper uses 25")
        super().__init__(sampling)
        self.top_k = top_k
        self.teachers: Any = None
        self.replaced_tokens = 0
        self.response_tokens = 0
        self._share = 0.0

    def check_recipe(self, recipe: str, needs: Any, teacher: bool, routed: bool,
                     temperature: float | None) -> None:
        if not teacher:
            raise ConfigError(f"regime={self.name} lets a teacher verify the student's tokens but recipe {recipe} "
                              "runs without one; choose a teacher with teacher=<config> or use regime=on_policy")
        if needs.teacher_tokenizer == "own":
            raise ConfigError(f"recipe {recipe} gives its teacher its own tokenizer, whose top-K cannot verify the "
                              "student's tokens; use regime=on_policy")

    def prepare(self, teacher: Any, data: Any) -> None:
        self.validate(data)
        if teacher is None:
            raise ConfigError(f"regime={self.name} needs a teacher; choose one with teacher=<config>")
        self.teachers = teacher

    def sample(self, student: nn.Module, batch: dict[str, Tensor], data: PromptData) -> dict[str, Tensor]:
        from kd.speculative import Interleave, teachers_and_route

        if self.teachers is None:
            raise RuntimeError("regime=speculative sampled before prepare() gave it the teacher")
        config = self.sampling.config(data.tokenizer, data.max_new_tokens)
        models, route = teachers_and_route(self.teachers, batch)
        out = generate(student, batch["prompt_ids"], batch["prompt_mask"], config,
                       mix=Interleave(models, self.top_k, route))
        joined = join_prompts_and_responses(batch["prompt_ids"], batch["prompt_mask"], out.responses,
                                            out.response_mask, config.pad_token_id)
        joined.update(batches.carried_rows(batch))
        replaced = torch.zeros_like(joined["input_ids"], dtype=torch.bool)
        swapped = out.replaced if out.replaced is not None else torch.zeros_like(out.response_mask)
        prompt_lengths = batch["prompt_mask"].sum(-1).tolist()
        for row, (start, keep) in enumerate(zip(prompt_lengths, out.response_mask)):
            flags = swapped[row][keep]
            replaced[row, start : start + len(flags)] = flags
        joined[batches.REPLACED] = replaced
        count, total = int(swapped[out.response_mask].sum()), int(out.response_mask.sum())
        self.replaced_tokens += count
        self.response_tokens += total
        self._share = count / max(total, 1)
        return joined

    def metrics(self) -> dict[str, float]:
        return {**super().metrics(), "replaced_share": self._share}

    def state_dict(self) -> dict[str, Any]:
        return {"replaced_tokens": self.replaced_tokens, "response_tokens": self.response_tokens}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.replaced_tokens, self.response_tokens = state["replaced_tokens"], state["response_tokens"]


# ----------------------------------------------------------------------------- DistiLLM's adaptive off-policy


class ReplayBuffer:
    """The student's samples kept for replay: at most ``capacity`` rows, the oldest dropped
    first. A row is its prompt and response token ids and the per-row facts the batch carried
    (``index``, ``teacher_index``, the teacher's privileged prompt)."""

    CARRIED = (batches.INDEX, batches.TEACHER_INDEX)

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.rows: deque[dict[str, Any]] = deque(maxlen=capacity)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def full(self) -> bool:
        return len(self.rows) >= self.capacity

    def add(self, batch: dict[str, Tensor]) -> None:
        """Keep every row of a sampled batch (prompts left-padded, labels the response)."""
        labels = batch["labels"]
        for r in range(len(labels)):
            row: dict[str, Any] = {
                "prompt": batch["prompt_ids"][r][batch["prompt_mask"][r].bool()].tolist(),
                "response": labels[r][labels[r] != IGNORE_INDEX].tolist(),
            }
            row.update({k: int(batch[k][r]) for k in self.CARRIED if k in batch})
            if batches.PRIVILEGED_PROMPT_IDS in batch:
                keep = batch[batches.PRIVILEGED_PROMPT_MASK][r].bool()
                row["privileged"] = batch[batches.PRIVILEGED_PROMPT_IDS][r][keep].tolist()
            self.rows.append(row)

    def sample(self, n: int, generator: torch.Generator, pad_token_id: int,
               device: torch.device | str | None = None) -> dict[str, Tensor]:
        """``min(n, len)`` rows drawn uniformly without replacement, as a training batch."""
        picks = torch.randperm(len(self.rows), generator=generator)[:n].tolist()
        rows = [self.rows[i] for i in picks]
        out = batches.join_rows([r["prompt"] for r in rows], [r["response"] for r in rows], pad_token_id, device)
        out[batches.PROMPT_IDS], out[batches.PROMPT_MASK] = batches.left_pad([r["prompt"] for r in rows],
                                                                             pad_token_id, device)
        for key in self.CARRIED:
            if all(key in r for r in rows):
                out[key] = torch.tensor([r[key] for r in rows], dtype=torch.long, device=device)
        if all("privileged" in r for r in rows):
            out[batches.PRIVILEGED_PROMPT_IDS], out[batches.PRIVILEGED_PROMPT_MASK] = batches.left_pad(
                [r["privileged"] for r in rows], pad_token_id, device)
        return out

    def state_dict(self) -> list[dict[str, Any]]:
        return list(self.rows)

    def load_state_dict(self, rows: list[dict[str, Any]]) -> None:
        self.rows = deque(rows, maxlen=self.capacity)


class Adaptive(OnPolicy):
    """DistiLLM's adaptive off-policy approach (Ko et al., ICML 2024, "DistiLLM: Towards
    Streamlined Distillation for Large Language Models", section 3.2 and Algorithm 1; the
    facts below also follow the official code, ``jongwooko/distillm``).

    Rule. The probability ``phi`` that a batch uses student-generated outputs (SGO) starts
    at ``init_prob`` (0 in the paper's scripts). After every validation, if the validation
    loss ``L`` rose by at least ``loss_eps`` over the reference ``L_ref``
    (``L >= L_ref + loss_eps``), ``phi <- min(phi + prob_step, 1)`` (``prob_step`` 0.1) and
    ``L_ref <- L``; otherwise nothing changes (the reference moves only when ``phi`` rises).
    For each training batch one uniform ``u`` is drawn (seeded):

    * ``u < phi * f(t)``, or ``u < phi`` while the buffer is not yet full: the student
      samples responses to the batch's prompts (as :class:`OnPolicy`), every row goes into
      the replay buffer (``capacity`` rows, the oldest dropped first), and the step trains
      on the fresh samples;
    * else ``u < phi``: the step trains on ``B`` rows drawn uniformly without replacement
      from the buffer (``B`` the batch's size);
    * else the dataset's batch (off-policy).

    ``f(t)`` is the share of SGO batches sampled afresh at training progress ``t`` (optimizer
    steps done / planned; 0 when the trainer plans no end), set by ``replay_ratio``: ``"decreasing"`` ``1 - t`` (DistiLLM's
    default: replays grow as training goes on), ``"constant"`` 0.5, ``"increasing"`` ``t``,
    or a number ``rho`` in [0, 1], the replayed share, ``f = 1 - rho``.

    Logged per batch (``train/regime/...``): ``student_prob`` (``phi``), ``buffer`` (rows
    kept), ``fresh`` and ``replayed`` (1 for a batch of that kind, so their epoch means,
    ``train/regime/fresh_epoch`` and ``replayed_epoch``, are the shares). ``phi``,
    ``L_ref``, the buffer and the generator are saved in checkpoints, so a resumed run
    continues the same schedule with the same buffer.

    Deviations: the official code evaluates before training and takes that loss as the first
    reference; here the first validation of the run is the reference (a validation before
    any step would cost a pass Lightning does not make). The loss is the one ``monitor``
    names among the logged validation values (default ``val/loss``, the student's
    cross-entropy on the validation responses); the paper's is its validation loss. The
    official buffer keeps the padded tensors; we keep token ids and re-pad.

    Args:
        init_prob: ``phi`` at the start, in [0, 1].
        loss_eps: the rise of the validation loss that raises ``phi`` (``>= 0``; 0.1).
        prob_step: how much ``phi`` rises (in (0, 1]; 0.1).
        capacity: rows the replay buffer keeps (``>= 1``; 1000).
        replay_ratio: ``"decreasing"``, ``"constant"``, ``"increasing"`` or a number in [0, 1].
        monitor: the validation value to follow (``val/<name>``).
        seed: seed of the per-batch draws and the replay sampling.
        sampling: how the student samples (:class:`kd.generation.Sampling`).
    """

    name = "adaptive"
    SCHEDULES = ("decreasing", "constant", "increasing")

    def __init__(self, init_prob: float = 0.0, loss_eps: float = 0.1, prob_step: float = 0.1, capacity: int = 1000,
                 replay_ratio: str | float = "decreasing", monitor: str = "val/loss", seed: int = 0,
                 sampling: Sampling | Any = None) -> None:
        if not 0.0 <= float(init_prob) <= 1.0:
            raise ConfigError(f"regime.init_prob must be in [0, 1] (got {init_prob}); it is the starting share of "
                              "student-generated batches")
        if not float(loss_eps) >= 0:
            raise ConfigError(f"regime.loss_eps must be >= 0 (got {loss_eps}); DistiLLM uses 0.1")
        if not 0.0 < float(prob_step) <= 1.0:
            raise ConfigError(f"regime.prob_step must be in (0, 1] (got {prob_step}); DistiLLM uses 0.1")
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ConfigError(f"regime.capacity must be a positive number of rows (got {capacity!r})")
        if isinstance(replay_ratio, str):
            if replay_ratio not in self.SCHEDULES:
                raise ConfigError(f"regime.replay_ratio must be one of {', '.join(self.SCHEDULES)} or a number in "
                                  f"[0, 1] (got {replay_ratio!r})")
        elif isinstance(replay_ratio, bool) or not 0.0 <= float(replay_ratio) <= 1.0:
            raise ConfigError(f"regime.replay_ratio must be a number in [0, 1] or one of {', '.join(self.SCHEDULES)} "
                              f"(got {replay_ratio!r})")
        if not str(monitor).startswith("val/"):
            raise ConfigError(f"regime.monitor must name a validation value such as val/loss (got {monitor!r})")
        super().__init__(sampling)
        self.prob, self.loss_eps, self.prob_step = float(init_prob), float(loss_eps), float(prob_step)
        self.replay_ratio, self.monitor = replay_ratio, str(monitor)
        self.reference: float | None = None
        self.rng = torch.Generator().manual_seed(seed)
        self.buffer = ReplayBuffer(capacity)
        self.progress = 0.0
        self.counts = {"fresh": 0, "replayed": 0, "dataset": 0}
        self.last = "dataset"

    def check_recipe(self, recipe: str, needs: Any, teacher: bool, routed: bool,
                     temperature: float | None) -> None:
        if needs.teacher_tokenizer == "own":
            raise ConfigError(f"recipe {recipe} gives its teacher its own tokenizer, whose prompts the replay buffer "
                              "does not keep; use regime=mixed")

    def fresh_share(self) -> float:
        """``f(t)``: the share of student-data batches sampled afresh now."""
        if self.replay_ratio == "decreasing":
            return 1.0 - self.progress
        if self.replay_ratio == "increasing":
            return self.progress
        if self.replay_ratio == "constant":
            return 0.5
        return 1.0 - float(self.replay_ratio)

    def set_progress(self, step: int, total: int) -> None:
        self.progress = min(max(step / total, 0.0), 1.0) if total > 0 else 0.0

    def on_validation(self, metrics: dict[str, float]) -> None:
        if self.monitor not in metrics:
            raise ConfigError(f"regime.monitor={self.monitor} is not among the validation values "
                              f"({', '.join(sorted(metrics)) or 'none'}); name one of them")
        loss = float(metrics[self.monitor])
        if self.reference is None:
            self.reference = loss
        elif loss >= self.reference + self.loss_eps:
            self.prob = min(self.prob + self.prob_step, 1.0)
            self.reference = loss

    def batch(self, student: nn.Module, batch: dict[str, Tensor], data: Any) -> dict[str, Tensor]:
        u = torch.rand((), generator=self.rng).item()
        if u < self.prob * self.fresh_share() or (u < self.prob and not self.buffer.full):
            self.last = "fresh"
            out = self.sample(student, batch, data)
            self.buffer.add(out)
        elif u < self.prob:
            self.last = "replayed"
            out = self.buffer.sample(len(batch["prompt_ids"]), self.rng, data.tokenizer.pad_token_id,
                                     batch["prompt_ids"].device)
        else:
            self.last, out = "dataset", batch
        self.counts[self.last] += 1
        return out

    def metrics(self) -> dict[str, float]:
        engine = super().metrics() if self.last == "fresh" else {}  # the rollout engine's, when it sampled
        return {**engine, "student_prob": self.prob, "buffer": float(len(self.buffer)),
                "fresh": float(self.last == "fresh"), "replayed": float(self.last == "replayed")}

    def state_dict(self) -> dict[str, Any]:
        return {"prob": self.prob, "reference": self.reference, "rng": self.rng.get_state(),
                "buffer": self.buffer.state_dict(), "counts": dict(self.counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.prob, self.reference = state["prob"], state["reference"]
            self.rng.set_state(state["rng"])
            self.buffer.load_state_dict(state["buffer"])
            self.counts = dict(state["counts"])


# ----------------------------------------------------------------------------- teacher logit cache


class TeacherLogits(Regime, LogitCache):
    """Train on the dataset's data with the teacher's top-k log-probabilities read from a
    cache built once (:class:`kd.logit_cache.LogitCache`: the format, the key, the pass).

    Args:
        cache_dir: root of the cache (``paths.cache_dir``; entries under ``logits/``); None:
            :func:`kd.cache.default_cache_dir`.
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
    teacher_signal = "topk"

    def __init__(self, cache_dir: str | None = None, top_k: int = 64, temperature: float | None = None,
                 tail: bool = True, logprob_dtype: str = "float16", batch_size: int = 64) -> None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ConfigError(f"regime.top_k must be a positive number of tokens (got {top_k!r})")
        if temperature is not None and not temperature > 0:
            raise ConfigError(f"regime.temperature must be > 0 or null (got {temperature})")
        if logprob_dtype not in LOGPROB_DTYPES:
            raise ConfigError(f"regime.logprob_dtype must be one of {sorted(LOGPROB_DTYPES)} (got {logprob_dtype!r})")
        if batch_size < 1:
            raise ConfigError(f"regime.batch_size must be >= 1 (got {batch_size})")
        LogitCache.__init__(self, cache_dir, top_k, temperature, tail, logprob_dtype, batch_size)
        #: seconds the last :meth:`prepare` took (building the cache, or finding it)
        self.prepare_seconds = 0.0

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

    def prepare(self, teacher: nn.Module | None, data: Any) -> None:
        self.validate(data)
        if teacher is None:
            raise ConfigError(f"regime={self.name} needs a teacher; choose one with teacher=<config>")
        started = time.perf_counter()
        self.load(teacher, data)
        self.prepare_seconds = time.perf_counter() - started
        info = self.info
        log.info("teacher logit cache %s: %d positions of %d examples, top-%d of %d at T=%g, %.1f bytes per token "
                 "(ids %s, log-probs %s, offsets)", self.path, info["positions"], info["examples"], info["k"],
                 info["vocab"], info["temperature"], info["bytes_per_token"], info["ids_dtype"], info["logprob_dtype"])

    def batch(self, student: nn.Module, batch: dict[str, Tensor], data: Any) -> dict[str, Tensor]:
        return {**batch, batches.TEACHER_TOPK: self.read(batch)}


__all__ = ["PromptData", "Regime", "Offline", "TeacherGenerated", "OnPolicy", "Mixed", "Speculative", "ReplayBuffer",
           "Adaptive", "TeacherLogits",
           "sentence_bleu", "closest_to_reference"]

