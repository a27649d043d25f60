"""Where examples come from: data sources, independent of tokenizers and datamodules.

A source has ``load()``, returning ``{"train": [...], "val": [...], "test": [...]}``, and
(for the prompt/response sources) ``fingerprint()``, a small JSON-able value that changes
whenever the loaded data would (it keys the trained-tokenizer cache). A source that reads
local files lists them in ``files()`` (cheap: nothing is loaded); their contents
(:func:`kd.cache.files_fingerprint`) enter its ``fingerprint()`` and the key of every cached
run trained on it (:func:`kd.subruns.run_key`), so an edited file is never mistaken for the
one a cache entry was built from. Datamodules take a source as their ``source`` argument
(``data.source`` in the configs).

Prompt/response sources (lists of :class:`kd.data.tasks.Example`, for
:class:`kd.data.lm.LMDataModule`):

* :class:`TaskSource`: the embedded generative task of :mod:`kd.data.tasks`;
* :class:`JsonlSource`: local ``.jsonl`` / ``.json`` / ``.parquet`` files holding
  ``prompt``/``response`` fields or chat ``messages``;
* :class:`HFDatasetSource`: anything ``datasets.load_dataset`` reads;
* :class:`ChatterbotSource`: the questions and answers of ``chatterbot-corpus``;
* :class:`TextWindows`: plain text cut into windows of words, each an example with an
  empty prompt (language modelling on text).

Text sources (lists of document strings, for :class:`kd.data.mlm.MLMDataModule`):
:class:`TextSource` (gensim's Lee or Wikipedia slices, chatterbot conversations, or a local
file), and :func:`wikipedia_articles`, which it reads the Wikipedia slice with.

Held-out splits that a source does not have are cut from its training split by
:func:`hold_out` (a fixed seeded permutation).

Junk records (:class:`JsonlSource`, :class:`HFDatasetSource`, in every format: prompt/response
fields and chat ``messages``): a record whose prompt is missing or null, or whose response is
missing, null or only whitespace (a chat record: no user or no assistant turn, or such a turn
without content), would train on nothing or on the text ``"None"`` and score 100% exact match
on an empty answer. Such records are dropped and their count is logged as a warning, naming
the file or split and the first one; a file or split is refused instead (one sentence) when
more than :data:`JUNK_SHARE` of its records are junk (a broken export or the wrong field
names) or when none is left. An empty prompt is kept (an unconditioned response, as in
:class:`TextWindows`); numbers are kept as their text. A record that has neither the
prompt/response fields nor ``messages`` at all is refused, as a sign of wrong field names.
"""

from __future__ import annotations

import glob
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from kd import ConfigError
from kd.cache import file_fingerprint, files_fingerprint
from kd.data.tasks import Example

log = logging.getLogger("kd")

#: the largest share of junk records (see the module docstring) a file or split may hold:
#: they are dropped with a logged count; more is refused
JUNK_SHARE = 0.1

# ----------------------------------------------------------------------------- prompt/response sources


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
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"data file '{path}' is not UTF-8 text (byte {e.start} cannot be decoded); re-save it as "
                          "UTF-8") from None
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


def _text(value: Any) -> str | None:
    """A field's text: a string as it is, a number as its text, chat content parts
    (``[{"type": "text", "text": ...}, ...]``) joined; None for null or anything else."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return None if isinstance(value, float) and not math.isfinite(value) else str(value)
    if isinstance(value, list) and value and all(isinstance(p, dict) and isinstance(p.get("text"), str)
                                                 for p in value):
        return "".join(p["text"] for p in value)
    return None


def _to_example(record: Any, origin: str, n: int, prompt_key: str, response_key: str) -> Example | None:
    """The record's example; None for a junk record (module docstring); a record of
    neither format is refused."""
    skill = str(record.get("skill", "data")) if isinstance(record, dict) else "data"
    if isinstance(record, dict) and "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
            raise ConfigError(f"{origin} record {n}: 'messages' must be a list of {{\"role\": ..., \"content\": ...}} "
                              "objects (chat format), not plain strings; write each turn as an object with a role "
                              "(user or assistant) and its content")
        users = [m.get("content") for m in msgs if m.get("role") == "user"]
        answers = [m.get("content") for m in msgs if m.get("role") == "assistant"]
        prompt, response = (_text(users[-1]) if users else None), (_text(answers[-1]) if answers else None)
    elif isinstance(record, dict) and prompt_key in record and response_key in record:
        prompt, response = _text(record[prompt_key]), _text(record[response_key])
    else:
        raise ConfigError(
            f"{origin} record {n} has neither '{prompt_key}'/'{response_key}' fields nor chat 'messages' with a "
            "user and an assistant turn; rename the fields or set data.source.prompt_key/response_key"
        )
    if prompt is None or response is None or not response.strip():
        return None
    return Example(prompt=prompt, response=response, skill=skill)


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
    """The examples of ``records``, junk dropped with a logged count, or refused when more
    than :data:`JUNK_SHARE` of them (or all) are junk (module docstring)."""
    if not records:
        raise ConfigError(f"{origin} holds no records; give it at least one prompt/response pair")
    examples = [_to_example(r, origin, n, prompt_key, response_key) for n, r in enumerate(records, 1)]
    kept = [e for e in examples if e is not None]
    junk = len(examples) - len(kept)
    if junk:
        first = next(n for n, e in enumerate(examples, 1) if e is None)
        if not kept or junk > JUNK_SHARE * len(examples):
            raise ConfigError(
                f"{junk} of the {len(examples)} records of {origin} (first: record {first}) have a null or missing "
                f"prompt or a null, missing or empty response, more than the {JUNK_SHARE:.0%} kd drops; fix the "
                "data or point data.source.prompt_key/response_key at the right fields")
        log.warning("dropped %d of the %d records of %s (first: record %d): null or missing prompt, or null, "
                    "missing or empty response", junk, len(examples), origin, first)
    return kept


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

    def files(self) -> list[str]:
        return [str(v) for v in self.paths.values() if v]

    def fingerprint(self) -> dict:
        contents = {k: (str(v), file_fingerprint(v)) for k, v in self.paths.items() if v}
        return {"files": contents, "keys": [self.prompt_key, self.response_key], "fractions": self.fractions,
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
        except (ValueError, OSError) as e:  # OSError: ConnectionError, FileNotFoundError, DatasetNotFoundError
            offline = isinstance(e, (ConnectionError, datasets.exceptions.DatasetNotFoundError)) or not isinstance(
                e, (FileNotFoundError, ValueError))
            if offline and not Path(str(self.args["path"])).expanduser().exists() and not self.args.get("data_files"):
                reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise ConfigError(f"data.source.path '{self.args['path']}' is not a local directory, and as a hub "
                                  f"dataset it could not be loaded ({reason}); a hub name needs the network (and "
                                  "HF_DATASETS_OFFLINE unset): connect, or pass a local dataset directory or "
                                  "data_files") from None
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

    def files(self) -> list[str]:
        """The local files it reads: ``path`` when it is a local directory or file, and
        ``data_files`` (glob patterns expanded; relative ones are relative to a local
        ``path`` directory, as ``datasets`` reads them); hub files are keyed by ``revision``."""
        local = Path(str(self.args["path"])).expanduser()
        out = [str(local)] if local.exists() else []
        data_files = _plain(self.args["data_files"]) or []
        if isinstance(data_files, dict):
            data_files = list(data_files.values())
        if not isinstance(data_files, list):
            data_files = [data_files]
        for pattern in data_files:
            for item in pattern if isinstance(pattern, list) else [pattern]:
                item = str(item)
                if "://" in item:
                    continue
                path = Path(item).expanduser()
                if local.is_dir() and not path.is_absolute():
                    path = local / path
                out += sorted(glob.glob(str(path), recursive=True)) if glob.has_magic(str(path)) else [str(path)]
        return out

    def fingerprint(self) -> dict:
        return {"hf_dataset": {k: str(v) for k, v in self.args.items()}, "contents": files_fingerprint(self.files()),
                "splits": self.splits,
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
        dedup: the corpus repeats itself (2,361 pairs, 1,228 distinct, 1,036 distinct
            prompts; about half of a random split's test pairs are also training pairs).
            True keeps the first of each repeated pair (compared lower-cased, whitespace
            collapsed) and holds out whole prompts: the fractions are of the distinct
            prompts, and no held-out prompt, so no held-out pair, is also in training.
    """

    def __init__(self, categories: Sequence[str] | None = None, val_fraction: float = 0.05,
                 test_fraction: float = 0.05, seed: int = 0, dedup: bool = False) -> None:
        self.categories = sorted(categories) if categories else None
        self.fractions = {"val": val_fraction, "test": test_fraction}
        self.seed = seed
        self.dedup = bool(dedup)

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
        if not self.dedup:
            return hold_out(examples, {}, self.fractions, self.seed, "chatterbot-corpus")
        norm = lambda text: " ".join(text.lower().split())  # noqa: E731
        seen: set[tuple[str, str]] = set()
        groups: dict[str, list[Example]] = {}
        for e in examples:
            pair = (norm(e.prompt), norm(e.response))
            if pair not in seen:
                seen.add(pair)
                groups.setdefault(pair[0], []).append(e)
        splits = hold_out(list(groups.values()), {}, self.fractions, self.seed, "chatterbot-corpus")
        return {name: [e for group in held for e in group] for name, held in splits.items()}

    def fingerprint(self) -> dict:
        out = {"chatterbot": self.categories, "fractions": self.fractions, "seed": self.seed}
        return {**out, "dedup": True} if self.dedup else out


# ----------------------------------------------------------------------------- text sources


def wikipedia_articles(min_words: int = 50) -> list[str]:
    """The articles of gensim's Wikipedia test slice as plain text, one string per article
    (redirects and stubs under ``min_words`` words dropped; wiki markup removed by gensim's
    ``filter_wiki``, bold/italic quotes and blank runs removed here)."""
    import bz2
    import re

    try:
        from gensim.corpora.wikicorpus import extract_pages, filter_wiki
        from gensim.test.utils import datapath
    except ImportError as e:
        raise ConfigError("the wiki corpus ships with gensim; pip install gensim (or kd[data])") from e
    articles = []
    with bz2.BZ2File(datapath("enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")) as f:
        for _, text, _ in extract_pages(f):
            if text.lstrip().lower().startswith("#redirect"):
                continue
            plain = re.sub(r"\s+", " ", re.sub(r"'{2,}", "", filter_wiki(text))).strip()
            if len(plain.split()) >= min_words:
                articles.append(plain)
    return articles


class TextSource:
    """Plain-text documents, held-out splits by document (fixed seeded permutation).

    Args:
        corpus: ``lee`` (gensim's Lee news corpus, 300 + 50 Australian news articles; needs
            ``gensim``), ``wiki`` (gensim's slice of English Wikipedia: the 106 articles of
            at least 50 words, about 480,000 words, markup stripped), ``chatterbot`` (every turn of chatterbot-corpus's English
            conversations, one document per conversation; needs ``chatterbot-corpus``), or
            a path to a local text file with one document per line.
        val_fraction, test_fraction, seed: the held-out documents.
    """

    def __init__(self, corpus: str = "lee", val_fraction: float = 0.05, test_fraction: float = 0.1,
                 seed: int = 0) -> None:
        self.corpus = corpus
        self.fractions = {"val": val_fraction, "test": test_fraction}
        self.seed = seed

    def documents(self) -> list[str]:
        if self.corpus == "lee":
            try:
                from gensim.test.utils import datapath
            except ImportError as e:
                raise ConfigError("the lee corpus ships with gensim; pip install gensim (or kd[data])") from e
            lines = []
            for name in ("lee_background.cor", "lee.cor"):
                lines += Path(datapath(name)).read_text(encoding="latin-1").splitlines()
            return lines
        if self.corpus == "wiki":
            return wikipedia_articles()
        if self.corpus == "chatterbot":
            return [" ".join(turns) for _, turns in ChatterbotSource.conversations()]
        path = Path(self.corpus).expanduser()
        if not path.is_file():
            raise ConfigError(f"data.source.corpus '{self.corpus}' is neither lee, wiki, chatterbot nor an existing "
                              "text file")
        return path.read_text(encoding="utf-8").splitlines()

    def files(self) -> list[str]:
        return [] if self.corpus in ("lee", "wiki", "chatterbot") else [str(self.corpus)]

    def load(self) -> dict[str, list[str]]:
        docs = [d.strip() for d in self.documents() if d.strip()]
        return hold_out(docs, {}, self.fractions, self.seed, f"corpus '{self.corpus}'")


class TextWindows:
    """Plain text for language modelling: each document of a corpus cut into windows of
    ``words`` whitespace-separated words, each window one example with an empty prompt,
    so the loss covers every token (use with ``chat_template: false``). Held-out splits
    are by document, so no test window shares a document with a training window.

    Args:
        corpus: ``lee``, ``wiki``, ``chatterbot`` or a text file (:class:`TextSource`).
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

    def files(self) -> list[str]:
        return TextSource(self.corpus).files()

    def fingerprint(self) -> dict:
        files = self.files()
        return {"windows": str(self.corpus), "words": self.words, "max_windows": self.max_windows,
                "fractions": self.fractions, "seed": self.seed,
                **({"contents": files_fingerprint(files)} if files else {})}
