"""Evaluation: per-stage metrics (torchmetrics) and run summaries over seeds.

:class:`StageMetrics` accumulates, over a validation or test epoch, the student's
cross-entropy and accuracy on gold labels (per token for language models, with the
perplexity exp(CE)) and, when a teacher is present, the forward KL(teacher || student)
at T=1 and the teacher's own accuracy; with routed teachers, the forward KL of each
teacher on the rows routed to it (``teacher_kl/<teacher>``). Either model may come as hidden
states and a linear head (:class:`kd.signals.HeadLogits`): every metric is then computed a
block of positions at a time (:func:`kd.chunked.map_rows`), never from ``(N, V)`` logits, with
the same values. Exact match of generated answers comes from
greedy generations (:class:`GeneratedAnswers`), scored by the data's task. Every value is a
token-weighted mean (torchmetrics ``MeanMetric`` with weights), so it is exact across
batches of different sizes and across devices.

:func:`summarize` turns the ``metrics.json`` files of several runs into one table of
mean +- sample standard deviation over seeds, one group per setting (the run's command
line overrides without ``seed``).
"""

from __future__ import annotations

import json
import math
import statistics
import warnings
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from kd.chunked import fused_loss, map_rows, scalar_weights
from kd import ConfigError
from kd.data import IGNORE_INDEX
from kd.divergences import forward_kl, forward_kl_per_position
from kd.generation import GREEDY, generate
from kd.signals import HeadLogits, Labels, TopK, compute_dtype, topk_bins


def cross_entropy(logits: Tensor | HeadLogits, labels: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy of ``logits`` (..., V) against ``labels`` (...) in fp32 (fp64 stays fp64).

    Positions labelled :data:`~kd.data.IGNORE_INDEX` are excluded; ``"mean"`` averages over
    the valid positions of the whole batch and returns 0 (not NaN) when there are none;
    ``"sum"`` sums them; ``"none"`` returns per-position values (0 where ignored).
    ``logits`` may be a :class:`kd.signals.HeadLogits` (hidden states and head): then the
    loss is computed a block of positions at a time (:func:`kd.chunked.fused_loss`).
    """
    valid = labels != IGNORE_INDEX
    if isinstance(logits, HeadLogits):
        rows = valid.reshape(-1).nonzero().squeeze(-1)
        target = Labels(torch.where(valid, labels, 0))
        if reduction == "none":
            values = fused_loss(logits, target, None, rows, None)
            return values.new_zeros(valid.numel()).index_add(0, rows, values).view(labels.shape)
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none' (got {reduction!r})")
        dtype = compute_dtype(logits.hidden, logits.weight)
        return fused_loss(logits, target, None, rows, scalar_weights(rows, reduction, tuple(labels.shape), dtype))
    per = nn.functional.cross_entropy(
        logits.to(compute_dtype(logits)).reshape(-1, logits.shape[-1]),
        torch.where(valid, labels, 0).reshape(-1),
        reduction="none",
    ).reshape(labels.shape)
    per = torch.where(valid, per, torch.zeros_like(per))
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    if reduction == "mean":
        return per.sum() / valid.sum().clamp_min(1)
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none' (got {reduction!r})")


def _topk_kl(log_q: Tensor, top: TopK) -> Tensor:
    """Forward KL(teacher || student) over a top-k teacher's ``k + 1`` bins, one value per
    row of ``log_q`` (the student's log-softmax, ``(C, V)``)."""
    q, p = topk_bins(log_q, top)
    return torch.where(p > -math.inf, p.exp() * (p - q), torch.zeros((), dtype=p.dtype)).sum(-1)


class StageMetrics(nn.Module):
    """Epoch-level metrics of one stage (``val`` or ``test``).

    ``update(student_logits, labels, mask, teacher_logits=None)`` with logits ``(..., V)``,
    labels ``(...)`` (IGNORE_INDEX = no gold label) and mask ``(...)`` (positions that
    count for the teacher comparison); ``compute()`` returns a dict of floats.

    ``routes``: the names of routed teachers (:class:`kd.teachers.Teachers`); then
    :meth:`update_routes` accumulates each one's forward KL(teacher || student) over the
    masked positions of its own rows only, reported as ``teacher_kl/<name>`` (a route
    without rows in the epoch is left out).
    """

    def __init__(self, routes: list[str] | None = None) -> None:
        super().__init__()
        self.routes = list(routes or [])
        self.route_kl = nn.ModuleList([MeanMetric() for _ in self.routes])
        self.loss = MeanMetric()
        self.acc = MeanMetric()
        self.kl_to_teacher = MeanMetric()
        self.teacher_acc = MeanMetric()
        self.teacher_loss = MeanMetric()
        self.has_teacher = False
        self.teacher_has_loss = False  # a top-k teacher (served) has no loss on the gold tokens
        self.tokens = False  # token-level data: report perplexity too

    @torch.no_grad()
    def update(
        self, student_logits: Tensor | HeadLogits, labels: Tensor, mask: Tensor,
        teacher_logits: Tensor | HeadLogits | None = None,
    ) -> None:
        """Either model may come as hidden states and head (:class:`kd.signals.HeadLogits`):
        its metrics are then computed a block of positions at a time."""
        self.tokens = self.tokens or labels.dim() > 1
        gold = labels != IGNORE_INDEX
        gold_rows = gold.reshape(-1).nonzero().squeeze(-1)
        target = Labels(torch.where(gold, labels, 0))

        def ce_and_correct(log_q: Tensor, ids: Tensor) -> Tensor:
            return torch.stack([-log_q.gather(-1, ids[:, None]).squeeze(-1),
                                (log_q.argmax(-1) == ids).to(log_q.dtype)], -1)

        def gold_metrics(logits: Tensor | HeadLogits) -> tuple[Tensor, Tensor]:
            if isinstance(logits, HeadLogits):
                values = map_rows(logits, target, ce_and_correct, gold_rows)
                return values[:, 0].mean(), values[:, 1].mean()
            correct = (logits.argmax(-1) == labels) & gold
            return cross_entropy(logits, labels), correct.sum() / gold.sum()

        n_gold = gold_rows.numel()
        if n_gold:
            loss, acc = gold_metrics(student_logits)
            self.loss.update(loss, weight=n_gold)
            self.acc.update(acc, weight=n_gold)
        if teacher_logits is None:
            return
        self.has_teacher = True
        if isinstance(teacher_logits, TopK):  # a served teacher: KL over the top-k bins, its top-1 accuracy
            self._update_topk(student_logits, teacher_logits, labels, mask, gold)
            return
        self.teacher_has_loss = True
        rows = mask.reshape(-1).bool().nonzero().squeeze(-1)
        if rows.numel():
            if isinstance(student_logits, HeadLogits):
                kl = map_rows(student_logits, teacher_logits,
                              lambda log_q, log_p: forward_kl_per_position(log_q, log_p), rows).mean()
            else:
                teacher = teacher_logits.materialize() if isinstance(teacher_logits, HeadLogits) else teacher_logits
                kl = forward_kl(student_logits, teacher, mask)
            self.kl_to_teacher.update(kl, weight=rows.numel())
        if n_gold:
            loss, acc = gold_metrics(teacher_logits)
            self.teacher_acc.update(acc, weight=n_gold)
            self.teacher_loss.update(loss, weight=n_gold)

    @torch.no_grad()
    def update_routes(self, student_logits: Tensor | HeadLogits, teacher_logits: Tensor | HeadLogits | TopK,
                      mask: Tensor, route: Tensor) -> None:
        """Each routed teacher's forward KL on its rows: ``route`` ``(B,)`` holds every row's
        teacher (its position in ``routes``; -1: none), ``mask`` ``(B, ...)`` the positions
        compared, ``teacher_logits`` the teachers' merged logits (each row its own teacher's)."""
        for k, metric in enumerate(self.route_kl):
            own = mask.bool() & (route == k).view(-1, *[1] * (mask.dim() - 1))
            rows = own.reshape(-1).nonzero().squeeze(-1)
            if rows.numel():
                metric.update(self._kl_rows(student_logits, teacher_logits, rows).mean(), weight=rows.numel())

    @staticmethod
    def _kl_rows(student_logits: Tensor | HeadLogits, teacher_logits: Tensor | HeadLogits | TopK,
                 rows: Tensor) -> Tensor:
        """Forward KL(teacher || student) at T=1 at the flattened positions ``rows``, one value
        each (a top-k teacher: over its ``k + 1`` bins, as :meth:`_update_topk`)."""
        if isinstance(teacher_logits, TopK):
            if isinstance(student_logits, HeadLogits):  # a block of positions at a time
                return map_rows(student_logits, teacher_logits, _topk_kl, rows, dtype=torch.float32)
            flat = student_logits.reshape(-1, student_logits.shape[-1])[rows].float()
            ids = teacher_logits.ids.reshape(-1, teacher_logits.ids.shape[-1])[rows]
            logprobs = teacher_logits.logprobs.reshape(-1, ids.shape[-1])[rows]
            return _topk_kl(torch.log_softmax(flat, -1), TopK(ids, logprobs, teacher_logits.tail))
        if isinstance(student_logits, HeadLogits):
            return map_rows(student_logits, teacher_logits, lambda log_q, log_p: forward_kl_per_position(log_q, log_p),
                            rows)
        teacher = teacher_logits.materialize() if isinstance(teacher_logits, HeadLogits) else teacher_logits
        dtype = compute_dtype(student_logits)
        log_q = torch.log_softmax(student_logits.reshape(-1, student_logits.shape[-1])[rows].to(dtype), -1)
        log_p = torch.log_softmax(teacher.reshape(-1, teacher.shape[-1])[rows].to(dtype), -1)
        return forward_kl_per_position(log_q, log_p)

    def _update_topk(self, student_logits: Tensor | HeadLogits, teacher: TopK, labels: Tensor, mask: Tensor,
                     gold: Tensor) -> None:
        """A top-k teacher (docs/spec.md section 8): forward KL over its ``k + 1`` bins and
        the accuracy of its most likely token; its loss needs the gold token's probability,
        which a top-k does not hold, so none is reported."""
        mask = mask.bool()
        if mask.any():
            kl = self._kl_rows(student_logits, teacher, mask.reshape(-1).nonzero().squeeze(-1))
            self.kl_to_teacher.update(kl.mean(), weight=kl.numel())
        if gold.any():
            correct = (teacher.ids[..., 0] == labels) & gold
            self.teacher_acc.update(correct.sum() / gold.sum(), weight=int(gold.sum()))

    def compute(self) -> dict[str, Tensor]:
        out = {"loss": self.loss.compute(), "acc": self.acc.compute()}
        if self.tokens:
            out["ppl"] = out["loss"].exp()
        if self.has_teacher:
            out["kl_to_teacher"] = self.kl_to_teacher.compute()
            out["teacher_acc"] = self.teacher_acc.compute()
            if self.teacher_has_loss:
                out["teacher_loss"] = self.teacher_loss.compute()
                if self.tokens:
                    out["teacher_ppl"] = out["teacher_loss"].exp()
        for name, metric in zip(self.routes, self.route_kl):
            with warnings.catch_warnings():  # every rank computes (a collective); nan where no rank had rows
                warnings.simplefilter("ignore")
                value = metric.compute()
            if torch.isfinite(value):
                out[f"teacher_kl/{name}"] = value
        return out

    def reset(self) -> None:
        for m in (self.loss, self.acc, self.kl_to_teacher, self.teacher_acc, self.teacher_loss, *self.route_kl):
            m.reset()


# ----------------------------------------------------------------------------- summaries


class GeneratedAnswers:
    """Greedy answers to held-out prompts, kept by example index for exact-match scoring.

    :meth:`answer` decodes one model's greedy answers to a batch of prompts under a key
    (the stage for the student, ``"teacher"`` for the teacher at test time, so tables
    compare both on the same prompts). Under several processes every rank answers its
    share of the prompts; :meth:`scores` first merges the shares of every rank, so each
    rank scores the whole split, then asks the data to score them (``datamodule.score``).
    """

    def __init__(self) -> None:
        self._answers: dict[str, dict[int, str]] = {}

    def answer(self, key: str, model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, tokenizer: Any,
               indices: Tensor, max_new_tokens: int) -> None:
        config = GREEDY.config(tokenizer, max_new_tokens)
        if hasattr(model, "sample"):  # a served teacher (kd.served): the server answers
            answers = model.sample([p[m.bool()].tolist() for p, m in zip(prompt_ids, prompt_mask)], config)
        else:
            out = generate(model, prompt_ids, prompt_mask, config)
            answers = [tokens[keep].tolist() for tokens, keep in zip(out.responses, out.response_mask)]
        for i, tokens in zip(indices.tolist(), answers):
            self._answers.setdefault(key, {})[i] = tokenizer.decode(tokens, skip_special_tokens=True)

    def _merge_ranks(self, world: int) -> None:
        if world == 1:
            return
        shares: list[Any] = [None] * world
        torch.distributed.all_gather_object(shares, self._answers)
        self._answers = {}
        for share in shares:
            for key, answers in share.items():
                self._answers.setdefault(key, {}).update(answers)

    def scores(self, stage: str, datamodule: Any, world: int = 1) -> dict[str, float]:
        """The stage's scores of the student's answers, and at test time the teacher's
        under ``teacher_<name>``; the answers scored are dropped."""
        self._merge_ranks(world)
        values: dict[str, float] = {}
        if self._answers.get(stage):
            values.update(datamodule.score(stage, self._answers.pop(stage)))
        if stage == "test" and self._answers.get("teacher"):
            scores = datamodule.score(stage, self._answers.pop("teacher"))
            values.update({f"teacher_{k}": v for k, v in scores.items()})
        return values


def _fmt(values: list[float], percent: bool) -> str:
    scale = 100.0 if percent else 1.0
    mean = statistics.fmean(values) * scale
    if len(values) < 2:
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {statistics.stdev(values) * scale:.2f}"


def _unreadable(run: Any) -> str | None:
    """Why a parsed ``metrics.json`` cannot be tabulated, or None when it can."""
    if not isinstance(run, dict):
        return "not a JSON object"
    if not isinstance(run.get("results"), dict):
        return "no 'results' object"
    if not all(isinstance(res, dict) for res in run["results"].values()):
        return "a 'results' entry is not an object"
    if not isinstance(run.get("overrides", []), list):
        return "'overrides' is not a list"
    return None


def load_runs(paths: Iterable[str | Path], skipped: list[str] | None = None) -> list[dict]:
    """Every ``metrics.json`` at or below the given paths, parsed. A file that cannot be
    read (bad JSON, missing keys: e.g. a run killed while writing it) is left out and named
    in ``skipped`` (``"<path> (<why>)"``), or in a logged warning when ``skipped`` is None."""
    import logging

    runs = []
    for p in paths:
        p = Path(p)
        files = [p] if p.is_file() else sorted(p.rglob("metrics.json"))
        for f in files:
            try:
                run = json.loads(f.read_text(encoding="utf-8"))
                why = _unreadable(run)
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                run, why = None, f"{type(e).__name__}: {e}"
            if why is None:
                runs.append(run)
            elif skipped is not None:
                skipped.append(f"{f} ({why})")
            else:
                logging.getLogger("kd").warning("skipped the unreadable run %s (%s)", f, why)
    return runs


def headline_metric(runs: list[dict]) -> str:
    """``test/exact_match`` when the runs report it (generative tasks), else ``test/acc``."""
    for run in runs:
        if any("test/exact_match" in res for res in run.get("results", {}).values()):
            return "test/exact_match"
    return "test/acc"


#: the result table's baseline rows: the student trained without a teacher, or the SFT a
#: distilled student started from (``student_sft``)
SCRATCH_ROW = "student, from scratch"
SFT_ROW = "student, SFT (start point)"
BASELINE_ROWS = (SCRATCH_ROW, SFT_ROW)


def gap_closed(results: dict[str, dict], metric: str) -> dict[str, float]:
    """Share of the teacher-student gap each distilled student closes in one run:
    ``(student - baseline) / (teacher - baseline)``, for runs holding both a ``teacher`` and
    a baseline row (:data:`BASELINE_ROWS`) with different values (empty otherwise)."""
    teacher = results.get("teacher", {}).get(metric)
    base = next((results[r] for r in BASELINE_ROWS if r in results), {}).get(metric)
    if teacher is None or base is None or teacher == base:
        return {}
    return {name: (res[metric] - base) / (teacher - base) for name, res in results.items()
            if name not in ("teacher", *BASELINE_ROWS) and res.get(metric) is not None}


def setting_of(run: dict) -> str:
    """A run's setting: its command-line overrides without the seed (``(defaults)`` if none)."""
    return " ".join(o for o in run.get("overrides", []) if not o.startswith("seed=")) or "(defaults)"


def student_value(run: dict, metric: str) -> float | None:
    """``metric`` of the model a run trained (its ``student, <recipe>`` row, else its last row)."""
    results = run.get("results", {})
    row = results.get(f"student, {run.get('recipe')}") or (list(results.values())[-1] if results else {})
    value = row.get(metric)
    return float(value) if value is not None and math.isfinite(value) else None


def paired_differences(runs: list[dict], baseline: list[dict], metric: str) -> dict[int, float]:
    """Per seed, the trained model's ``metric`` in ``runs`` minus its value in the
    ``baseline`` runs of the same seed (seeds missing on either side are left out)."""
    base = {r.get("seed"): student_value(r, metric) for r in baseline}
    out = {}
    for r in runs:
        value, ref = student_value(r, metric), base.get(r.get("seed"))
        if value is not None and ref is not None:
            out[r.get("seed")] = value - ref
    return dict(sorted(out.items()))


def is_percent(metric: str) -> bool:
    """Whether ``metric`` is a fraction that tables and plots show as a percentage."""
    return metric.endswith(("acc", "exact_match", "rouge_l"))


def match_setting(settings: list[str], baseline: str) -> str:
    """The one setting among ``settings`` (:func:`setting_of`) that ``baseline`` names: the
    setting itself, or overrides only it holds (e.g. ``divergence=jsd``); a ConfigError
    naming the choices when none or several match."""
    if baseline in settings:
        return baseline
    wanted = set(baseline.split())
    matches = [key for key in settings if wanted <= set(key.split())]
    if len(matches) != 1:
        found = "several settings" if matches else "no runs"
        raise ConfigError(f"{found} with the setting '{baseline}'; choose one of: {', '.join(matches or settings)}")
    return matches[0]


def summarize(runs: list[dict], metric: str = "test/acc", baseline: str | None = None) -> str:
    """A text table: one block per setting, one row per model, mean ± std over seeds.

    Each run dict is a parsed ``metrics.json``: ``{"overrides": [...], "seed": int,
    "results": {row_name: {"test/acc": float, "params": int, ...}}}``. With ``baseline``
    (a setting, :func:`setting_of`, or overrides only it holds, e.g. ``divergence=jsd``),
    every other setting gets a line of per-seed paired differences of its trained model
    against that setting's (same seed).
    """
    if not runs:
        return "no runs found (no metrics.json under the given paths)"
    groups: dict[str, list[dict]] = defaultdict(list)
    for run in runs:
        groups[setting_of(run)].append(run)
    if baseline is not None:
        baseline = match_setting(list(groups), baseline)
    percent = is_percent(metric)
    lines = []
    for key, members in groups.items():
        seeds = sorted({r.get("seed") for r in members})
        walls = [r["wall_time_s"] for r in members if "wall_time_s" in r]
        wall = f"; wall time {_fmt(walls, False)} s per run" if walls else ""
        lines.append(f"{key}  [{len(seeds)} seed{'s' if len(seeds) != 1 else ''}: {seeds}{wall}]")
        rows: dict[str, list[float]] = defaultdict(list)
        gaps: dict[str, list[float]] = defaultdict(list)
        params: dict[str, int] = {}
        for r in members:
            for name, res in r["results"].items():
                value = res.get(metric)
                if value is not None and math.isfinite(value):
                    rows[name].append(value)
                params[name] = res.get("params", 0)
            for name, gap in gap_closed(r["results"], metric).items():
                gaps[name].append(gap)
        width = max([len(n) for n in rows] + [5])
        label = f"{metric} (%)" if percent else metric
        gap_label = "gap closed (%)" if gaps else ""
        lines.append(f"  {'model':<{width}}  {label:>18}  {'params':>10}  {gap_label}".rstrip())
        for name, values in rows.items():
            gap = _fmt(gaps[name], True) if gaps.get(name) else ""
            lines.append(f"  {name:<{width}}  {_fmt(values, percent):>18}  {params[name]:>10,}  {gap:>14}".rstrip())
        if baseline is not None and key != baseline:
            diffs = paired_differences(members, groups[baseline], metric)
            if diffs:
                scale = 100.0 if percent else 1.0
                each = ", ".join(f"seed {s}: {d * scale:+.2f}" for s, d in diffs.items())
                lines.append(f"  paired difference vs {baseline}: {_fmt(list(diffs.values()), percent)} ({each})")
        lines.append("")
    return "\n".join(lines).rstrip()
