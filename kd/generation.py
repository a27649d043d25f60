"""Batched sampling from causal language models with a KV cache, and teacher-mixed sampling.

:func:`generate` is our own decoding loop for any transformers causal LM (a model called as
``model(input_ids=, attention_mask=, position_ids=, past_key_values=, use_cache=True)``
that returns ``.logits`` and ``.past_key_values``). It exists, instead of
``model.generate``, because the on-policy recipes (GKD, MiniLLM) need the log-probability
of every sampled token under the distribution it was sampled from, a hook that changes
that distribution (MiniLLM's teacher-mixed sampling) and exact control of the conventions.

Algorithm
---------
For a batch of ``B`` prompts of padded length ``P``, at step ``t = 0, 1, ...``:

1. run the model on the tokens it has not seen yet (the whole prompt at ``t = 0``, the
   token sampled at ``t - 1`` afterwards) with its KV cache, and take the logits of the
   last position, in float32: ``(B, V)``;
2. ``logq = log_softmax(logits / T)``; with a :class:`Mixer` (``mix=``) the distribution is
   replaced by the mixer's (e.g. ``log(alpha * p_teacher + (1 - alpha) * q_student)``);
3. filter: top-k (keep the ``k`` most likely tokens; ties with the ``k``-th are kept),
   then top-p on the renormalized result (nucleus: keep the smallest set of most likely
   tokens whose cumulative probability is ``>= top_p``; the most likely token is always
   kept), and renormalize (:func:`filter_log_probs`); skipped when both are off;
4. sample by inverting the CDF (:func:`sample_from_log_probs`: one uniform per row from
   ``generator``, the first token whose float64 cumulative probability exceeds it), or take
   the argmax when ``temperature == 0`` (greedy);
5. write the token, its mask and position into the next column of buffers preallocated
   for ``P + max_new_tokens`` columns (no per-step concatenation); a sequence that emits
   one of ``eos_token_id`` is finished, it receives ``pad_token_id`` from the next step on.
   The loop stops after ``max_new_tokens`` steps or as soon as every sequence has
   finished, so ``N <= max_new_tokens`` is the number of steps actually run, and the
   outputs are the first ``P + N`` (``N``) columns.

Conventions
-----------
* **Left padding.** Prompts are left-padded (``attention_mask`` of each row is
  ``0 ... 0 1 ... 1``), so the last column is every prompt's last real token and new tokens
  are appended in one column for the whole batch. Prompts that are not left-padded (right
  padding, holes) are **re-packed** to left padding (their real tokens keep their order);
  ``Generation.sequences[:, :P]`` then holds the re-packed prompt. Every prompt needs at
  least one real token (a BOS, for example).
* **Position ids** are computed from the attention mask, ``(mask.cumsum(-1) - 1).clamp(0)``,
  for the prompt (the first real token has position 0 whatever the padding) and continued
  for each new token (a real token gets the number of real tokens before it; a pad after
  EOS repeats the last real position, i.e. the same ``cumsum - 1`` rule on the full mask). They are passed explicitly on every call: with absolute position
  embeddings (GPT-2) transformers 5.x would otherwise number the positions from the cache
  length, i.e. count the left pads, and a left-padded prompt would not generate what it
  generates alone. (Rotary models such as Llama only see relative positions, so for them
  the shift is invisible up to rounding.) The attention mask passed always covers the
  whole sequence so far, cache included.
* **Cache.** The model creates its cache on the first call (a ``DynamicCache`` in
  transformers 5.x); we hand the returned cache back on the next call (as ``cache=`` when
  ``forward`` takes it, transformers >= 5.x, else ``past_key_values=``). The
  ``DynamicCache`` is updated in place. ``use_cache=False`` recomputes the full forward on
  the whole sequence at each step (O(N^2), for tests and debugging). Prompt logits are not
  materialized when the model's ``forward`` accepts ``logits_to_keep`` (only the last
  position's logits are computed).
* **Log-probs.** ``Generation.logprobs[b, t]`` is the float32 log-probability of the
  sampled token under the distribution it was sampled from: after temperature, mixing,
  top-k and top-p (renormalized). With ``temperature == 0`` (greedy) it is the log-softmax
  at temperature 1 of the chosen token (of the mixture at temperature 1 with a mixer);
  top-k/top-p do not change the argmax and are ignored. It is 0 where ``response_mask`` is
  False.
* **EOS.** The first EOS counts as a response token (``response_mask`` and
  ``attention_mask`` are 1 on it); every later position holds ``pad_token_id``, has mask 0
  and log-prob 0. Without ``eos_token_id`` every sequence runs ``max_new_tokens`` steps.
* **Teacher-mixed sampling** (MiniLLM, Gu et al. 2023): :class:`TeacherMix` runs a second
  model (the teacher) incrementally with its own KV cache on the same tokens and samples
  from ``p~ = alpha * p + (1 - alpha) * q`` where ``p = softmax(teacher_logits / T)`` and
  ``q = softmax(student_logits / T)`` (same temperature), mixed in log space
  (``logaddexp(log alpha + log p, log(1 - alpha) + log q)``); ``alpha = 0`` returns ``q``
  itself and ``alpha = 1`` ``p`` itself, so ``alpha = 0`` reproduces plain sampling token
  for token with the same generator. ``Generation.student_logprobs`` / ``teacher_logprobs``
  are ``log q(y_t)`` / ``log p(y_t)`` at temperature ``T`` *before* top-k/top-p filtering
  (the models' distributions), so ``w_t = q(y_t) / p~(y_t) =
  exp(student_logprobs - logprobs)`` (:attr:`Generation.importance_weights`) is the
  importance weight with respect to the distribution actually sampled from. It is exactly 1
  for ``alpha = 0`` without filtering; with top-k/top-p it also carries the truncation.
  Vocabularies that differ only by padding rows are sliced to the shared size before the
  softmax.
* **Verification** (speculative KD, :mod:`kd.speculative`): after step 4 a mixer's
  :meth:`Mixer.verify` may replace each row's token (and name the distribution it was
  drawn from, whose log-prob ``Generation.logprobs`` then records);
  ``Generation.replaced`` marks the replaced tokens. Mixers that do not replace leave the
  loop exactly as without the hook.
* Everything runs under ``torch.no_grad()``; the model (and the teacher) are put in eval
  mode for the duration and restored to their previous mode afterwards.

Speed
-----
The loop is at least as fast as ``model.generate`` on the same model and settings, so it
is the only path (no delegation to ``model.generate`` when there is no mixer). Measured
with ``python benchmarks/generation_speed.py`` (random Llama, hidden 256, 4 layers,
vocabulary 16k, 32-token prompts, 64 new tokens, CPU, 2 threads), tokens/s ours / HF:
1.06 (sampling) and 1.01 (greedy) at batch 1, 1.39 (sampling) and 1.07 (greedy) at
batch 16. The model's forward dominates greedy decoding and is the same call in both;
the sampling gain is the CDF inversion (one uniform per row instead of ``torch.multinomial``'s
``V`` exponentials). The per-step work outside the forward is a log-softmax, the draw,
one gather and writes into preallocated columns.

Deviations from ``transformers.GenerationMixin.generate``
---------------------------------------------------------
* Sampling and greedy only: no beam search, contrastive search, assisted / speculative
  decoding, repetition penalties, stop strings, min-length or other logits processors.
  Beam search would need per-beam cumulative scores, reordering the cache along the batch
  dimension at each step (``DynamicCache.reorder_cache``) and length-normalized final
  selection; its per-token log-probs would no longer be "the distribution sampled from".
* Top-k and top-p filter log-probabilities (after temperature), not raw scores; the
  resulting sets are the same. ``temperature == 0`` means greedy (transformers refuses it).
* Sampling inverts the CDF with one uniform per row instead of ``torch.multinomial``
  (which, for one sample on CPU, draws ``V`` exponentials per row: a third of a decoding
  step at batch 16, vocabulary 16k). Both are exact draws from the same distribution, but
  a seed gives different tokens than ``model.generate`` with the same seed. Greedy
  decoding returns exactly ``model.generate``'s tokens (tested at batch 1 and 16).
* Finished sequences keep their last real position id instead of counting pads.
* No static cache / ``torch.compile`` path and no encoder-decoder models.
"""

from __future__ import annotations

import abc
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from kd import ConfigError, settings_of

__all__ = [
    "Sampling",
    "GREEDY",
    "GenerationConfig",
    "Generation",
    "DecodeState",
    "Mixed",
    "Mixer",
    "MixFn",
    "TeacherMix",
    "mix_log_probs",
    "filter_log_probs",
    "sample_from_log_probs",
    "position_ids_from_mask",
    "generate",
]


# --------------------------------------------------------------------------- config / outputs


@dataclass
class GenerationConfig:
    """How :func:`generate` decodes.

    Args:
        max_new_tokens: maximum number of generation steps (``>= 0``).
        temperature: divides the logits before the softmax (``> 0``); ``0`` means greedy.
        top_k: keep only the ``top_k`` most likely tokens (ties with the ``k``-th are kept);
            ``0`` turns it off.
        top_p: nucleus sampling: keep the smallest set of most likely tokens whose
            cumulative probability is ``>= top_p`` (the top token is always kept); in
            ``(0, 1]``, ``1.0`` turns it off.
        eos_token_id: a sequence is finished after it emits one of these ids; ``None``
            never stops a sequence early.
        pad_token_id: the token written after a sequence has finished (and used when
            prompts are re-packed to left padding).
        use_cache: reuse the KV cache between steps; ``False`` recomputes the full forward
            at each step (for tests / debugging).
        vocab_size: the tokenizer's true vocabulary; logits past it (output rows that only
            pad the embedding table, never trained) are dropped before sampling, so no
            such id is ever generated. ``None`` keeps every logit.
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eos_token_id: int | list[int] | None = None
    pad_token_id: int = 0
    use_cache: bool = True
    vocab_size: int | None = None

    def __post_init__(self) -> None:
        n = self.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ConfigError(f"max_new_tokens must be an integer >= 0 (got {self.max_new_tokens!r})")
        t = float(self.temperature)
        if not (t >= 0 and math.isfinite(t)):
            raise ConfigError(f"temperature must be >= 0, 0 meaning greedy (got {self.temperature!r})")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(f"top_k must be an integer >= 0, 0 meaning off (got {self.top_k!r})")
        if not (0.0 < float(self.top_p) <= 1.0):
            raise ConfigError(f"top_p must be in (0, 1], 1.0 meaning off (got {self.top_p!r})")

    @property
    def greedy(self) -> bool:
        """Whether decoding takes the argmax (``temperature == 0``)."""
        return float(self.temperature) == 0.0

    @property
    def eos_token_ids(self) -> list[int]:
        """``eos_token_id`` as a (possibly empty) list."""
        if self.eos_token_id is None:
            return []
        if isinstance(self.eos_token_id, int):
            return [self.eos_token_id]
        return [int(i) for i in self.eos_token_id]


@dataclass(frozen=True)
class Sampling:
    """How a model samples, the one typed setting shared by the regimes (``regime.sampling``),
    MiniLLM's rollouts (``recipe.sampling``) and generation evaluation (:data:`GREEDY`).

    Args:
        temperature: ``> 0`` divides the logits; ``0`` is greedy decoding.
        top_k: keep the ``top_k`` most likely tokens (``0``: off).
        top_p: nucleus filter in ``(0, 1]`` (``1.0``: off).
        max_new_tokens: generation budget; ``None`` takes the datamodule's
            (``data.max_new_tokens``).

    The tokenizer completes it into a :class:`GenerationConfig` (:meth:`config`).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int | None = None

    def __post_init__(self) -> None:
        GenerationConfig(max_new_tokens=0 if self.max_new_tokens is None else self.max_new_tokens,
                         temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)  # validates

    @classmethod
    def of(cls, value: Sampling | Any | None) -> Sampling:
        """From itself, a mapping of its fields (a Hydra node) or None (the defaults)."""
        return settings_of(cls, value, "sampling")  # type: ignore[return-value]

    def config(self, tokenizer: Any, max_new_tokens: int) -> GenerationConfig:
        """The :class:`GenerationConfig` for ``tokenizer`` (EOS, pad, true vocabulary), with
        ``max_new_tokens`` as the budget unless this sampling sets its own."""
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens if self.max_new_tokens is not None else int(max_new_tokens),
            temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer),
        )


#: greedy decoding (generation evaluation: exact match of held-out answers)
GREEDY = Sampling(temperature=0.0)


@dataclass
class Generation:
    """The output of :func:`generate`. ``B`` sequences, ``P`` prompt columns, ``N`` steps.

    Attributes:
        sequences: ``(B, P + N)`` long: the (left-padded) prompt followed by the generated
            tokens; ``pad_token_id`` after EOS.
        attention_mask: ``(B, P + N)`` long: 1 on real prompt tokens and on generated
            tokens up to and including the first EOS.
        response_mask: ``(B, N)`` bool: the generated positions that count (up to and
            including the first EOS).
        logprobs: ``(B, N)`` float32: log-prob of each sampled token under the distribution
            it was sampled from (after temperature, mixing, top-k and top-p); 0 where
            ``response_mask`` is False.
        prompt_length: ``P``.
        student_logprobs: ``(B, N)`` float32 ``log q(y_t)`` (student at temperature ``T``,
            unfiltered), only with a mixer; 0 where masked.
        teacher_logprobs: ``(B, N)`` float32 ``log p(y_t)`` (teacher at temperature ``T``,
            unfiltered), only with a mixer; 0 where masked.
        replaced: ``(B, N)`` bool, the tokens a mixer's :meth:`Mixer.verify` replaced
            (speculative KD: the teacher's samples); only with a mixer that replaces tokens.
    """

    sequences: Tensor
    attention_mask: Tensor
    response_mask: Tensor
    logprobs: Tensor
    prompt_length: int
    student_logprobs: Tensor | None = None
    teacher_logprobs: Tensor | None = None
    replaced: Tensor | None = None

    @property
    def responses(self) -> Tensor:
        """``(B, N)``: the generated tokens."""
        return self.sequences[:, self.prompt_length:]

    @property
    def response_lengths(self) -> Tensor:
        """``(B,)`` long: number of counted response tokens per sequence (EOS included)."""
        return self.response_mask.sum(-1)

    @property
    def importance_weights(self) -> Tensor:
        """``(B, N)`` float32 ``w_t = q(y_t) / p~(y_t)`` (MiniLLM); 1 where masked.

        Needs a generation made with a mixer (``student_logprobs`` present).
        """
        if self.student_logprobs is None:
            raise ValueError(
                "importance weights need student_logprobs: generate with a mixer "
                "(mix=TeacherMix(teacher, alpha)); plain sampling has w = 1"
            )
        return torch.exp(self.student_logprobs - self.logprobs)


@dataclass
class DecodeState:
    """What a :class:`Mixer` sees at one decoding step (``L = P + step`` columns so far).

    ``sequences``, ``attention_mask`` and ``position_ids`` are views of :func:`generate`'s
    preallocated buffers (their first ``L`` columns): read them, do not write them.

    Attributes:
        step: index of the token about to be sampled (0-based).
        sequences: ``(B, L)`` long: prompt and tokens generated so far.
        attention_mask: ``(B, L)`` long.
        position_ids: ``(B, L)`` long: the positions the model was (or will be) given.
        finished: ``(B,)`` bool: sequences that have already emitted EOS.
        prompt_length: ``P``.
        temperature: the effective temperature (1.0 when greedy).
    """

    step: int
    sequences: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    finished: Tensor
    prompt_length: int
    temperature: float


@dataclass
class Mixed:
    """A mixer's answer at one step; all ``(B, V)`` float32 normalized log-probs.

    Attributes:
        logprobs: the distribution to sample from (before top-k/top-p filtering).
        student_logprobs: the student's distribution ``log q``.
        teacher_logprobs: the other model's distribution ``log p``.
    """

    logprobs: Tensor
    student_logprobs: Tensor
    teacher_logprobs: Tensor


#: ``(student_logprobs (B, V), teacher_logprobs (B, V), state) -> log-probs (B, V)`` to
#: sample from: the mixing rule of :class:`TeacherMix`.
MixFn = Callable[[Tensor, Tensor, DecodeState], Tensor]


# --------------------------------------------------------------------------- helpers


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """``(B, L)`` positions ``(mask.cumsum(-1) - 1).clamp(0)``: the first real token is 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _is_left_padded(attention_mask: Tensor) -> bool:
    return bool((attention_mask[:, 1:] >= attention_mask[:, :-1]).all())


def _to_left_padding(input_ids: Tensor, attention_mask: Tensor, pad_token_id: int) -> tuple[Tensor, Tensor]:
    """Move every row's real tokens to the right end, keeping their order."""
    order = torch.argsort(attention_mask, dim=1, stable=True)  # zeros first, stable
    mask = attention_mask.gather(1, order)
    ids = input_ids.gather(1, order).masked_fill(mask == 0, pad_token_id)
    return ids, mask


def filter_log_probs(logprobs: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Top-k then top-p (nucleus) filtering of normalized log-probs, renormalized.

    Args:
        logprobs: ``(..., V)`` normalized log-probabilities (float32).
        top_k: keep the ``top_k`` most likely tokens (ties with the ``k``-th are kept);
            ``0`` (or ``>= V``) is off.
        top_p: keep the smallest set of most likely tokens whose cumulative probability is
            ``>= top_p`` (computed on the top-k-renormalized distribution; the most likely
            token is always kept); ``1.0`` is off.

    Returns:
        ``(..., V)``: the input itself when nothing is filtered, otherwise log-probs with
        removed tokens at ``-inf``, renormalized over the kept ones.
    """
    vocab = logprobs.shape[-1]
    if 0 < top_k < vocab:
        kth = logprobs.topk(top_k, dim=-1).values[..., -1:]
        logprobs = logprobs.masked_fill(logprobs < kth, float("-inf"))
        logprobs = logprobs - logprobs.logsumexp(-1, keepdim=True)
    if top_p < 1.0:
        sorted_lp, order = logprobs.sort(dim=-1, descending=True)
        cumulative = sorted_lp.exp().cumsum(-1)
        # probability mass strictly before each token in sorted order
        before = torch.cat([torch.zeros_like(cumulative[..., :1]), cumulative[..., :-1]], dim=-1)
        remove_sorted = before >= top_p
        remove_sorted[..., 0] = False
        remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
        logprobs = logprobs.masked_fill(remove, float("-inf"))
        logprobs = logprobs - logprobs.logsumexp(-1, keepdim=True)
    return logprobs


def mix_log_probs(student_logprobs: Tensor, teacher_logprobs: Tensor, alpha: float) -> Tensor:
    """``log(alpha * p + (1 - alpha) * q)`` computed in log space.

    Args:
        student_logprobs: ``(..., V)`` ``log q``.
        teacher_logprobs: ``(..., V)`` ``log p``.
        alpha: teacher weight in ``[0, 1]``; ``0`` returns ``student_logprobs`` itself and
            ``1`` returns ``teacher_logprobs`` itself (exact reductions).

    Returns:
        ``(..., V)`` normalized log-probs of the mixture.
    """
    if alpha == 0.0:
        return student_logprobs
    if alpha == 1.0:
        return teacher_logprobs
    return torch.logaddexp(teacher_logprobs + math.log(alpha), student_logprobs + math.log1p(-alpha))


def _log_probs(logits: Tensor, temperature: float) -> Tensor:
    logits = logits.float()
    if temperature != 1.0:  # x / 1.0 == x: skip the (B, V) pass
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1)


def sample_from_log_probs(logprobs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Draw one token per row from normalized log-probs by inverting the CDF.

    ``u ~ U[0, 1)`` per row (``torch.rand`` with ``generator``); the token is the first index
    whose cumulative probability (accumulated in float64) exceeds ``u * total``. Tokens of
    probability 0 (``-inf``, e.g. filtered out) are never drawn. The draw is exact for the
    distribution given and reproducible with the same ``generator``; it consumes one random
    number per row instead of ``V`` (``torch.multinomial`` draws ``V`` exponentials for one
    sample on CPU, the dominant cost of a decoding step at batch 16).

    Args:
        logprobs: ``(B, V)`` float log-probabilities (normalized, or up to a constant).
        generator: the ``torch.Generator`` to draw from; ``None`` uses the global RNG.

    Returns:
        ``(B,)`` long token ids.
    """
    cdf = torch.cumsum(logprobs.exp(), dim=-1, dtype=torch.float64)
    total = cdf[:, -1:]
    valid = (torch.isfinite(total) & (total > 0)).all()
    message = "cannot sample: a distribution has non-finite or zero total probability (nan/inf logits?)"
    if total.device.type == "cpu":
        if not bool(valid):
            raise ValueError(message)
    else:  # no host synchronization per step on an accelerator
        torch._assert_async(valid, message)
    u = torch.rand(total.shape, dtype=torch.float64, device=total.device, generator=generator)
    # u * total may round up to total; stay strictly below so a positive-probability token is hit
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(-1)


class _Stepper:
    """Runs one causal LM step by step, with or without its KV cache.

    :meth:`next_logits` feeds the tokens of ``state.sequences`` the model has not seen yet
    and returns the float32 logits ``(B, V)`` of the last position.
    """

    def __init__(self, model: nn.Module, use_cache: bool) -> None:
        self.model = model
        self.use_cache = use_cache
        self.cache: Any = None
        self.seen = 0
        params = inspect.signature(model.forward).parameters
        var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        self.pass_positions = "position_ids" in params or var_kw
        self.logits_to_keep = "logits_to_keep" in params
        # transformers >= 5.x names the cache ``cache`` (``past_key_values`` is deprecated)
        self.cache_name = "cache" if "cache" in params else "past_key_values"

    def next_logits(self, state: DecodeState) -> Tensor:
        start = self.seen if self.use_cache else 0
        kwargs: dict[str, Any] = {
            "input_ids": state.sequences[:, start:],
            "attention_mask": state.attention_mask,
            "use_cache": self.use_cache,
        }
        if self.pass_positions:
            kwargs["position_ids"] = state.position_ids[:, start:]
        if self.use_cache and self.cache is not None:
            kwargs[self.cache_name] = self.cache
        if self.logits_to_keep:
            kwargs["logits_to_keep"] = 1
        out = self.model(**kwargs)
        if self.use_cache:
            self.cache = getattr(out, self.cache_name)
            self.seen = state.sequences.shape[1]
        return out.logits[:, -1].float()


# --------------------------------------------------------------------------- mixers


class Mixer(abc.ABC):
    """A hook that replaces the distribution :func:`generate` samples from.

    :func:`generate` calls :meth:`begin` once before the first step, ``mixer(logits,
    state)`` at every step, and :meth:`end` once afterwards (also on errors).
    """

    def begin(self, config: GenerationConfig) -> None:  # noqa: B027 - optional hook
        """Prepare for one :func:`generate` call (e.g. reset caches, set eval mode)."""

    @abc.abstractmethod
    def __call__(self, student_logits: Tensor, state: DecodeState) -> Mixed:
        """Mix at one step.

        Args:
            student_logits: ``(B, V)`` float32 raw logits of the student's last position.
            state: the decoding state (see :class:`DecodeState`).
        """

    def end(self) -> None:  # noqa: B027 - optional hook
        """Clean up after one :func:`generate` call (free caches, restore modes)."""

    def verify(self, token: Tensor, dist: Tensor, state: DecodeState,
               generator: torch.Generator | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """Accept or replace the token :func:`generate` drew at one step (after
        :meth:`__call__`): return ``(token, dist, replaced)``: the ``(B,)`` tokens kept, the
        ``(B, V)`` log-probs each row's kept token was drawn from, and a ``(B,)`` bool of the
        rows whose token was replaced (None: this mixer never replaces, the default).
        Speculative KD's interleaving (:class:`kd.speculative.Interleave`) uses it."""
        return token, dist, None


class TeacherMix(Mixer):
    """MiniLLM teacher-mixed sampling: sample from ``alpha * p_teacher + (1 - alpha) * q``.

    The teacher runs incrementally with its own KV cache on the same tokens, positions and
    mask as the student, in eval mode and without gradients (its mode is restored after
    each :func:`generate`). Both distributions use the generation temperature (1 when
    greedy). Logits of different vocabulary sizes are sliced to the smaller one.

    Args:
        teacher: a causal LM sharing the student's tokenizer.
        alpha: teacher weight in ``[0, 1]`` (MiniLLM uses 0.2); 0 reduces exactly to plain
            student sampling, 1 to sampling from the teacher.
        mix_fn: optional custom mixing rule :data:`MixFn` (replaces the ``alpha`` mixture).
    """

    def __init__(self, teacher: nn.Module, alpha: float = 0.2, mix_fn: MixFn | None = None) -> None:
        a = float(alpha)
        if not (0.0 <= a <= 1.0):
            raise ConfigError(f"TeacherMix alpha must be in [0, 1] (got {alpha!r}); MiniLLM uses 0.2")
        self.teacher = teacher
        self.alpha = a
        self.mix_fn = mix_fn
        self._stepper: _Stepper | None = None
        self._was_training = False

    def begin(self, config: GenerationConfig) -> None:
        self._was_training = self.teacher.training
        self.teacher.eval()
        self._stepper = _Stepper(self.teacher, config.use_cache)

    def __call__(self, student_logits: Tensor, state: DecodeState) -> Mixed:
        if self._stepper is None:
            raise RuntimeError("TeacherMix used outside generate (begin() was not called)")
        teacher_logits = self._stepper.next_logits(state)
        vocab = min(student_logits.shape[-1], teacher_logits.shape[-1])
        log_q = _log_probs(student_logits[..., :vocab], state.temperature)
        log_p = _log_probs(teacher_logits[..., :vocab], state.temperature)
        if self.mix_fn is not None:
            mixed = self.mix_fn(log_q, log_p, state)
        else:
            mixed = mix_log_probs(log_q, log_p, self.alpha)
        return Mixed(logprobs=mixed, student_logprobs=log_q, teacher_logprobs=log_p)

    def end(self) -> None:
        self._stepper = None  # frees the teacher's cache
        self.teacher.train(self._was_training)


# --------------------------------------------------------------------------- generate


def _prepare_prompts(input_ids: Tensor, attention_mask: Tensor | None, pad_token_id: int) -> tuple[Tensor, Tensor]:
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, P), got shape {tuple(input_ids.shape)}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must hold at least one prompt token, got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
        )
    attention_mask = attention_mask.long()
    input_ids = input_ids.long()
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 and 1")
    if not bool(attention_mask.any(-1).all()):
        raise ValueError("every prompt needs at least one real token (attention_mask row of zeros); add a BOS")
    if not _is_left_padded(attention_mask):
        input_ids, attention_mask = _to_left_padding(input_ids, attention_mask, pad_token_id)
    return input_ids, attention_mask


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    config: GenerationConfig | None = None,
    *,
    generator: torch.Generator | None = None,
    mix: Mixer | None = None,
) -> Generation:
    """Sample (or greedily decode) continuations of a batch of prompts.

    Args:
        model: a transformers-style causal LM (see the module docstring).
        input_ids: ``(B, P)`` prompts, left-padded (other padding is re-packed to the left).
        attention_mask: ``(B, P)`` 1 on real tokens; ``None`` means no padding.
        config: decoding settings (default :class:`GenerationConfig`).
        generator: the ``torch.Generator`` the sampler draws its uniforms from (on the
            model's device; one number per row and step); ``None`` uses the global RNG.
        mix: a :class:`Mixer` (e.g. :class:`TeacherMix`) replacing the student's
            distribution; adds ``student_logprobs`` / ``teacher_logprobs`` to the output.

    Returns:
        :class:`Generation` with ``N <= max_new_tokens`` generated columns.
    """
    config = config or GenerationConfig()
    pad = int(config.pad_token_id)
    input_ids, attention_mask = _prepare_prompts(input_ids, attention_mask, pad)
    batch, prompt_length = input_ids.shape
    device = input_ids.device
    eos = torch.tensor(config.eos_token_ids, dtype=torch.long, device=device)
    temperature = 1.0 if config.greedy else float(config.temperature)
    max_new = config.max_new_tokens
    filtering = not config.greedy and (config.top_k > 0 or config.top_p < 1.0)

    # preallocated (B, P + max_new) buffers, written one column per step; the state and the
    # outputs are views of their first ``length`` columns
    total = prompt_length + max_new
    sequences = torch.full((batch, total), pad, dtype=torch.long, device=device)
    sequences[:, :prompt_length] = input_ids
    mask = torch.zeros((batch, total), dtype=torch.long, device=device)
    mask[:, :prompt_length] = attention_mask
    positions = torch.zeros((batch, total), dtype=torch.long, device=device)
    positions[:, :prompt_length] = position_ids_from_mask(attention_mask)
    real = attention_mask.sum(-1)  # real tokens so far per row
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    response_mask = torch.zeros((batch, max_new), dtype=torch.bool, device=device)
    logprobs = torch.zeros((batch, max_new), dtype=torch.float32, device=device)
    student_lps = torch.zeros_like(logprobs)  # filled (and returned) only with a mixer
    teacher_lps = torch.zeros_like(logprobs)
    replaced: Tensor | None = None  # (B, max_new) bool, made when a mixer first replaces tokens
    length = prompt_length

    was_training = model.training
    model.eval()
    try:
        if mix is not None:
            mix.begin(config)
        try:
            stepper = _Stepper(model, config.use_cache)
            for step in range(max_new):
                state = DecodeState(step, sequences[:, :length], mask[:, :length], positions[:, :length],
                                    finished, prompt_length, temperature)
                logits = stepper.next_logits(state)
                if config.vocab_size is not None:
                    logits = logits[..., : config.vocab_size]
                mixed = mix(logits, state) if mix is not None else None
                dist = mixed.logprobs if mixed is not None else _log_probs(logits, temperature)
                if config.greedy:
                    token = dist.argmax(-1)
                else:
                    if filtering:
                        dist = filter_log_probs(dist, config.top_k, config.top_p)
                    token = sample_from_log_probs(dist, generator)
                if mix is not None:
                    token, dist, swapped = mix.verify(token, dist, state, generator)
                    if swapped is not None:
                        replaced = replaced if replaced is not None else torch.zeros_like(response_mask)
                        replaced[:, step] = swapped & ~finished
                valid = ~finished
                token = token.masked_fill(finished, pad)

                def pick(lp: Tensor) -> Tensor:
                    return lp.gather(-1, token[:, None]).squeeze(-1).masked_fill(finished, 0.0)

                response_mask[:, step] = valid
                logprobs[:, step] = pick(dist)
                if mixed is not None:
                    student_lps[:, step] = pick(mixed.student_logprobs)
                    teacher_lps[:, step] = pick(mixed.teacher_logprobs)

                real += valid.long()
                sequences[:, length] = token
                mask[:, length] = valid
                positions[:, length] = real - 1  # == (cumsum - 1) of the new column
                length += 1
                if eos.numel():
                    finished = finished | (valid & torch.isin(token, eos))
                    if bool(finished.all()):
                        break
        finally:
            if mix is not None:
                mix.end()
    finally:
        model.train(was_training)

    steps = length - prompt_length

    def cut(x: Tensor, columns: int) -> Tensor:
        return x if columns == x.shape[1] else x[:, :columns].contiguous()

    return Generation(
        sequences=cut(sequences, length),
        attention_mask=cut(mask, length),
        response_mask=cut(response_mask, steps),
        logprobs=cut(logprobs, steps),
        prompt_length=prompt_length,
        student_logprobs=cut(student_lps, steps) if mix is not None else None,
        teacher_logprobs=cut(teacher_lps, steps) if mix is not None else None,
        replaced=cut(replaced, steps) if replaced is not None else None,
    )
