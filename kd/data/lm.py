"""Prompt/response data for language models: sources, tokenization, collation, datamodule.

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

Sources give ``{"train": [...], "val": [...], "test": [...]}`` lists of examples:
:class:`TaskSource` (the embedded generative task), :class:`JsonlSource` (local
``.jsonl``/``.json``/``.parquet`` files with ``prompt``/``response`` fields or chat
``messages``), :class:`HFDatasetSource`, :class:`ChatterbotSource` (real questions and
answers) and :class:`TextWindows` (plain text for language modelling: empty prompts, used
with ``chat_template=False``).
"""

from __future__ import annotations

import json
import logging
import os
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

# ----------------------------------------------------------------------------- sources


class TaskSource:
    """The embedded generative task of :mod:`kd.data.tasks` (deterministic from ``seed``);
    ``noise`` and ``gold_fraction`` degrade its training split (:func:`kd.data.tasks.degrade`:
    wrong answers, a transfer set without labels)."""

    def __init__(self, train_size: int = 20000, val_size: int = 300, test_size: int = 1000, seed: int = 0,
                 skills: Sequence[str] | None = None, gold_fraction: float = 1.0, noise: float = 0.0) -> None:
        self.kwargs = dict(train_size=train_size, val_size=val_size, test_size=test_size, seed=seed,
                           skills=list(skills) if skills else None)
        self.degraded = dict(gold_fraction=gold_fraction, noise=noise)

    def load(self) -> dict[str, list[Example]]:
        from kd.data.tasks import degrade, make_task

        splits = make_task(**self.kwargs)
        if self.degraded != {"gold_fraction": 1.0, "noise": 0.0}:
            splits["train"] = degrade(splits["train"], **self.degraded, seed=self.kwargs["seed"])
        return splits

    def fingerprint(self) -> dict:
        if self.degraded == {"gold_fraction": 1.0, "noise": 0.0}:
            return {"task": self.kwargs}  # the keys of caches built before these options existed
        return {"task": self.kwargs, "degraded": self.degraded}


def _read_records(path: Path) -> list[dict]:
    if not path.is_file():
        raise ConfigError(f"data file '{path}' does not exist; pass an existing .jsonl, .json or .parquet file")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq  # optional dependency, only for parquet files

        return pq.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"'{path}' is not valid JSON ({e}); fix the file or convert it to one object per line") from e
        if not isinstance(records, list):
            raise ConfigError(f"'{path}' must hold a JSON list of objects")
        return records
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ConfigError(f"'{path}' line {n} is not valid JSON ({e.msg}); each line must be one JSON object") from e
    return records


def _to_example(record: Any, origin: str, n: int, prompt_key: str, response_key: str) -> Example:
    if isinstance(record, dict) and "messages" in record:
        msgs = record["messages"]
        users = [m.get("content", "") for m in msgs if m.get("role") == "user"]
        answers = [m.get("content", "") for m in msgs if m.get("role") == "assistant"]
        if users and answers:
            return Example(prompt=users[-1], response=answers[-1], skill=str(record.get("skill", "data")))
    elif isinstance(record, dict) and prompt_key in record and response_key in record:
        return Example(prompt=str(record[prompt_key]), response=str(record[response_key]),
                       skill=str(record.get("skill", "data")))
    raise ConfigError(
        f"{origin} record {n} has neither '{prompt_key}'/'{response_key}' fields nor chat 'messages' with a "
        "user and an assistant turn; rename the fields or set data.source.prompt_key/response_key"
    )


def hold_out(train: list[Example], given: dict[str, list[Example] | None], fractions: dict[str, float],
              seed: int, name: str) -> dict[str, list[Example]]:
    """Splits ``train``/``val``/``test``: a held-out split not ``given`` takes its fraction of
    ``train`` (a fixed seeded permutation), the rest stays for training."""
    splits: dict[str, list[Example]] = {}
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    held = 0
    for split in ("val", "test"):
        if given.get(split) is not None:
            splits[split] = given[split]
        else:
            k = max(1, int(fractions[split] * len(train)))
            splits[split] = [train[i] for i in order[held : held + k]]
            held += k
    splits["train"] = [train[i] for i in order[held:]]
    if not splits["train"]:
        raise ConfigError(f"{name} is too small to hold out val/test; add records or give separate val/test splits")
    return splits


def _examples_from(records: list[Any], origin: Any, prompt_key: str, response_key: str) -> list[Example]:
    if not records:
        raise ConfigError(f"{origin} holds no records; give it at least one prompt/response pair")
    return [_to_example(r, origin, n, prompt_key, response_key) for n, r in enumerate(records, 1)]


class JsonlSource:
    """Local files of prompt/response records (``.jsonl``, ``.json`` list or ``.parquet``).

    Args:
        train: path of the training file.
        val, test: paths of held-out files; when missing, ``val_fraction`` / ``test_fraction``
            of the training records (a fixed seeded split) are held out instead.
        prompt_key, response_key: field names; records with chat ``messages`` use the
            last user turn as prompt and the last assistant turn as response.
    """

    def __init__(self, train: str, val: str | None = None, test: str | None = None, prompt_key: str = "prompt",
                 response_key: str = "response", val_fraction: float = 0.05, test_fraction: float = 0.05,
                 seed: int = 0) -> None:
        self.paths = {"train": train, "val": val, "test": test}
        self.prompt_key, self.response_key = prompt_key, response_key
        self.fractions = {"val": val_fraction, "test": test_fraction}
        self.seed = seed

    def _examples(self, path: str) -> list[Example]:
        p = Path(path).expanduser()
        return _examples_from(_read_records(p), f"data file '{p}'", self.prompt_key, self.response_key)

    def load(self) -> dict[str, list[Example]]:
        given = {s: self._examples(self.paths[s]) if self.paths[s] else None for s in ("val", "test")}
        return hold_out(self._examples(self.paths["train"]), given, self.fractions, self.seed,
                         f"'{self.paths['train']}'")

    def fingerprint(self) -> dict:
        stats = {k: (str(v), os.path.getmtime(v), os.path.getsize(v)) for k, v in self.paths.items() if v}
        return {"files": stats, "keys": [self.prompt_key, self.response_key], "fractions": self.fractions,
                "seed": self.seed}


def _plain(value: Any) -> Any:
    """Hydra hands lists and dicts over as OmegaConf containers; libraries want plain ones."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    return OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value


class HFDatasetSource:
    """Prompt/response records through ``datasets.load_dataset``: a hub dataset by name
    (downloaded by ``datasets`` into its own cache: the only network access, and only
    because the user named it), a local dataset directory, or a builder such as ``json`` /
    ``parquet`` / ``csv`` with ``data_files``.

    Args:
        path: hub name (``"org/dataset"``), local directory, or builder name.
        name: the dataset's configuration (subset), if it has several.
        data_files: files for a builder (a path, list, or ``{split: path}``).
        train_split, val_split, test_split: split names; a missing held-out split takes
            ``val_fraction`` / ``test_fraction`` of the training split.
        prompt_key, response_key: field names (or chat ``messages``), as in :class:`JsonlSource`.
        max_examples: keep the first N training records (None: all).
        revision: a hub revision (commit, tag or branch) for reproducible runs.
    """

    def __init__(self, path: str, name: str | None = None, data_files: Any = None, train_split: str = "train",
                 val_split: str | None = None, test_split: str | None = None, prompt_key: str = "prompt",
                 response_key: str = "response", val_fraction: float = 0.05, test_fraction: float = 0.05,
                 max_examples: int | None = None, revision: str | None = None, seed: int = 0) -> None:
        self.args = dict(path=path, name=name, data_files=data_files, revision=revision)
        self.splits = {"train": train_split, "val": val_split, "test": test_split}
        self.prompt_key, self.response_key = prompt_key, response_key
        self.fractions = {"val": val_fraction, "test": test_fraction}
        self.max_examples, self.seed = max_examples, seed

    def _load_split(self, split: str) -> list[Example]:
        try:
            import datasets
        except ImportError as e:
            raise ConfigError("data.source HFDatasetSource needs the datasets library; pip install 'kd[data]'") from e
        kwargs = {k: _plain(v) for k, v in self.args.items() if v is not None}
        try:
            ds = datasets.load_dataset(**kwargs, split=split)
        except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as e:
            raise ConfigError(f"datasets could not load split '{split}' of '{self.args['path']}' ({e}); "
                              "check data.source.path/name/data_files and the split names") from e
        if split == self.splits["train"] and self.max_examples:
            ds = ds.select(range(min(self.max_examples, len(ds))))
        origin = f"dataset '{self.args['path']}' split '{split}'"
        return _examples_from(ds.to_list(), origin, self.prompt_key, self.response_key)

    def load(self) -> dict[str, list[Example]]:
        given = {s: self._load_split(self.splits[s]) if self.splits[s] else None for s in ("val", "test")}
        return hold_out(self._load_split(self.splits["train"]), given, self.fractions, self.seed,
                         f"dataset '{self.args['path']}'")

    def fingerprint(self) -> dict:
        local = Path(str(self.args["path"])).expanduser()
        stamp = os.path.getmtime(local) if local.exists() else None
        return {"hf_dataset": {k: str(v) for k, v in self.args.items()}, "stamp": stamp, "splits": self.splits,
                "keys": [self.prompt_key, self.response_key], "fractions": self.fractions,
                "max_examples": self.max_examples, "seed": self.seed}


class ChatterbotSource:
    """Real English questions and answers, offline: the ``chatterbot-corpus`` package's YAML
    conversations (2,026 conversations in 21 categories; each consecutive pair of turns is
    one prompt/response example, 2,393 in all). ``pip install chatterbot-corpus`` (or
    ``kd[data]``).

    Args:
        categories: file names of ``chatterbot_corpus/data/english`` without ``.yml``
            (e.g. ``[greetings, science]``); None: all.
        val_fraction, test_fraction, seed: the held-out splits, as in :class:`JsonlSource`.
    """

    def __init__(self, categories: Sequence[str] | None = None, val_fraction: float = 0.05,
                 test_fraction: float = 0.05, seed: int = 0) -> None:
        self.categories = sorted(categories) if categories else None
        self.fractions = {"val": val_fraction, "test": test_fraction}
        self.seed = seed

    @staticmethod
    def directory() -> Path:
        try:
            import chatterbot_corpus
        except ImportError as e:
            raise ConfigError("data=chatterbot needs the chatterbot-corpus package; pip install chatterbot-corpus") from e
        return Path(chatterbot_corpus.__file__).parent / "data" / "english"

    @classmethod
    def conversations(cls, categories: Sequence[str] | None = None) -> list[tuple[str, list[str]]]:
        """``(category, turns)`` of every English conversation (of ``categories``, or all),
        turns stripped, in a fixed order."""
        import yaml

        folder = cls.directory()
        available = sorted(p.stem for p in folder.glob("*.yml"))
        unknown = sorted(set(categories or []) - set(available))
        if unknown:
            raise ConfigError(f"chatterbot-corpus has no categories {unknown}; choose among {available}")
        out = []
        for category in sorted(categories) if categories else available:
            for turns in yaml.safe_load((folder / f"{category}.yml").read_text(encoding="utf-8"))["conversations"]:
                out.append((category, [str(t).strip() for t in turns]))
        return out

    def load(self) -> dict[str, list[Example]]:
        examples = [Example(prompt=a, response=b, skill=category)
                    for category, turns in self.conversations(self.categories)
                    for a, b in zip(turns, turns[1:]) if a and b]
        return hold_out(examples, {}, self.fractions, self.seed, "chatterbot-corpus")

    def fingerprint(self) -> dict:
        return {"chatterbot": self.categories, "fractions": self.fractions, "seed": self.seed}


class TextWindows:
    """Plain text for language modelling: each document of a corpus cut into windows of
    ``words`` whitespace-separated words, each window one example with an empty prompt,
    so the loss covers every token (use with ``chat_template: false``). Held-out splits
    are by document, so no test window shares a document with a training window.

    Args:
        corpus: ``lee``, ``wiki``, ``chatterbot`` or a text file (:class:`kd.data.mlm.TextSource`).
        words: words per window (about 1.3 tokens per word for English BPEs; windows longer
            than ``max_length`` tokens are cut).
        max_windows: keep at most this many training windows (the first ones in the
            split's fixed order; None: all), so a run's tokens are fixed by config.
        val_fraction, test_fraction, seed: the held-out documents.
    """

    def __init__(self, corpus: str = "lee", words: int = 96, max_windows: int | None = None,
                 val_fraction: float = 0.05, test_fraction: float = 0.1, seed: int = 0) -> None:
        if words < 1:
            raise ConfigError(f"data.source.words must be >= 1 (got {words})")
        self.corpus = corpus
        self.words = words
        self.max_windows = max_windows
        self.fractions = {"val": val_fraction, "test": test_fraction}
        self.seed = seed

    def load(self) -> dict[str, list[Example]]:
        from kd.data.mlm import TextSource

        docs = TextSource(self.corpus, self.fractions["val"], self.fractions["test"], self.seed).load()
        out = {}
        for split, texts in docs.items():
            windows = []
            for text in texts:
                words = text.split()
                windows += [" ".join(words[i : i + self.words]) for i in range(0, len(words), self.words)]
            out[split] = [Example(prompt="", response=w, skill=str(self.corpus)) for w in windows]
        if self.max_windows is not None:
            out["train"] = out["train"][: self.max_windows]
        return out

    def fingerprint(self) -> dict:
        return {"windows": str(self.corpus), "words": self.words, "max_windows": self.max_windows,
                "fractions": self.fractions, "seed": self.seed}


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


def encode_example(tokenizer: Any, example: Example, max_length: int,
                   chat_template: bool = True) -> tuple[list[int], list[int]] | None:
    """``(prompt_ids, response_ids + [eos])``, the response truncated to fit ``max_length``;
    None when the prompt alone leaves no room for a response token."""
    prompt = encode_prompt(tokenizer, example.prompt, chat_template)
    response = tokenizer(example.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(prompt) >= max_length:
        return None
    return prompt, response[: max_length - len(prompt)]


class EncodedSplit(Dataset):
    """One split: examples and their token ids."""

    def __init__(self, examples: list[Example], encoded: list[tuple[list[int], list[int]]],
                 teacher_prompts: list[list[int]] | None = None, teacher_index: list[int] | None = None) -> None:
        self.examples = examples
        self.encoded = encoded
        self.teacher_prompts = teacher_prompts
        self.teacher_index = teacher_index
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
    teacher's own left-padded prompts when the items carry them."""
    ids, mask = left_pad([it["prompt_ids"] for it in items], pad_token_id)
    out = {"prompt_ids": ids, "prompt_mask": mask, "index": torch.tensor([it.get("index", -1) for it in items])}
    if batches.TEACHER_INDEX in items[0]:  # each example's teacher among routed teachers (-1: none)
        out["teacher_index"] = torch.tensor([it["teacher_index"] for it in items])
    if batches.TEACHER_PROMPT_IDS in items[0]:
        pad = pad_token_id if teacher_pad_id is None else teacher_pad_id
        out["teacher_prompt_ids"], out["teacher_prompt_mask"] = left_pad([it["teacher_prompt_ids"] for it in items], pad)
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


class LMDataModule(ResumableData, L.LightningDataModule):
    """Prompt/response data for causal LMs.

    Args:
        source: a :class:`TaskSource`, :class:`JsonlSource` or anything with ``load()``
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
            false feeds them as they are, as for plain text (:class:`TextWindows`).
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
            for ex in examples:
                enc = encode_example(self.tokenizer, ex, self.max_length, self.chat_template)
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
            routed = None
            if self.routes:
                names = self.teacher_names
                routed = [names.index(self.routes[ex.skill]) if ex.skill in self.routes else -1 for ex in kept]
            self.splits[split] = EncodedSplit(kept, encoded, prompts, routed)

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
