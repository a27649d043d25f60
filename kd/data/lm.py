"""Prompt/response data for language models: tokenization, collation, datamodule.

An example is a prompt and a response (:class:`kd.data.tasks.Example`). It is rendered
with the tokenizer's chat template when it has one (the user turn, then the generation
prompt), tokenized as ``prompt_ids`` and ``response_ids + [eos]`` separately (so the
boundary never merges across prompt and response) and concatenated.

Batches (what recipes receive):

* training / teacher-forced evaluation, right-padded: ``input_ids`` (B, L),
  ``attention_mask`` (B, L), ``labels`` (B, L) equal to ``input_ids`` on response tokens
  (EOS included) and :data:`kd.data.IGNORE_INDEX` on prompt and padding; position i of
  the logits predicts token i+1 (the recipe shifts); plus the same prompts left-padded
  (``prompt_ids``, ``prompt_mask``) for on-policy generation, and ``index`` (B,) the
  examples' positions in their split (a teacher logit cache looks its rows up by it);
* generation evaluation, left-padded prompts: ``prompt_ids`` (B, P), ``prompt_mask``
  (B, P), ``index`` (B,) the examples' positions in their split, to score the generated
  answers against the references (exact match, per skill).

The examples come from a source of :mod:`kd.data.sources`, which gives
``{"train": [...], "val": [...], "test": [...]}`` lists of them (the embedded task, local
files, hub datasets, chatterbot-corpus, plain-text windows).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from kd import ConfigError, batches
from kd.batches import join_rows, left_pad
from kd.data import IGNORE_INDEX, ResumableData, eval_sampler, train_sampler
from kd.data.tasks import Example

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- tokenization


def render_prompt(tokenizer: Any, prompt: str, chat_template: bool = True) -> str:
    """The prompt as the model sees it: the chat template's user turn plus generation
    prompt when the tokenizer has a template (and ``chat_template``), else the raw prompt."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
    return prompt


def encode_prompt(tokenizer: Any, prompt: str, chat_template: bool = True) -> list[int]:
    """The prompt's token ids as the model sees them (:func:`render_prompt`)."""
    templated = chat_template and getattr(tokenizer, "chat_template", None)
    ids = tokenizer(render_prompt(tokenizer, prompt, chat_template), add_special_tokens=False)["input_ids"]
    if not templated and tokenizer.bos_token_id is not None:
        # no template: start like the tokenizer itself would (e.g. Gemma's <bos>)
        if tokenizer("", add_special_tokens=True)["input_ids"] == [tokenizer.bos_token_id]:
            ids = [tokenizer.bos_token_id, *ids]
    return ids


def encode_example(tokenizer: Any, example: Example, max_length: int, chat_template: bool = True,
                   prompt_text: str | None = None) -> tuple[list[int], list[int]] | None:
    """``(prompt_ids, response_ids + [eos])``, the response truncated to fit ``max_length``;
    None when the prompt alone leaves no room for a response token. ``prompt_text``
    replaces the example's prompt (a privileged prompt the student is shown)."""
    prompt = encode_prompt(tokenizer, example.prompt if prompt_text is None else prompt_text, chat_template)
    response = tokenizer(example.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(prompt) >= max_length:
        return None
    return prompt, response[: max_length - len(prompt)]


class EncodedSplit(Dataset):
    """One split: examples and their token ids."""

    def __init__(self, examples: list[Example], encoded: list[tuple[list[int], list[int]]],
                 teacher_prompts: list[list[int]] | None = None, teacher_index: list[int] | None = None,
                 privileged_prompts: list[list[int]] | None = None) -> None:
        self.examples = examples
        self.encoded = encoded
        self.teacher_prompts = teacher_prompts
        self.teacher_index = teacher_index
        self.privileged_prompts = privileged_prompts
        #: positions of the examples whose answers are not labels (a transfer set)
        self.unlabelled = {i for i, ex in enumerate(examples) if not getattr(ex, "labelled", True)}

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, i: int) -> dict[str, Any]:
        prompt, response = self.encoded[i]
        item = {"prompt_ids": prompt, "response_ids": response, "index": i}
        if self.unlabelled:
            item["labelled"] = i not in self.unlabelled
        if self.teacher_prompts is not None:
            item["teacher_prompt_ids"] = self.teacher_prompts[i]
        if self.teacher_index is not None:
            item["teacher_index"] = self.teacher_index[i]
        if self.privileged_prompts is not None:
            item["privileged_prompt_ids"] = self.privileged_prompts[i]
        return item


def collate_train(items: list[dict], pad_token_id: int, teacher_pad_id: int | None = None) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (prompt and padding
    ignored), plus the left-padded ``prompt_ids``/``prompt_mask`` that on-policy regimes
    generate from, the examples' ``index`` in their split (-1 for items without one), and
    ``teacher_prompt_ids``/``teacher_prompt_mask`` when the items carry the teacher's own
    prompt tokens. When items say whether they are ``labelled`` (a transfer set), the
    unlabelled ones get no ``labels`` and ``target_mask`` (B, L) marks every response token,
    labelled or not: what soft targets cover (:func:`kd.batches.batch_targets`)."""
    joined = join_rows([it["prompt_ids"] for it in items], [it["response_ids"] for it in items], pad_token_id)
    labels = joined[batches.LABELS]
    prompts = collate_prompts(items, pad_token_id, teacher_pad_id)
    batch = {**joined, **prompts}
    if batches.LABELLED in items[0]:
        batch["target_mask"] = labels != IGNORE_INDEX
        labels[~torch.tensor([bool(it["labelled"]) for it in items])] = IGNORE_INDEX
    return batch


def collate_prompts(items: list[dict], pad_token_id: int, teacher_pad_id: int | None = None) -> dict[str, torch.Tensor]:
    """Left-padded ``prompt_ids`` / ``prompt_mask``, the examples' ``index``, and the
    teacher's own left-padded prompts (``teacher_prompt_ids``, ``privileged_prompt_ids``)
    when the items carry them."""
    ids, mask = left_pad([it["prompt_ids"] for it in items], pad_token_id)
    out = {"prompt_ids": ids, "prompt_mask": mask, "index": torch.tensor([it.get("index", -1) for it in items])}
    if batches.TEACHER_INDEX in items[0]:  # each example's teacher among routed teachers (-1: none)
        out["teacher_index"] = torch.tensor([it["teacher_index"] for it in items])
    if batches.TEACHER_PROMPT_IDS in items[0]:
        pad = pad_token_id if teacher_pad_id is None else teacher_pad_id
        out["teacher_prompt_ids"], out["teacher_prompt_mask"] = left_pad([it["teacher_prompt_ids"] for it in items], pad)
    if batches.PRIVILEGED_PROMPT_IDS in items[0]:  # the same tokenizer: the data's padding
        out[batches.PRIVILEGED_PROMPT_IDS], out[batches.PRIVILEGED_PROMPT_MASK] = left_pad(
            [it[batches.PRIVILEGED_PROMPT_IDS] for it in items], pad_token_id)
    return out


# ----------------------------------------------------------------------------- tokenizer


def _trained_tokenizer(examples: list[Example], vocab_size: int, min_frequency: int, cache_dir: str | None,
                       fingerprint: dict):
    """A BPE tokenizer trained on the training examples, cached (``<cache_dir>/tokenizers/``,
    see :mod:`kd.cache`) by a hash of the data's fingerprint and the training settings."""
    from kd.cache import Cache, key
    from kd.data.tokenizer import task_tokenizer
    from kd.models import load_tokenizer

    if cache_dir is None:
        return task_tokenizer(examples, vocab_size=vocab_size, min_frequency=min_frequency)
    loaded: dict[str, Any] = {}

    def validate(directory: Path) -> None:  # raises when the stored tokenizer cannot be read
        loaded["tokenizer"] = load_tokenizer(str(directory))

    def build(directory: Path) -> dict[str, Any]:
        tok = task_tokenizer(examples, vocab_size=vocab_size, min_frequency=min_frequency)
        tok.save_pretrained(directory)
        return {"vocab_size": vocab_size, "min_frequency": min_frequency, "examples": len(examples)}

    name = f"bpe{vocab_size}-{key(fingerprint, vocab_size, min_frequency)}"
    directory = Cache(cache_dir).get_or_build("tokenizers", name, build=build, validate=validate,
                                              what="trained tokenizer")
    # a reused entry was loaded by validate; a fresh one is read back like any later run reads it
    return loaded["tokenizer"] if "tokenizer" in loaded else load_tokenizer(str(directory))


class _PrivilegedTrain:
    """Which training examples show the student their privileged prompt (a seeded share)."""

    def __init__(self, context: Any, share: float) -> None:
        self.context, self.share = context, share

    def __call__(self, examples: Sequence[Example]) -> set[int]:
        import random

        rng = random.Random("kd.data.lm/privileged_train")
        return set(rng.sample(range(len(examples)), round(self.share * len(examples))))


def _privileged_train(setting: Mapping[str, Any] | None) -> _PrivilegedTrain | None:
    if not setting:
        return None
    from kd.privileged import PrivilegedContext

    setting = dict(setting)
    share = float(setting.pop("share", 0.5))
    if not 0.0 < share <= 1.0:
        raise ConfigError(f"data.privileged_train.share must be in (0, 1] (got {share}); it is the share of training "
                          "examples shown their privileged prompt")
    unknown = set(setting) - {"context", "rules", "template"}
    if unknown or "context" not in setting:
        raise ConfigError(f"data.privileged_train takes context, share, rules and template (got {sorted(setting)}); "
                          "e.g. {context: rule, share: 0.5}")
    return _PrivilegedTrain(PrivilegedContext(str(setting["context"]), setting.get("rules"),
                                              setting.get("template") or "{context}\n{prompt}"), share)


class LMDataModule(ResumableData, L.LightningDataModule):
    """Prompt/response data for causal LMs.

    Args:
        source: a source of :mod:`kd.data.sources` (:class:`~kd.data.sources.TaskSource`,
            :class:`~kd.data.sources.JsonlSource`, ...) or anything with ``load()``
            returning ``{"train", "val", "test"}`` lists of examples and ``fingerprint()``.
        tokenizer: hub name or directory of the tokenizer; null trains a byte-level BPE
            of ``vocab_size`` tokens on the training data (cached under ``cache_dir``).
        vocab_size: size of the locally trained tokenizer (an upper bound models can use).
        min_frequency: a pair must occur this often to become a merge of that tokenizer
            (high values keep only frequent words merged, e.g. the instructions of the
            embedded task, and leave random letter strings as single characters).
        batch_size: training batch size; ``eval_batch_size`` for evaluation.
        max_length: longest prompt + response in tokens (longer responses are truncated,
            examples whose prompt alone is too long are dropped with a warning).
        generation_eval_size: held-out prompts per split whose greedy answers are scored
            by exact match at every validation and at test (0 turns it off).
        max_new_tokens: generation budget of that evaluation.
        cache_dir: where trained tokenizers are cached (``paths.cache_dir``).
        teacher_tokenizer: the teacher's own tokenizer (name, directory or object) when it
            differs from the data's: batches then also carry each prompt in the teacher's
            tokens and chat template (``teacher_prompt_ids``/``teacher_prompt_mask``), for
            cross-tokenizer recipes (``recipes/byte_kd.py``; ``kd`` sets it for them).
        routes: ``{skill: teacher name}`` for runs with several named teachers (``teachers:``):
            batches then carry ``teacher_index``, each example's teacher among
            :attr:`teacher_names` (-1 for a skill without a route). The skill is the task's,
            or a record's ``skill`` field in local/hub data.
        train_skills: train only on examples of these skills (None: all); the tokenizer and
            the held-out splits still come from all of them, so runs on different skills (the
            stages of a pipeline, their teachers) share one tokenizer.
        chat_template: render prompts with the tokenizer's chat template (when it has one);
            false feeds them as they are, as for plain text (:class:`kd.data.sources.TextWindows`).
        privileged: ``example -> text``, the prompt as the teacher sees it (its privileged
            context and the prompt, :class:`kd.privileged.PrivilegedContext`; ``kd`` sets it
            from ``teacher.context``): batches then also carry it in the data's tokens
            (``privileged_prompt_ids``/``privileged_prompt_mask``), which teachers read
            instead of the prompt (:mod:`kd.teachers`).
        privileged_train: ``{context: rule|reference, share: s}`` (and optionally ``rules``,
            ``template``, as ``teacher.*`` of conf/teacher/self.yaml): a seeded share ``s`` of
            the training examples show the *student* the privileged prompt instead of the
            plain one, so it learns to read the context (an SFT's data, e.g.
            ``+student_sft.data.privileged_train={context: rule, share: 0.5}``); held-out
            splits keep their plain prompts.
    """

    #: the models this data is for (kd.models.KINDS; checked by kd.build)
    kd_kind = "causal_lm"

    def __init__(
        self,
        source: Any,
        tokenizer: str | None = None,
        vocab_size: int = 512,
        min_frequency: int = 2,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        max_length: int = 128,
        generation_eval_size: int = 200,
        max_new_tokens: int = 32,
        num_workers: int = 0,
        cache_dir: str | None = None,
        teacher_tokenizer: Any = None,
        routes: Mapping[str, str] | None = None,
        train_skills: Sequence[str] | None = None,
        chat_template: bool = True,
        privileged: Any = None,
        privileged_train: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1 or max_length < 2:
            raise ConfigError(f"data.batch_size must be >= 1 and data.max_length >= 2 (got {batch_size}, {max_length})")
        self.source = source
        self.tokenizer_name = tokenizer
        self.vocab_size = vocab_size
        self.min_frequency = min_frequency
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.max_length = max_length
        self.generation_eval_size = generation_eval_size
        self.max_new_tokens = max_new_tokens
        self.num_workers = num_workers
        self.cache_dir = cache_dir
        self.tokenizer: Any = None
        self.teacher_tokenizer = teacher_tokenizer
        self.routes = dict(routes) if routes else None
        self.train_skills = list(train_skills) if train_skills else None
        self.chat_template = chat_template
        self.privileged = privileged
        self.privileged_train = _privileged_train(privileged_train)
        #: the routed teachers' names in ``teacher_index`` order (``kd`` sets the run's)
        self.teacher_names: list[str] | None = sorted(set(self.routes.values())) if self.routes else None
        self.splits: dict[str, EncodedSplit] = {}

    def _raw(self) -> dict[str, list[Example]]:
        raw = self.source.load()
        if not raw.get("train"):
            raise ConfigError("the training split is empty; give the data source at least one example")
        return raw

    def load_tokenizer(self, raw: dict[str, list[Example]] | None = None) -> Any:
        """The data's tokenizer (``tokenizer``, else trained on the training split and
        cached), without encoding any example."""
        if self.tokenizer is None:
            if self.tokenizer_name:
                from kd.models import load_tokenizer

                self.tokenizer = load_tokenizer(self.tokenizer_name)
            else:
                train = (raw or self._raw())["train"]
                self.tokenizer = _trained_tokenizer(train, self.vocab_size, self.min_frequency, self.cache_dir,
                                                    self.source.fingerprint())
        return self.tokenizer

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        raw = self._raw()
        self.load_tokenizer(raw)
        if self.train_skills:
            available = sorted({ex.skill for ex in raw["train"]})
            raw["train"] = [ex for ex in raw["train"] if ex.skill in set(self.train_skills)]
            if not raw["train"]:
                raise ConfigError(f"data.train_skills={self.train_skills} selects no training example; choose among "
                                  f"{available}")
        if isinstance(self.teacher_tokenizer, str):
            from kd.models import load_tokenizer

            self.teacher_tokenizer = load_tokenizer(self.teacher_tokenizer)
        for split, examples in raw.items():
            kept, encoded = [], []
            shown = self.privileged_train(examples) if split == "train" and self.privileged_train else set()
            for i, ex in enumerate(examples):
                enc = encode_example(self.tokenizer, ex, self.max_length, self.chat_template,
                                     self.privileged_train.context(ex) if i in shown else None)
                if enc is not None:
                    kept.append(ex)
                    encoded.append(enc)
            if len(kept) < len(examples):
                log.warning("%s: dropped %d of %d examples whose prompt exceeds max_length=%d tokens",
                            split, len(examples) - len(kept), len(examples), self.max_length)
            if not kept:
                raise ConfigError(f"no {split} example fits data.max_length={self.max_length}; raise it")
            teacher = self.teacher_tokenizer
            prompts = ([encode_prompt(teacher, ex.prompt, self.chat_template) for ex in kept]
                       if teacher is not None else None)
            privileged = ([encode_prompt(self.tokenizer, self.privileged(ex), self.chat_template) for ex in kept]
                          if self.privileged is not None else None)
            routed = None
            if self.routes:
                names = self.teacher_names
                routed = [names.index(self.routes[ex.skill]) if ex.skill in self.routes else -1 for ex in kept]
            self.splits[split] = EncodedSplit(kept, encoded, prompts, routed, privileged)

    # -- loaders
    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def teacher_pad_id(self) -> int | None:
        return self.teacher_tokenizer.pad_token_id if self.teacher_tokenizer is not None else None

    def _train_like(self, split: str, shuffle: bool) -> DataLoader:
        self.setup()
        ds = self.splits[split]
        return DataLoader(ds, batch_size=self.batch_size if shuffle else self.eval_batch_size,
                          sampler=train_sampler(ds, self, self.batch_size) if shuffle else eval_sampler(ds, self),
                          num_workers=self.num_workers,
                          collate_fn=lambda b: collate_train(b, self.pad_token_id, self.teacher_pad_id))

    def _prompts(self, split: str) -> DataLoader:
        ds = self.splits[split]
        subset = torch.utils.data.Subset(ds, range(min(self.generation_eval_size, len(ds))))
        return DataLoader(subset, batch_size=self.eval_batch_size, sampler=eval_sampler(subset, self),
                          num_workers=self.num_workers,
                          collate_fn=lambda b: collate_prompts(b, self.pad_token_id, self.teacher_pad_id))

    def train_dataloader(self) -> DataLoader:
        return self._train_like("train", shuffle=True)

    def _eval(self, split: str) -> list[DataLoader]:
        self.setup()
        loaders = [self._train_like(split, shuffle=False)]
        if self.generation_eval_size > 0:
            loaders.append(self._prompts(split))
        return loaders

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval("val")

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval("test")

    # -- what generative regimes use (kd.regimes.PromptData)
    def prompts(self, split: str = "train") -> list[list[int]]:
        """The split's prompts as token ids (chat template applied), in dataset order."""
        self.setup()
        return [list(p) for p, _ in self.splits[split].encoded]

    def references(self, split: str = "train") -> list[str]:
        """The split's dataset responses as text, in dataset order."""
        self.setup()
        return [ex.response for ex in self.splits[split].examples]

    def replace_responses(self, split: str, responses: Sequence[Sequence[int] | None]) -> int:
        """Train on ``responses`` (one per example, token ids) instead of the dataset's;
        None or empty keeps the dataset response. Each is cut so prompt + response fit
        ``max_length``. Returns how many were replaced."""
        self.setup()
        encoded = self.splits[split].encoded
        if len(responses) != len(encoded):
            raise ConfigError(f"{len(responses)} responses for {len(encoded)} {split} examples; regenerate them")
        replaced = 0
        for i, response in enumerate(responses):
            if response:
                prompt = encoded[i][0]
                encoded[i] = (prompt, list(response)[: self.max_length - len(prompt)])
                self.splits[split].unlabelled.discard(i)  # the teacher's answer is its label
                replaced += 1
        return replaced

    # -- scoring
    def score(self, split: str, predictions: dict[int, str]) -> dict[str, float]:
        """Exact match of generated answers (by example index) against the references."""
        from kd.data.tasks import score

        examples = self.splits[split].examples
        idx = sorted(predictions)
        return score([predictions[i] for i in idx], [examples[i] for i in idx])
