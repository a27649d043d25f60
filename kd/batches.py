"""The batch contract: what the keys of a batch mean, and the few functions every part of
kd that reads or makes batches shares.

A batch is a ``dict`` of tensors made by a datamodule's collate function (:mod:`kd.data`)
and possibly rewritten by a data regime (:mod:`kd.regimes`) before a recipe's step. Code
tests whether a batch holds a key through the names below (``batches.TEACHER_TOPK in
batch``) or the predicates (:func:`is_tokens`, :func:`is_masked_lm`, ...), never by a
string literal of its own.

==========================  =============================================================
key                         meaning
==========================  =============================================================
``input_ids``               ``(B, L)`` long, a token batch, right-padded: prompt then
                            response (causal LM) or the masked text (masked LM)
``attention_mask``          ``(B, L)`` long, 1 on real tokens of ``input_ids``
``labels``                  token batches: ``(B, L)`` the response tokens, IGNORE_INDEX on
                            prompt and padding (and on a transfer set's unlabelled rows);
                            masked LM: the original ids at the masked positions;
                            classification: ``(B,)`` class ids (IGNORE_INDEX: unlabelled)
``original_ids``            ``(B, L)`` the unmasked text: its presence means masked-LM
                            data (:mod:`kd.data.mlm`), whose positions are not shifted
``target_mask``             ``(B, L)`` bool, every response token whether labelled or not
                            (a transfer set with unlabelled rows): what soft targets cover
``prompt_ids``              ``(B, P)`` long, the prompts left-padded, what generation
                            starts from (on-policy regimes, generation evaluation); a batch
                            with prompts and no ``input_ids`` is prompts only
``prompt_mask``             ``(B, P)`` long, 1 on real tokens of ``prompt_ids``
``index``                   ``(B,)`` long, each example's position in its split (-1: none);
                            the logit cache finds a row's entries by it
``teacher_prompt_ids``      ``(B, P')`` the prompts in the teacher's own tokens,
                            left-padded (cross-tokenizer recipes)
``teacher_prompt_mask``     ``(B, P')`` 1 on real tokens of ``teacher_prompt_ids``
``privileged_prompt_ids``   ``(B, P')`` the prompts as the teacher sees them, in the data's
                            tokens, left-padded: each row's privileged context (a rule, the
                            reference answer, :mod:`kd.privileged`) and its prompt. Teachers
                            run on them followed by the batch's responses
                            (:func:`privileged_view`) and their outputs are re-aligned to the
                            batch's response positions (:func:`realign`)
``privileged_prompt_mask``  ``(B, P')`` 1 on real tokens of ``privileged_prompt_ids``
``teacher_index``           ``(B,)`` long, the row's teacher among routed teachers (its
                            position among their sorted names; -1: none)
``teacher_topk``            a :class:`kd.divergences.TopK` ``(B, L-1, k)``, the teacher read
                            from the logit cache (``regime=teacher_logits``): recipes then
                            run no teacher
``teacher_logits``          the teacher's logits already computed for this batch (MiniLLM's
                            language-model term computes them once per rollout buffer)
``inputs``                  ``(B, ...)`` float, a classification batch's features
``replaced``                ``(B, L)`` bool aligned with ``input_ids``: response tokens the
                            teacher wrote in place of the student's proposal
                            (``regime=speculative``)
==========================  =============================================================

Dataset items (before collation) use ``prompt_ids``, ``response_ids``, ``index``,
``teacher_prompt_ids``, ``teacher_index`` and ``labelled`` (a transfer set's row with a
gold label). Recipes' own rollout buffers add keys of their own (MiniLLM's ``rewards``,
``advantages``, ...), documented where they are made.

Functions: :func:`batch_targets` (labels and mask aligned with logits), :func:`outputs`
(one model call on a batch, :class:`Outputs`), :func:`left_pad` / :func:`right_pad`
(token-id lists to a padded batch), :func:`join_prompts_and_responses` /
:func:`join_rows` (prompts plus responses to a training batch) and :func:`privileged_view` /
:func:`realign` (the teacher's view of a batch with privileged prompts, and its outputs
moved back to the batch's positions). :data:`ROW_KEYS` names the
per-row keys that on-policy regimes carry from the data batch to the sampled one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from kd import ConfigError
from kd.data import IGNORE_INDEX
from kd.models import head_matches, mlm_head_matches, split_head, split_mlm_head
from kd.signals import HeadLogits, Outputs, TopK

# ----------------------------------------------------------------------------- keys

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
LABELS = "labels"
ORIGINAL_IDS = "original_ids"
TARGET_MASK = "target_mask"
PROMPT_IDS = "prompt_ids"
PROMPT_MASK = "prompt_mask"
INDEX = "index"
TEACHER_PROMPT_IDS = "teacher_prompt_ids"
TEACHER_PROMPT_MASK = "teacher_prompt_mask"
PRIVILEGED_PROMPT_IDS = "privileged_prompt_ids"
PRIVILEGED_PROMPT_MASK = "privileged_prompt_mask"
TEACHER_INDEX = "teacher_index"
TEACHER_TOPK = "teacher_topk"
TEACHER_LOGITS = "teacher_logits"
INPUTS = "inputs"
REPLACED = "replaced"

#: keys of dataset items (before collation) that are not batch keys
RESPONSE_IDS = "response_ids"
LABELLED = "labelled"

#: per-row facts an on-policy regime carries from the data batch to the batch it samples:
#: the prompts in a cross-tokenizer teacher's tokens, the routed teacher, the example index, the
#: teacher's privileged prompts
ROW_KEYS = (TEACHER_PROMPT_IDS, TEACHER_PROMPT_MASK, TEACHER_INDEX, INDEX, PRIVILEGED_PROMPT_IDS,
            PRIVILEGED_PROMPT_MASK)


def is_tokens(batch: Mapping[str, Any]) -> bool:
    """A token batch (causal or masked LM), as opposed to classification or prompts only."""
    return INPUT_IDS in batch


def is_masked_lm(batch: Mapping[str, Any]) -> bool:
    """A masked-LM batch: positions are not shifted, the mask holds every real token."""
    return ORIGINAL_IDS in batch


def is_causal_lm(batch: Mapping[str, Any]) -> bool:
    """A causal-LM token batch: logits of position i predict token i+1."""
    return is_tokens(batch) and not is_masked_lm(batch)


def is_prompts_only(batch: Mapping[str, Any]) -> bool:
    """Prompts without a training view (held-out generation evaluation)."""
    return PROMPT_IDS in batch and INPUT_IDS not in batch


def carried_rows(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The :data:`ROW_KEYS` ``batch`` holds, to carry into a batch sampled from its prompts."""
    return {k: batch[k] for k in ROW_KEYS if k in batch}


# ----------------------------------------------------------------------------- targets


def batch_targets(batch: Mapping[str, Any]) -> tuple[Any, Any]:
    """``(labels, mask)`` of a batch, aligned with a model's logits as recipes compare them:

    * token batches (``input_ids``): shifted, logits of position i predict token i+1, so
      labels drop the first position; the mask keeps response tokens (prompt and padding
      are IGNORE_INDEX), including those of a transfer set's unlabelled examples when the
      batch has a ``target_mask`` (their labels are IGNORE_INDEX: no hard loss there);
    * masked-LM batches (they also carry ``original_ids``, :mod:`kd.data.mlm`): no shift,
      labels at the masked positions, the mask holds every non-pad token;
    * classification (``inputs``): one position per example, every example in the mask.
    """
    if is_tokens(batch):
        if is_masked_lm(batch):
            return batch[LABELS], batch[ATTENTION_MASK].bool()
        labels = batch[LABELS][:, 1:]
        if TARGET_MASK in batch:
            return labels, batch[TARGET_MASK][:, 1:]
        return labels, labels != IGNORE_INDEX
    if INPUTS in batch:
        return batch[LABELS], torch.ones_like(batch[LABELS], dtype=torch.bool)
    raise ConfigError(
        f"batches with keys {sorted(batch)} are not a format recipes understand; use a datamodule "
        "from kd.data (classification: 'inputs'/'labels'; language models: 'input_ids'/'labels')"
    )


# ----------------------------------------------------------------------------- one model call


def outputs(model: nn.Module, batch: Mapping[str, Any], hidden: bool = False, fused: bool = False,
            vocab_size: int | None = None, role: str = "model") -> Outputs:
    """Run ``model`` on ``batch``; return its :class:`Outputs`.

    ``labels`` and ``mask`` are :func:`batch_targets`'s: token batches are shifted (logits
    and hidden states drop the last position), masked-LM batches are not, classification
    batches have one position per example. ``hidden`` also returns the last hidden states
    of a transformers model. ``vocab_size`` (the tokenizer's true vocabulary) cuts the
    logits, so a model whose output layer is padded past it compares with one that is not;
    a model with fewer logits is refused in one sentence naming its ``role``.

    ``fused``: a causal LM whose logits are a linear head over its last hidden states
    (:func:`kd.models.split_head`, checked once per model) returns ``logits`` as a
    :class:`kd.chunked.HeadLogits`: the ``(B, L, V)`` logits are never built. So does a
    masked LM whose head is a transform and a linear decoder (BERT, DistilBERT:
    :func:`kd.models.split_mlm_head`): its ``HeadLogits`` hold the transformed states
    (dense, activation, LayerNorm) and the decoder, ``hidden`` its body's last hidden
    states. Other models return logits.
    """
    labels, mask = batch_targets(batch)
    states = None
    if fused and is_causal_lm(batch) and head_matches(model, batch[INPUT_IDS], batch[ATTENTION_MASK]):
        body, head, softcap, scale = split_head(model)
        last = body(input_ids=batch[INPUT_IDS], attention_mask=batch[ATTENTION_MASK]).last_hidden_state[:, :-1]
        logits: Any = HeadLogits(last, head.weight, head.bias, softcap, scale)
        states = last if hidden else None
    elif fused and is_masked_lm(batch) and mlm_head_matches(model, batch[INPUT_IDS], batch[ATTENTION_MASK]):
        body, transform, decoder = split_mlm_head(model)
        last = body(input_ids=batch[INPUT_IDS], attention_mask=batch[ATTENTION_MASK]).last_hidden_state
        logits = HeadLogits(transform(last), decoder.weight, decoder.bias)
        states = last if hidden else None
    elif is_tokens(batch):
        extra = {"output_hidden_states": True} if hidden else {}
        out = model(input_ids=batch[INPUT_IDS], attention_mask=batch[ATTENTION_MASK], **extra)
        states = out.hidden_states[-1] if hidden else None
        logits = out.logits
        if not is_masked_lm(batch):  # causal LM: position i predicts token i+1
            logits = logits[:, :-1]
            states = states[:, :-1] if states is not None else None
    else:
        logits = model(batch[INPUTS])
        logits = getattr(logits, "logits", logits)
    if vocab_size is not None:
        if logits.shape[-1] < vocab_size:
            raise ConfigError(
                f"{'a' if role == 'model' else 'the'} {role} has {logits.shape[-1]} output logits but the tokenizer "
                f"{vocab_size} tokens; give the {role} a vocabulary at least as large as the tokenizer's"
            )
        logits = logits.with_vocab(vocab_size) if isinstance(logits, HeadLogits) else logits[..., :vocab_size]
    return Outputs(logits, labels, mask, states)


# ----------------------------------------------------------------------------- padding and joining


def _row(tokens: Sequence[int] | Tensor, device: torch.device | str | None) -> Tensor:
    return torch.as_tensor(tokens if torch.is_tensor(tokens) else list(tokens), dtype=torch.long, device=device)


def left_pad(
    sequences: Sequence[Sequence[int] | Tensor],
    pad_token_id: int = 0,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """Left-pad token-id lists into a batch (prompts, which generation continues).

    Args:
        sequences: ``B`` lists (or 1-D tensors) of token ids of any lengths.
        pad_token_id: the id written in the padding.
        device: where to put the tensors.

    Returns:
        ``(input_ids, attention_mask)``, both ``(B, max_len)`` long, padding on the left.
    """
    if len(sequences) == 0:
        raise ValueError("left_pad needs at least one sequence")
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), int(pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, s in enumerate(sequences):
        if len(s):
            input_ids[i, length - len(s):] = _row(s, None)
            attention_mask[i, length - len(s):] = 1
    return input_ids.to(device), attention_mask.to(device)


def right_pad(
    sequences: Sequence[Sequence[int] | Tensor],
    pad_token_id: int = 0,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """Right-pad token-id lists into a batch: ``(input_ids, attention_mask)``, both
    ``(B, max_len)`` long on ``device``, padding on the right."""
    if len(sequences) == 0:
        raise ValueError("right_pad needs at least one sequence")
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), int(pad_token_id), dtype=torch.long, device=device)
    attention_mask = torch.zeros_like(input_ids)
    for i, s in enumerate(sequences):
        if len(s):
            input_ids[i, : len(s)] = _row(s, device)
            attention_mask[i, : len(s)] = 1
    return input_ids, attention_mask


def join_rows(
    prompts: Sequence[Sequence[int] | Tensor],
    responses: Sequence[Sequence[int] | Tensor],
    pad_token_id: int,
    device: torch.device | str | None = None,
) -> dict[str, Tensor]:
    """A right-padded training batch from each row's prompt and response token ids:
    ``input_ids`` (prompt then response), ``attention_mask`` and ``labels`` (the response
    tokens; IGNORE_INDEX on prompt and padding)."""
    rows = [(_row(p, device), _row(r, device)) for p, r in zip(prompts, responses)]
    ids, mask = right_pad([torch.cat(pr) for pr in rows], pad_token_id, device)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for i, (p, r) in enumerate(rows):
        labels[i, len(p) : len(p) + len(r)] = r
    return {INPUT_IDS: ids, ATTENTION_MASK: mask, LABELS: labels}


def join_prompts_and_responses(
    prompt_ids: Tensor, prompt_mask: Tensor, responses: Tensor, response_mask: Tensor, pad_token_id: int
) -> dict[str, Tensor]:
    """A right-padded training batch from left-padded prompts ``(B, P)`` and generated
    responses ``(B, N)`` (``response_mask`` marks the tokens that count): ``input_ids``,
    ``attention_mask``, ``labels`` (IGNORE_INDEX on prompt and padding), plus the prompts."""
    joined = join_rows([p[m] for p, m in zip(prompt_ids, prompt_mask.bool())],
                       [r[m] for r, m in zip(responses, response_mask.bool())], pad_token_id, prompt_ids.device)
    return {**joined, PROMPT_IDS: prompt_ids, PROMPT_MASK: prompt_mask}


# ----------------------------------------------------------------------------- privileged prompts


def privileged_view(batch: Mapping[str, Any]) -> tuple[dict[str, Tensor], Tensor]:
    """The teacher's view of a causal-LM batch that carries ``privileged_prompt_ids``: each
    row's privileged prompt followed by the row's response (the tokens of ``input_ids``
    after its prompt, ``prompt_mask.sum()`` of them), right-padded, with ``labels`` on the
    response; and ``(B,)`` each row's shift, the privileged prompt's length minus the
    prompt's, by which the response moved to the right (:func:`realign` moves it back)."""
    if not is_causal_lm(batch) or PROMPT_MASK not in batch:
        raise ConfigError("a privileged context is prepended to prompts, so it needs prompt/response batches of a "
                          "causal language model (data=task, data=jsonl, ...)")
    prompt_len = batch[PROMPT_MASK].sum(-1)
    total = batch[ATTENTION_MASK].sum(-1)
    privileged = [q[m.bool()] for q, m in zip(batch[PRIVILEGED_PROMPT_IDS], batch[PRIVILEGED_PROMPT_MASK])]
    responses = [ids[int(p):int(t)] for ids, p, t in zip(batch[INPUT_IDS], prompt_len, total)]
    view = join_rows(privileged, responses, 0, batch[INPUT_IDS].device)  # any pad id: padding is masked out
    shift = batch[PRIVILEGED_PROMPT_MASK].sum(-1) - prompt_len
    return view, shift


def _gather_positions(x: Any, index: Tensor) -> Any:
    """``x[b, index[b, j]]`` along dimension 1 for a tensor ``(B, L', ...)``."""
    if x is None:
        return None
    idx = index.reshape(*index.shape, *([1] * (x.dim() - 2))).expand(*index.shape, *x.shape[2:])
    return x.gather(1, idx)


def realign(out: Outputs, shift: Tensor, batch: Mapping[str, Any]) -> Outputs:
    """Outputs of a model run on :func:`privileged_view` ``(B, L' - 1, ...)``, moved to the
    positions of ``batch`` ``(B, L - 1, ...)``: position ``j`` of row ``b`` takes position
    ``j + shift[b]`` of the view (positions with nothing there take a clamped neighbour,
    outside every response). Labels and mask are ``batch``'s (:func:`batch_targets`), so the
    teacher's distribution at each response token sits where the student's is."""
    labels, mask = batch_targets(batch)
    length = labels.shape[1]
    width = out.mask.shape[1]
    index = (torch.arange(length, device=shift.device) + shift[:, None]).clamp(0, max(width - 1, 0))
    logits = out.logits
    if isinstance(logits, HeadLogits):
        logits = HeadLogits(_gather_positions(logits.hidden, index), logits.weight, logits.bias, logits.softcap,
                            logits.scale)
    elif isinstance(logits, TopK):
        logits = TopK(_gather_positions(logits.ids, index), _gather_positions(logits.logprobs, index), logits.tail)
    else:
        logits = _gather_positions(logits, index)
    return Outputs(logits, labels, mask, _gather_positions(out.hidden, index))


__all__ = [
    "INPUT_IDS", "ATTENTION_MASK", "LABELS", "ORIGINAL_IDS", "TARGET_MASK", "PROMPT_IDS", "PROMPT_MASK", "INDEX",
    "TEACHER_PROMPT_IDS", "TEACHER_PROMPT_MASK", "PRIVILEGED_PROMPT_IDS", "PRIVILEGED_PROMPT_MASK", "TEACHER_INDEX",
    "TEACHER_TOPK", "TEACHER_LOGITS", "INPUTS", "REPLACED",
    "RESPONSE_IDS", "LABELLED", "ROW_KEYS", "is_tokens", "is_masked_lm", "is_causal_lm", "is_prompts_only",
    "carried_rows", "batch_targets", "Outputs", "outputs", "left_pad", "right_pad", "join_rows",
    "join_prompts_and_responses", "privileged_view", "realign", "IGNORE_INDEX",
]
