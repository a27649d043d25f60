"""Junk records in prompt/response data (null, missing or empty fields; chat turns without
content) are dropped with a logged count, and refused when they are more than a tenth of a
file or split, in every format: jsonl fields, jsonl chat messages, datasets splits."""

from __future__ import annotations

import json
import logging

import pytest

from kd import ConfigError
from kd.data.sources import JUNK_SHARE, HFDatasetSource, JsonlSource


def _chat(q, a):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


GOOD = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(38)]
JUNK = {
    "fields": [{"prompt": None, "response": "a"}, {"prompt": "q", "response": None},
               {"prompt": "q", "response": "  "}, {"prompt": "q", "response": {"nested": 1}}],
    "messages": [_chat("q", ""), _chat(None, "a"),
                 {"messages": [{"role": "user", "content": "q"}, {"role": "assistant"}]},
                 {"messages": [{"role": "system", "content": "be brief"}]}],
}


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def _all(splits):
    return [ex for split in splits.values() for ex in split]


@pytest.mark.parametrize("kind", ["fields", "messages"])
def test_a_few_junk_records_are_dropped_and_counted(kind, tmp_path, caplog):
    good = GOOD if kind == "fields" else [_chat(r["prompt"], r["response"]) for r in GOOD]
    rows = good[:10] + JUNK[kind] + good[10:]  # 4 of 42: under a tenth
    path = _write(tmp_path / "train.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="kd"):
        splits = JsonlSource(path, val_fraction=0.1, test_fraction=0.1).load()
    examples = _all(splits)
    assert len(examples) == 38 and all(s for s in splits.values())
    assert {ex.prompt for ex in examples} == {f"q{i}" for i in range(38)}
    assert all(ex.response.strip() and "None" not in (ex.prompt, ex.response) for ex in examples)
    assert f"dropped 4 of the 42 records of data file '{tmp_path / 'train.jsonl'}' (first: record 11)" in caplog.text


def test_numbers_and_empty_prompts_are_kept(tmp_path):
    rows = [{"prompt": f"{i}+1=", "response": i + 1} for i in range(20)] + [{"prompt": "", "response": "text"}]
    splits = JsonlSource(_write(tmp_path / "t.jsonl", rows), val_fraction=0.1, test_fraction=0.1).load()
    examples = _all(splits)
    assert len(examples) == 21 and {ex.response for ex in examples} >= {"1", "20", "text"}


@pytest.mark.parametrize("kind", ["fields", "messages"])
def test_more_junk_than_a_tenth_is_refused_in_one_sentence(kind, tmp_path):
    good = GOOD[:20] if kind == "fields" else [_chat(r["prompt"], r["response"]) for r in GOOD[:20]]
    path = _write(tmp_path / "train.jsonl", good + JUNK[kind][:3])  # 3 of 23
    assert 3 > JUNK_SHARE * 23
    with pytest.raises(ConfigError) as refused:
        JsonlSource(path).load()
    sentence = str(refused.value)
    assert sentence.startswith(f"3 of the 23 records of data file '{tmp_path / 'train.jsonl'}' (first: record 21)")
    assert "\n" not in sentence and "data.source.prompt_key/response_key" in sentence


def test_a_split_of_junk_only_is_refused(tmp_path):
    train = _write(tmp_path / "train.jsonl", GOOD)
    val = _write(tmp_path / "val.jsonl", [{"prompt": "q", "response": ""}])
    with pytest.raises(ConfigError, match=r"1 of the 1 records of data file '.*val.jsonl'"):
        JsonlSource(train, val=val).load()


def test_datasets_splits_drop_and_refuse_junk_the_same_way(tmp_path, caplog):
    pytest.importorskip("datasets")
    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(30)] + [{"question": "q", "answer": None}]
    files = {"train": _write(tmp_path / "train.jsonl", rows),
             "test": _write(tmp_path / "test.jsonl", [{"question": "q", "answer": ""}, {"question": "r", "answer": "b"}])}
    with caplog.at_level(logging.WARNING, logger="kd"):
        splits = HFDatasetSource("json", data_files=files, prompt_key="question", response_key="answer").load()
    assert len(_all(splits)) == 30 and all(ex.response != "None" for ex in _all(splits))
    assert "dropped 1 of the 31 records of dataset 'json' split 'train' (first: record 31)" in caplog.text
    with pytest.raises(ConfigError, match=r"1 of the 2 records of dataset 'json' split 'test'"):
        HFDatasetSource("json", data_files=files, test_split="test", prompt_key="question",
                        response_key="answer").load()
