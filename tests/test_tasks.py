"""The embedded generative task: deterministic, disjoint splits, correct answers, exact-match scoring."""

from __future__ import annotations

import re
import statistics
from collections import Counter

import pytest

from kd import ConfigError
from kd.data.tasks import SHORT_SKILLS, SKILLS, Example, corpus, exact_match, make_split, make_task, score

SMALL = dict(train_size=1200, val_size=120, test_size=240)


@pytest.fixture(scope="module")
def task():
    return make_task(**SMALL, seed=0)


def test_same_seed_same_examples_other_seed_other_examples(task):
    assert make_task(**SMALL, seed=0) == task
    other = make_task(**SMALL, seed=1)
    for split in ("train", "val", "test"):
        assert other[split] != task[split]
        assert len({e.prompt for e in other[split]} & {e.prompt for e in task[split]}) < len(task[split]) // 5


def test_held_out_splits_do_not_depend_on_train_size(task):
    bigger = make_task(**{**SMALL, "train_size": 3000}, seed=0)
    assert bigger["val"] == task["val"] and bigger["test"] == task["test"]
    assert len(bigger["train"]) == 3000
    assert make_split(SMALL["test_size"], seed=0) == task["test"]


def test_splits_have_the_requested_sizes_and_share_no_prompt(task):
    assert [len(task[s]) for s in ("train", "val", "test")] == [1200, 120, 240]
    prompts = {split: [e.prompt for e in examples] for split, examples in task.items()}
    for split, ps in prompts.items():
        assert len(set(ps)) == len(ps), f"duplicate prompt within {split}"
    assert not set(prompts["train"]) & set(prompts["test"])
    assert not set(prompts["train"]) & set(prompts["val"])
    assert not set(prompts["val"]) & set(prompts["test"])


def test_default_task_is_disjoint_too():
    full = make_task()
    train = {e.prompt for e in full["train"]}
    assert len(train) == 20000
    assert not train & {e.prompt for e in full["test"] + full["val"]}


def test_every_skill_has_an_equal_share_of_every_split(task):
    k = len(SHORT_SKILLS)  # skills=None: the six short skills
    for split, examples in task.items():
        counts = Counter(e.skill for e in examples)
        assert set(counts) == set(SHORT_SKILLS), split
        assert all(len(examples) // k <= c <= len(examples) // k + 1 for c in counts.values()), (split, counts)


def test_skill_subset_and_weights():
    only = make_split(30, seed=3, skills=["add", "reverse"])
    assert Counter(e.skill for e in only) == {"add": 15, "reverse": 15}
    assert make_split(4, seed=3, skills="mul") == make_split(4, seed=3, skills=["mul"])
    weighted = Counter(e.skill for e in make_split(300, seed=0, skills=["add", "add", "sort"]))
    assert weighted == {"add": 200, "sort": 100}


# Each phrasing as a regex whose groups are the problem; every prompt must match exactly one.
PHRASINGS = {
    "upper": [r"uppercase ([a-z]+)", r"([a-z]+) in capitals:", r"write ([a-z]+) in caps"],
    "reverse": [r"reverse ([a-z]+)", r"([a-z]+) backwards:", r"spell ([a-z]+) backwards"],
    "sort": [r"sort ([a-z]+)", r"sort the letters of ([a-z]+)", r"([a-z]+) in abc order:"],
    "count": [r"how many ([a-z]) in ([a-z]+)\?", r"count ([a-z]) in ([a-z]+)", r"number of ([a-z]) in ([a-z]+):"],
    "add": [r"(\d+)\+(\d+)=", r"add (\d+) and (\d+)", r"what is (\d+) plus (\d+)\?"],
    "mul": [r"(\d+)\*(\d+)=", r"multiply (\d+) by (\d+)", r"what is (\d+) times (\d+)\?"],
}


def _expected(skill: str, groups: tuple[str, ...]) -> str:
    if skill == "upper":
        return groups[0].upper()
    if skill == "reverse":
        return groups[0][::-1]
    if skill == "sort":
        return "".join(sorted(groups[0]))
    if skill == "count":
        letter, word = groups
        return str(sum(ch == letter for ch in word))
    a, b = int(groups[0]), int(groups[1])
    if skill == "add":
        assert 10 <= a <= 999 and 10 <= b <= 999
        return str(a + b)
    assert 10 <= a <= 999 and 2 <= b <= 9
    return str(a * b)


def test_answers_are_correct_and_every_phrasing_is_used(task):
    used = Counter()
    for ex in task["train"] + task["test"]:
        matches = [(i, m) for i, p in enumerate(PHRASINGS[ex.skill]) if (m := re.fullmatch(p, ex.prompt))]
        assert len(matches) == 1, ex
        i, m = matches[0]
        used[ex.skill, i] += 1
        assert ex.response == _expected(ex.skill, m.groups()), ex
        assert ex.response == ex.response.strip() and ex.response
    assert len(used) == sum(len(p) for p in PHRASINGS.values())
    assert min(used.values()) > 30  # each phrasing reasonably frequent


def test_count_answers_are_spread_out(task):
    answers = Counter(e.response for e in task["train"] if e.skill == "count")
    assert {"0", "1", "2", "3", "4"} <= set(answers)
    assert max(answers.values()) < 0.4 * sum(answers.values())


def test_prompts_and_answers_are_short(task):
    lengths = [len(e.prompt) + len(e.response) for e in task["train"]]
    print(f"prompt+response chars: min {min(lengths)} mean {statistics.mean(lengths):.1f} max {max(lengths)}")
    assert max(lengths) < 40
    assert statistics.mean(lengths) < 25


def test_exact_match_strips_surrounding_whitespace_only():
    assert exact_match("357", "357")
    assert exact_match("  357\n", "357")
    assert exact_match("357", " 357 ")
    assert exact_match("\tabc ", "abc")
    assert not exact_match("3 57", "357")
    assert not exact_match("357.", "357")
    assert not exact_match("ABC", "abc")
    assert not exact_match("357\n12", "357")
    assert not exact_match("", "357")


def test_score_overall_and_per_skill():
    examples = [
        Example("1+1=", "2", "add"),
        Example("2+2=", "4", "add"),
        Example("reverse ab", "ba", "reverse"),
        Example("3+3=", "6", "add"),
    ]
    got = score(["2", " 5", "ba\n", "6 "], examples)
    assert got == pytest.approx({"exact_match": 0.75, "exact_match/add": 2 / 3, "exact_match/reverse": 1.0,
                                 "rouge_l": 0.75})  # one-word answers: Rouge-L is 1 or 0
    assert list(got) == ["exact_match", "exact_match/add", "exact_match/reverse", "rouge_l"]
    with pytest.raises(ValueError, match="predictions"):
        score(["2"], examples)


def test_rouge_l_is_the_f1_of_the_longest_common_word_subsequence():
    from kd.data.tasks import rouge_l

    # LCS of "the cat sat on the mat" / "the cat lay on a mat" is "the cat on mat": P = R = 4/6
    assert rouge_l("The cat lay on a mat.", "the cat sat on the mat") == pytest.approx(2 / 3)
    # "a b c d" vs "b d": LCS 2, P = 2/4, R = 2/2, F = 2 * 0.5 * 1 / 1.5
    assert rouge_l("a b c d", "b d") == pytest.approx(2 / 3)
    assert rouge_l("d c b a", "a b c d") == pytest.approx(0.25)  # order matters: LCS 1
    assert rouge_l("", "x") == rouge_l("x", "") == rouge_l("y", "x") == 0.0
    assert rouge_l("Hello, World!", "hello world") == 1.0


def test_corpus_and_messages():
    examples = [Example("1+1=", "2", "add"), Example("reverse ab", "ba", "reverse")]
    assert list(corpus(examples)) == ["1+1=", "2", "reverse ab", "ba"]
    assert examples[0].messages() == [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}]


def test_unknown_skill_names_the_valid_ones():
    with pytest.raises(ConfigError, match="'division'.*choose from upper, reverse, count, add, sort, mul, upper_long, reverse_long"):
        make_task(skills=["add", "division"])
    with pytest.raises(ConfigError, match="unknown skill"):
        make_split(5, seed=0, skills="Add")
    with pytest.raises(ConfigError, match="at least one"):
        make_split(5, seed=0, skills=[])


@pytest.mark.parametrize("sizes", [dict(train_size=0), dict(val_size=-1), dict(test_size=2.5)])
def test_sizes_must_be_positive_integers(sizes):
    name = next(iter(sizes))
    with pytest.raises(ConfigError, match=f"{name} must be a positive integer"):
        make_task(**sizes)
    with pytest.raises(ConfigError, match="n must be a positive integer"):
        make_split(0, seed=0)


def test_impossible_split_sizes_fail_clearly_instead_of_looping():
    # 2-3 digits times 2..9 is only 990 * 8 = 7920 distinct problems.
    with pytest.raises(ConfigError, match=r"skill 'mul' yields only about \d+ distinct prompts but the splits need 10"):
        make_task(train_size=10000, val_size=10, test_size=10, skills=["mul"])


def test_long_skills_answer_12_to_20_letters():
    examples = make_split(200, seed=1, skills=["upper_long", "reverse_long"])
    for ex in examples:
        word = next(w for w in re.findall(r"[a-z]+", ex.prompt) if len(w) >= 12)
        assert ex.response == (word.upper() if ex.skill == "upper_long" else word[::-1])
        assert 12 <= len(ex.response) <= 20
    assert {len(ex.response) for ex in examples} == set(range(12, 21))


def test_degrade_adds_wrong_answers_and_a_transfer_set_to_training_only():
    from kd.data.sources import TaskSource
    from kd.data.tasks import degrade

    train = make_split(400, seed=0, skills=["add", "sort"])
    noisy = degrade(train, noise=0.25, seed=0)
    wrong = [(a, b) for a, b in zip(train, noisy) if a.response != b.response]
    assert len(wrong) == 100  # exactly the share asked for, and every one really wrong
    assert all(a.prompt == b.prompt and a.skill == b.skill for a, b in zip(train, noisy))
    answers = {skill: {e.response for e in train if e.skill == skill} for skill in ("add", "sort")}
    assert all(b.response in answers[b.skill] for _, b in wrong)  # a plausible answer of the same skill
    transfer = degrade(train, gold_fraction=0.1, seed=0)
    assert sum(e.labelled for e in transfer) == 40
    assert [(e.prompt, e.response) for e in transfer] == [(e.prompt, e.response) for e in train]
    assert degrade(train, gold_fraction=0.1, noise=0.25, seed=0) == degrade(train, gold_fraction=0.1, noise=0.25, seed=0)
    with pytest.raises(ConfigError, match="gold_fraction must be in"):
        degrade(train, gold_fraction=0.0)
    with pytest.raises(ConfigError, match="noise must be in"):
        degrade(train, noise=1.0)
    clean = TaskSource(train_size=60, val_size=10, test_size=10).load()
    source = TaskSource(train_size=60, val_size=10, test_size=10, gold_fraction=0.5, noise=0.2)
    splits = source.load()
    assert splits["val"] == clean["val"] and splits["test"] == clean["test"]
    assert sum(e.labelled for e in splits["train"]) == 30 and splits["train"] != clean["train"]
    assert source.fingerprint() != TaskSource(train_size=60, val_size=10, test_size=10).fingerprint()
