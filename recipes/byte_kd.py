"""Cross-tokenizer distillation: byte-level KD (BLD) and ULD (docs/spec.md section 7).

Teacher and student tokenize text differently, so their next-token distributions live on
different sets; over bytes they predict the same thing. Both recipes here do, per batch:

1. read each response as symbols (bytes, plus EOS) through the student's tokens
   (:meth:`kd.bytes.ByteVocab.spell`); student token ``j`` starts at byte ``o_j``;
2. tokenize the same bytes with the teacher's tokenizer, after the prompt in the
   teacher's own tokens and chat template (``teacher_prompt_ids``, which the datamodule
   adds when it knows the teacher's tokenizer; ``kd`` arranges that), and run the teacher
   once; teacher token ``i`` starts at byte ``T_i``;
3. align the two by byte offsets. Only the common prefix of both spellings counts (they
   differ only when the student's bytes are not valid UTF-8, e.g. a sampled response cut
   inside a character; ``train/misaligned`` is the share of such rows).

**BLD** (:class:`ByteKD`, "byte-level distillation", Apr 2026). The student keeps its
tokenizer and gets ``num_heads`` parallel byte heads (one linear layer each on its last
hidden state) at every response position: head ``k`` at the position that predicts token
``j`` predicts byte ``o_j + k``. The loss is::

    CE_token + lam_byte * CE_byte(head k, true byte o_j + k)
             + lam_kl * KL(teacher's byte o_j + k | bytes < o_j  ||  head k)

Parallel heads see only the state at ``o_j``, so their targets are the teacher's
*marginals* over byte ``o_j + k`` (given the bytes before ``o_j``), not its conditionals
given the true bytes in between (mixing the two is the silent bug section 7 warns of):
:func:`kd.bytes.marginal_byte_targets`. Head 0 at a teacher token boundary is exact; inside
a teacher token, and for ``k > 0``, the targets follow every path that leaves the teacher's
canonical tokenization at most once (one teacher pass), plus, inside a teacher token, the
path through the token that spells the partial bytes exactly (``detour_passes``: one extra
batched teacher pass); the probability of the other paths is logged as ``train/byte_leak`` (a bound on the targets' total-variation error; the exact
recursion with extra teacher passes is :class:`kd.bytes.ByteOracle`). Bytes past the
response's end have no target. The heads belong to the recipe, not the student: they are in
Lightning checkpoints (for resuming) but not in the exported student, which plain
transformers loads.

``lam_boundary_kl`` (default 0, not in the paper) adds ``KL(teacher's next byte ||
student's next byte)`` at the student's token boundaries, the student's byte distribution
read exactly off its token distribution (:func:`kd.bytes.boundary_byte_probs`): a signal for
the token head itself.

**ULD** (:class:`ULD`, Boizard et al. 2024). ``CE_token + lam * ULD(p_S, p_T)``, the
sorted-probability L1 (:class:`kd.divergences.ULD`) between the student's and the teacher's
next-token distributions at positions where both tokenizations start a token at the same
byte offset (the paper aligns by token index; the byte offsets make the pairs predict the
same text).

Deviations and choices: BLD's weights default to docs/spec.md section 7's (1.0, 0.1; marked unsure
there) and 10 heads; ULD's ``lam`` defaults to 1.0. Non-canonical tokenizations of the
history are not marginalised (see :mod:`kd.bytes`). Teacher-generated data
(``regime=teacher_generated``, ``seq_kd``) is refused: its tokens are the teacher's.

Fused path (the student's side): when the student's logits are a linear head over its
last hidden states, no ``(N, V_S)`` student logits are built. The token cross-entropy is the
fused one; BLD's student next-byte marginals at its token boundaries (a sum of its token
probabilities by first byte, needing whole rows) are computed ``C`` positions at a time
under activation checkpointing (:func:`kd.chunked.map_rows_grad`); ULD's student rows are
gathered as hidden states at the aligned positions and the ULD divergence chunks over
positions (``(C, V)`` rows at a time: sorting needs whole rows, so no vocabulary tiles).
``recipe.chunked=false`` (BLD) / ``divergence.chunked=false`` (ULD) builds the logits. The
teacher stays dense: its logits at the response positions only (``logits_to_keep``) are
what the byte-offset alignment and BLD's byte marginals (:func:`kd.bytes.marginal_byte_targets`,
sums over the teacher's whole vocabulary per position) read.

Run: ``kd experiment=task_byte_kd`` / ``kd experiment=task_uld`` (the embedded task, two
tokenizers), or ``kd recipe=byte_kd teacher=hf teacher.name_or_path=<hub> student=hf
student.name_or_path=<hub> data=jsonl ...``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from kd import ConfigError, batches
from kd.batches import right_pad
from kd.chunked import map_rows_grad
from kd.bytes import NUM_SYMBOLS, ByteVocab, boundary_byte_probs, detours, marginal_byte_targets
from kd.data import IGNORE_INDEX
from kd.divergences import Divergence, forward_kl_per_position, reduce
from kd.evaluation import cross_entropy
from kd.recipe import DistillationRecipe, Needs
from kd.signals import HeadLogits


def logits_at(logits: Tensor | HeadLogits, rows: Tensor, positions: Tensor) -> Tensor | HeadLogits:
    """``logits[rows, positions]``: for hidden states and head, the hidden states there (no logits)."""
    if isinstance(logits, HeadLogits):
        return replace(logits, hidden=logits.hidden[rows, positions])
    return logits[rows, positions]


@dataclass
class Row:
    """One sequence of a batch, seen by both tokenizers.

    ``student_pos[j]`` / ``teacher_pos[i]``: positions of the (unshifted) logits that
    predict response token ``j`` / ``i``; ``student_starts`` / ``teacher_starts``: the byte
    offsets where those tokens start; ``symbols``: the response spelled by the student's
    tokens; ``common``: how many of them the teacher's tokens spell identically."""

    student_pos: list[int]
    student_starts: list[int]
    symbols: list[int]
    teacher_prompt: list[int] = field(default_factory=list)
    teacher_ids: list[int] = field(default_factory=list)
    teacher_pos: list[int] = field(default_factory=list)
    teacher_starts: list[int] = field(default_factory=list)
    common: int = 0


class CrossTokenizerRecipe(DistillationRecipe):
    """Shared plumbing of the cross-tokenizer recipes: the two byte vocabularies, the
    teacher's view of a batch and the byte-offset alignment (module docstring)."""

    needs = Needs(teacher_tokenizer="own", regimes=("offline", "on_policy", "mixed"), data=("causal_lm",))
    #: symbols read past a position (ByteKD: its byte heads)
    num_heads = 1

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.student_bytes: ByteVocab | None = None
        self.teacher_bytes: ByteVocab | None = None

    def check_data(self, datamodule: Any) -> None:
        super().check_data(datamodule)
        if getattr(datamodule, "chat_template", True) is False:
            raise ConfigError("cross-tokenizer recipes predict each response from its prompt in the teacher's tokens, "
                              "and plain text windows (chat_template: false) have no prompt; use prompt/response data "
                              "(data=task, jsonl, hf or chatterbot)")

    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = self.trainer.datamodule
        if self.teacher_bytes is None:
            self.set_tokenizers(dm.tokenizer, getattr(dm, "teacher_tokenizer", None))

    def set_tokenizers(self, student_tokenizer: Any, teacher_tokenizer: Any) -> None:
        """The two tokenizers (``kd`` and :meth:`setup` call this from the datamodule)."""
        if teacher_tokenizer is None:
            raise ConfigError(f"{type(self).__name__} needs the teacher's tokenizer on the datamodule "
                              "(LMDataModule(teacher_tokenizer=...); the kd command sets it from teacher.tokenizer)")
        rows = getattr(self.teacher.get_input_embeddings(), "num_embeddings", None)
        if rows is not None and rows < len(teacher_tokenizer):
            raise ConfigError(f"the teacher has {rows} embedding rows but its tokenizer {len(teacher_tokenizer)} tokens; "
                              "is teacher.tokenizer the tokenizer the teacher was trained with?")
        self.student_bytes = ByteVocab(student_tokenizer, self.num_heads)
        self.teacher_bytes = ByteVocab(teacher_tokenizer, self.num_heads)

    def teacher_prompts(self, batch: dict[str, Tensor], tokenizer: Any) -> tuple[Tensor, Tensor, Any]:
        return batch["teacher_prompt_ids"], batch["teacher_prompt_mask"], self.teacher_bytes.tokenizer

    def _max_teacher_length(self) -> int | None:
        config = getattr(self.teacher, "config", None)
        return getattr(config, "max_position_embeddings", None)

    def align(self, batch: dict[str, Tensor]) -> tuple[list[Row], Tensor]:
        """The batch's rows seen by both tokenizers, and the teacher's logits ``(B, K, V_T)`` on
        its own tokens (cut to its tokenizer's vocabulary) at the K positions that predict
        some row's response tokens; ``row.teacher_pos`` index that second dimension."""
        if batches.TEACHER_PROMPT_IDS not in batch:
            raise ConfigError("cross-tokenizer batches need the prompts in the teacher's tokens; give the datamodule "
                              "the teacher's tokenizer (data.teacher_tokenizer=..., which kd sets for these recipes)")
        sb, tb = self.student_bytes, self.teacher_bytes
        rows: list[Row] = []
        sequences: list[list[int]] = []
        limit = self._max_teacher_length()
        labels = batch["labels"].tolist()
        for r, (prompt, pmask) in enumerate(zip(batch["teacher_prompt_ids"].tolist(), batch["teacher_prompt_mask"].tolist())):
            pos = [p for p, y in enumerate(labels[r]) if y != IGNORE_INDEX and p > 0]
            symbols, starts = sb.spell([labels[r][p] for p in pos])
            row = Row(student_pos=[p - 1 for p in pos], student_starts=starts, symbols=symbols)
            t_prompt = [t for t, m in zip(prompt, pmask) if m]
            if not t_prompt:
                raise ConfigError("a prompt is empty in the teacher's tokens, so nothing predicts its first response "
                                  "token; give the teacher's tokenizer a BOS token or a chat template")
            t_resp = tb.encode(symbols)
            if limit is not None:
                t_resp = t_resp[: max(0, limit - len(t_prompt))]
            t_symbols, row.teacher_starts = tb.spell(t_resp)
            row.teacher_prompt = t_prompt
            row.teacher_ids = t_resp
            row.teacher_pos = [len(t_prompt) + i - 1 for i in range(len(t_resp))]
            n = min(len(symbols), len(t_symbols))
            row.common = next((k for k in range(n) if symbols[k] != t_symbols[k]), n)
            rows.append(row)
            sequences.append(t_prompt + t_resp)
        spelled = [r for r in rows if r.symbols]
        if spelled and all(r.common == 0 for r in spelled):
            raise ConfigError("the teacher's tokenizer spells none of the batch's responses with the student's bytes "
                              "(e.g. it adds a SentencePiece dummy-prefix space); byte-level KD needs tokenizers that "
                              "spell text as it is (set the teacher tokenizer's add_prefix_space/add_dummy_prefix off)")
        needed = [[p for p in row.teacher_pos if p >= 0] for row in rows]
        logits, column = self.run_teacher(sequences, needed, batch["labels"].device)
        for row in rows:  # positions -> columns of the kept logits
            row.teacher_pos = [column[p] for p in row.teacher_pos]
        return rows, logits

    def run_teacher(self, sequences: list[list[int]], positions: list[list[int]],
                    device: torch.device) -> tuple[Tensor, dict[int, int]]:
        """The teacher's logits ``(N, K, V_T)`` on right-padded token sequences at the K
        positions any row asks for (``positions[n]``), and ``position -> column``. Models
        that accept transformers' ``logits_to_keep`` compute no others (the output layer of a
        262k-token vocabulary over whole prompts would dominate the step)."""
        tb = self.teacher_bytes
        pad = tb.tokenizer.pad_token_id if tb.tokenizer.pad_token_id is not None else tb.eos
        ids, mask = right_pad(sequences, pad, device)
        keep = sorted({p for row in positions for p in row}) or [0]
        extra = {}
        if self._keeps_logits:
            extra["logits_to_keep"] = torch.tensor(keep, device=device)
        with torch.no_grad():
            logits = self.teacher(input_ids=ids, attention_mask=mask, **extra)
            logits = getattr(logits, "logits", logits)[..., : len(tb)]
        if not self._keeps_logits:
            logits = logits[:, keep]
        return logits, {p: j for j, p in enumerate(keep)}

    @property
    def _keeps_logits(self) -> bool:
        import inspect

        return "logits_to_keep" in inspect.signature(self.teacher.forward).parameters

    @staticmethod
    def misaligned(rows: list[Row]) -> Tensor:
        """Share of rows whose two spellings part before the response ends."""
        return torch.tensor(sum(r.common < len(r.symbols) for r in rows) / max(1, len(rows)))


class ByteKD(CrossTokenizerRecipe):
    """Byte-level distillation with parallel byte heads (module docstring).

    Args:
        num_heads: parallel byte heads (bytes predicted per position); 10 in the paper.
        lam_byte: weight of the heads' cross-entropy on the true bytes.
        lam_kl: weight of the heads' KL to the teacher's byte marginals.
        lam_boundary_kl: weight of the KL between the teacher's and the student's own
            next-byte distribution at the student's token boundaries (0: off).
        detour_passes: inside a teacher token, also run the teacher after the token that
            spells the partial bytes exactly (one extra pass per such offset, batched), the
            path that otherwise leaks most (:func:`kd.bytes.detours`).
        hidden_size: width of the student's last hidden state (read from its config
            when null).
        chunked: the fused path for a student whose head is linear (module docstring).
        **kwargs: passed to :class:`kd.recipe.DistillationRecipe`.
    """

    needs = Needs(hidden_states=True, teacher_tokenizer="own", regimes=("offline", "on_policy", "mixed"),
                  data=("causal_lm",))

    def __init__(self, *, num_heads: int = 10, lam_byte: float = 1.0, lam_kl: float = 0.1,
                 lam_boundary_kl: float = 0.0, detour_passes: bool = True, hidden_size: int | None = None,
                 chunked: bool = True, **kwargs: Any) -> None:
        if num_heads < 1:
            raise ConfigError(f"recipe.num_heads must be >= 1 (got {num_heads}); it is the bytes predicted per position")
        if min(lam_byte, lam_kl, lam_boundary_kl) < 0:
            raise ConfigError("recipe.lam_byte, lam_kl and lam_boundary_kl must be >= 0")
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.lam_byte, self.lam_kl, self.lam_boundary_kl = lam_byte, lam_kl, lam_boundary_kl
        self.detour_passes = detour_passes
        self.chunked = bool(chunked)
        width = hidden_size or getattr(getattr(self.student, "config", None), "hidden_size", None)
        if width is None:
            raise ConfigError("cannot read the student's hidden size for the byte heads; set recipe.hidden_size")
        #: the parallel byte heads, ``(..., H) -> (..., num_heads * NUM_SYMBOLS)``; not part of the student
        self.byte_heads = nn.Linear(width, num_heads * NUM_SYMBOLS)

    def head_targets(self, rows: list[Row], teacher_logits: Tensor) -> dict[str, Tensor]:
        """Per query (a student response position) and head ``k``: ``row``/``pos`` of the
        query, ``true`` byte ``o + k`` (-1 past the response), the teacher's marginal
        ``target`` ``(Q, num_heads, NUM_SYMBOLS)``, ``valid`` (has a target) and ``leak``."""
        teacher_probs = torch.softmax(teacher_logits.float(), dim=-1)
        extra: list[dict[tuple[int, int], Tensor]] = [{} for _ in rows]
        if self.detour_passes:
            wanted = [(r, o, i, v) for r, row in enumerate(rows)
                      for o, i, v in detours(row.teacher_ids, self.teacher_bytes.index, row.student_starts)]
            if wanted:
                sequences = [rows[r].teacher_prompt + rows[r].teacher_ids[:i] + [v] for r, _, i, v in wanted]
                last = [len(seq) - 1 for seq in sequences]
                logits, column = self.run_teacher(sequences, [[p] for p in last], teacher_logits.device)
                cols = torch.tensor([column[p] for p in last], device=logits.device)
                after = torch.softmax(logits[torch.arange(len(sequences), device=logits.device), cols].float(), -1).cpu()
                for (r, o, _, v), p in zip(wanted, after):
                    extra[r][(o, v)] = p
        out: dict[str, list] = {"row": [], "pos": [], "true": [], "target": [], "valid": [], "leak": []}
        for r, row in enumerate(rows):
            if not row.student_pos:
                continue
            probs = teacher_probs[r, row.teacher_pos].cpu()
            target, valid, leak = marginal_byte_targets(probs, row.teacher_ids, self.teacher_bytes.index,
                                                        row.student_starts, self.num_heads, limit=row.common,
                                                        detour_probs=extra[r])
            padded = row.symbols + [-1] * self.num_heads
            out["true"].append(torch.tensor([padded[o: o + self.num_heads] for o in row.student_starts]))
            out["row"].append(torch.full((len(row.student_pos),), r))
            out["pos"].append(torch.tensor(row.student_pos))
            out["target"].append(target)
            out["valid"].append(valid)
            out["leak"].append(leak)
        return {k: torch.cat(v).to(teacher_logits.device) for k, v in out.items()}

    def compute_loss(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        out = self.outputs(self.student, batch, fused=self.fused_student)
        logits = out.logits
        token_ce = cross_entropy(logits, out.labels)
        rows, teacher_logits = self.align(batch)
        q = self.head_targets(rows, teacher_logits)
        states = out.hidden[q["row"], q["pos"]]
        log_q = torch.log_softmax(self.byte_heads(states).view(-1, self.num_heads, NUM_SYMBOLS).float(), dim=-1)
        true, valid = q["true"], q["valid"]
        byte_ce = reduce(-log_q.gather(-1, true.clamp(min=0).unsqueeze(-1)).squeeze(-1), true >= 0)
        byte_kl = reduce(forward_kl_per_position(log_q, torch.log(q["target"])), valid)
        # the student's own next byte at its token boundaries, exact from its token distribution
        first_map = self.student_bytes.first_map.to(token_ce.device)

        def next_bytes(z: Tensor) -> Tensor:
            return boundary_byte_probs(torch.softmax(z.float(), -1), first_map)

        if isinstance(logits, HeadLogits):  # C positions' rows at a time, checkpointed
            flat = q["row"] * logits.hidden.shape[1] + q["pos"]
            student_bytes = map_rows_grad(logits, next_bytes, flat)
        else:
            student_bytes = next_bytes(logits[q["row"], q["pos"]])
        boundary_kl = reduce(forward_kl_per_position(torch.log(student_bytes.clamp(min=1e-30)),
                                                     torch.log(q["target"][:, 0])), valid[:, 0])
        loss = token_ce + self.lam_byte * byte_ce + self.lam_kl * byte_kl
        if self.lam_boundary_kl > 0:
            loss = loss + self.lam_boundary_kl * boundary_kl
        leak = q["leak"][valid].mean() if valid.any() else token_ce.new_zeros(())
        return {"loss": loss, "token_ce": token_ce, "byte_ce": byte_ce, "byte_kl": byte_kl, "boundary_kl": boundary_kl,
                "byte_leak": leak, "misaligned": self.misaligned(rows)}


class ULD(CrossTokenizerRecipe):
    """Universal logit distillation on byte-offset-aligned positions (module docstring).

    Args:
        lam: weight of the ULD term next to the student's token cross-entropy.
        temperature: softmax temperature of both models in the ULD term.
        divergence: a divergence that accepts two vocabularies (``recipe=uld`` selects
            ``divergence=uld``, :class:`kd.divergences.ULD`).
        **kwargs: passed to :class:`kd.recipe.DistillationRecipe`.
    """

    needs = Needs(divergence=True, teacher_tokenizer="own", regimes=("offline", "on_policy", "mixed"),
                  data=("causal_lm",))

    def __init__(self, *, lam: float = 1.0, temperature: float = 1.0, divergence: Divergence | None = None,
                 **kwargs: Any) -> None:
        if divergence is not None and not divergence.cross_vocabulary:
            raise ConfigError(f"recipe uld compares distributions over two vocabularies, which {type(divergence).__name__} "
                              "cannot; use divergence=uld")
        if lam < 0 or not temperature > 0:
            raise ConfigError(f"recipe.lam must be >= 0 and recipe.temperature > 0 (got {lam}, {temperature})")
        super().__init__(divergence=divergence, **kwargs)
        self.lam = lam
        self.temperature = temperature

    def compute_loss(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        out = self.outputs(self.student, batch, fused=self.fused_student)
        logits = out.logits
        token_ce = cross_entropy(logits, out.labels)
        rows, teacher_logits = self.align(batch)
        s_index, t_index = [], []
        for r, row in enumerate(rows):
            teacher_at = {o: i for i, o in enumerate(row.teacher_starts) if o < row.common}
            for j, o in enumerate(row.student_starts):
                if o in teacher_at:
                    s_index.append((r, row.student_pos[j]))
                    t_index.append((r, row.teacher_pos[teacher_at[o]]))
        if s_index:
            rs, ps = torch.tensor(s_index).t()
            rt, pt = torch.tensor(t_index).t()
            uld = self.divergence(logits_at(logits, rs, ps), teacher_logits[rt, pt], temperature=self.temperature)
        else:
            uld = token_ce.new_zeros(())
        pairs = torch.tensor(len(s_index) / max(1, sum(len(r.student_pos) for r in rows)))
        return {"loss": token_ce + self.lam * uld, "token_ce": token_ce, "uld": uld, "aligned": pairs,
                "misaligned": self.misaligned(rows)}
