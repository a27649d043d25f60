"""The embedded generative task: short instructions with answers that can be checked exactly.

Six skills of graded difficulty, each asked in three phrasings, all drawn from a seed with
pure-python :class:`random.Random` (no numpy, no network), so the task is the same on every
machine:

=========  =============================  =========  ====================================
skill      example prompt                 answer     what it takes
=========  =============================  =========  ====================================
upper      ``write ctwkp in caps``        ``CTWKP``  a per-letter map (easiest)
reverse    ``ymo backwards:``             ``omy``    reading the string back to front
count      ``count s in shbrs``           ``2``      counting over the whole string
add        ``what is 189 plus 25?``       ``214``    2-3 digit addition with carries
sort       ``dhtp in abc order:``         ``dhpt``   a global reordering
mul        ``504*5=``                     ``2520``   2-3 digits times one digit (hardest)
=========  =============================  =========  ====================================

Strings are random lowercase letters (3-7 for ``upper``/``reverse``/``sort``, 5-9 for
``count``), numbers have 2 or 3 digits (each length equally likely). Prompt plus answer is
at most 34 characters (21 on average), which keeps a few-million-parameter model
trainable on a CPU in minutes.

Every problem has one phrasing, picked by a fixed hash of the problem, so distinct prompts
are distinct problems: :func:`make_task` deduplicates by prompt text and therefore never
shows a validation or test problem in training, not even reworded. Each skill draws from
its own random stream (seeded by ``seed`` and the skill's name) and the split's examples
cycle through the skills in order, so every split holds each skill in equal share (a name
listed twice is drawn twice as often). The test split is drawn first, then validation,
then training: changing ``train_size`` never changes the held-out examples, and
``make_split(n, seed)`` is exactly the test split of ``make_task(test_size=n, seed=seed)``.

Scoring is exact match after stripping surrounding whitespace (:func:`exact_match`).
"""

from __future__ import annotations

import random
import string
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial

from kd import ConfigError

__all__ = ["Example", "SKILLS", "RULES", "SHORT_SKILLS", "make_split", "make_task", "degrade", "exact_match", "rouge_l", "score", "corpus"]


@dataclass(frozen=True)
class Example:
    """One instruction and its reference answer.

    Args:
        prompt: the instruction, without any chat formatting (e.g. ``"12+345="``).
        response: the reference answer, no surrounding whitespace (e.g. ``"357"``).
        skill: the name of the skill in :data:`SKILLS` that produced it.
    """

    prompt: str
    response: str
    skill: str
    #: False: a transfer-set example whose answer is withheld from the loss (its tokens are
    #: still the input, and the teacher's soft targets still cover them), see :func:`degrade`
    labelled: bool = True

    def messages(self) -> list[dict[str, str]]:
        """The example as a chat: one user turn (the prompt), one assistant turn (the answer)."""
        return [{"role": "user", "content": self.prompt}, {"role": "assistant", "content": self.response}]


# ----------------------------------------------------------------------------- skills

_LETTERS = string.ascii_lowercase


def _word(rng: random.Random, shortest: int, longest: int) -> str:
    """Random lowercase letters, length uniform in [shortest, longest]."""
    return "".join(rng.choice(_LETTERS) for _ in range(rng.randint(shortest, longest)))


def _number(rng: random.Random) -> int:
    """A 2- or 3-digit number: the length first (equally likely), then the value."""
    digits = rng.randint(2, 3)
    return rng.randint(10 ** (digits - 1), 10**digits - 1)


def _phrase(phrasings: Sequence[str], problem: str, **fields: object) -> str:
    """The prompt for ``problem`` in its one phrasing, chosen by a stable hash of the problem.

    crc32 (not ``hash``) so the choice is the same in every process whatever PYTHONHASHSEED.
    """
    return phrasings[zlib.crc32(problem.encode()) % len(phrasings)].format(**fields)


def _upper(rng: random.Random, shortest: int = 3, longest: int = 7) -> tuple[str, str]:
    w = _word(rng, shortest, longest)
    return _phrase(("uppercase {w}", "{w} in capitals:", "write {w} in caps"), w, w=w), w.upper()


def _reverse(rng: random.Random, shortest: int = 3, longest: int = 7) -> tuple[str, str]:
    w = _word(rng, shortest, longest)
    return _phrase(("reverse {w}", "{w} backwards:", "spell {w} backwards"), w, w=w), w[::-1]


def _count(rng: random.Random) -> tuple[str, str]:
    c = rng.choice(_LETTERS)
    # About a third of the letters are the counted one, so answers spread over 0..9.
    w = "".join(c if rng.random() < 1 / 3 else rng.choice(_LETTERS) for _ in range(rng.randint(5, 9)))
    prompt = _phrase(("how many {c} in {w}?", "count {c} in {w}", "number of {c} in {w}:"), f"{c} {w}", c=c, w=w)
    return prompt, str(w.count(c))


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = _number(rng), _number(rng)
    prompt = _phrase(("{a}+{b}=", "add {a} and {b}", "what is {a} plus {b}?"), f"{a}+{b}", a=a, b=b)
    return prompt, str(a + b)


def _sort(rng: random.Random) -> tuple[str, str]:
    w = _word(rng, 3, 7)
    prompt = _phrase(("sort {w}", "sort the letters of {w}", "{w} in abc order:"), w, w=w)
    return prompt, "".join(sorted(w))


def _mul(rng: random.Random) -> tuple[str, str]:
    a, b = _number(rng), rng.randint(2, 9)
    prompt = _phrase(("{a}*{b}=", "multiply {a} by {b}", "what is {a} times {b}?"), f"{a}*{b}", a=a, b=b)
    return prompt, str(a * b)


SKILLS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "upper": _upper,
    "reverse": _reverse,
    "count": _count,
    "add": _add,
    "sort": _sort,
    "mul": _mul,
    "upper_long": partial(_upper, shortest=12, longest=20),
    "reverse_long": partial(_reverse, shortest=12, longest=20),
}
"""Skill name -> generator of one ``(prompt, response)`` from a :class:`random.Random`,
listed roughly from easiest to hardest; the ``_long`` skills are ``upper``/``reverse`` on
12-20 letters (answers long enough for a student's own early errors to compound)."""

#: each skill's rule in words, from the task's own instruction words where possible (few
#: tokens of its tokenizer): the privileged context ``teacher.context=rule`` (:mod:`kd.privileged`)
RULES: dict[str, str] = {
    "upper": "write it in caps",
    "reverse": "spell it backwards",
    "count": "count how many",
    "add": "add the numbers",
    "sort": "sort the letters in abc order",
    "mul": "multiply the numbers",
    "upper_long": "write it in caps",
    "reverse_long": "spell it backwards",
}

#: the six skills of the table above (what ``skills=None`` means)
SHORT_SKILLS = ("upper", "reverse", "count", "add", "sort", "mul")


# ----------------------------------------------------------------------------- splits

# A skill that draws this many already-seen prompts in a row is taken to have run dry.
_MAX_REPEATS = 5000


class _Exhausted(Exception):
    def __init__(self, skill: str, found: int) -> None:
        self.skill, self.found = skill, found


class _Stream:
    """One skill's examples, never repeating a prompt."""

    def __init__(self, seed: int, skill: str) -> None:
        # A string seed is hashed with sha512 by `random`: stable across processes and versions.
        self.rng = random.Random(f"kd.data.tasks/{seed}/{skill}")
        self.skill = skill
        self.seen: set[str] = set()

    def draw(self) -> Example:
        generate = SKILLS[self.skill]
        for _ in range(_MAX_REPEATS):
            prompt, response = generate(self.rng)
            if prompt not in self.seen:
                self.seen.add(prompt)
                return Example(prompt, response, self.skill)
        raise _Exhausted(self.skill, len(self.seen))


class _Sampler:
    """Splits drawn one after the other from the same per-skill streams, so they never share a prompt."""

    def __init__(self, seed: int, skills: list[str]) -> None:
        self.skills = skills
        self.streams = {name: _Stream(seed, name) for name in dict.fromkeys(skills)}

    def take(self, n: int, total: dict[str, int]) -> list[Example]:
        try:
            return [self.streams[self.skills[i % len(self.skills)]].draw() for i in range(n)]
        except _Exhausted as e:
            raise ConfigError(
                f"skill {e.skill!r} yields only about {e.found} distinct prompts but the splits need "
                f"{total[e.skill]} of them; lower the split sizes or add other skills"
            ) from None


def _skill_list(skills: Sequence[str] | str | None) -> list[str]:
    """Validated skill names (None: :data:`SHORT_SKILLS`; a single string: that one skill)."""
    if skills is None:
        return list(SHORT_SKILLS)
    names = [skills] if isinstance(skills, str) else list(skills)
    if not names:
        raise ConfigError(f"skills is empty; name at least one of {', '.join(SKILLS)} (or null for all)")
    unknown = [s for s in names if s not in SKILLS]
    if unknown:
        raise ConfigError(
            f"unknown skill(s) {', '.join(map(repr, unknown))}; choose from {', '.join(SKILLS)}"
        )
    return names


def _check_size(name: str, n: object) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"{name} must be a positive integer (got {n!r}); set it to 1 or more")
    return n


def _per_skill(skills: list[str], sizes: Iterable[int]) -> dict[str, int]:
    """How many examples each skill must supply for splits of these sizes (round robin)."""
    need = dict.fromkeys(skills, 0)
    for n in sizes:
        for i in range(len(skills)):
            need[skills[i]] += n // len(skills) + (i < n % len(skills))
    return need


def make_split(n: int, seed: int, skills: Sequence[str] | str | None = None) -> list[Example]:
    """``n`` examples with distinct prompts, cycling through ``skills`` in order.

    Args:
        n: number of examples (positive).
        seed: the seed of every skill's random stream; the same ``(n, seed, skills)`` always
            gives the same list.
        skills: names from :data:`SKILLS` (None: the six short ones). Repeating a name weights it.

    Raises:
        ConfigError: unknown skill, ``n`` < 1, or a skill that cannot supply enough
            distinct prompts.
    """
    names = _skill_list(skills)
    _check_size("n", n)
    return _Sampler(seed, names).take(n, _per_skill(names, [n]))


def make_task(
    train_size: int = 20000,
    val_size: int = 500,
    test_size: int = 1000,
    seed: int = 0,
    skills: Sequence[str] | str | None = None,
) -> dict[str, list[Example]]:
    """Train / val / test splits that share no prompt (hence no problem).

    Test is drawn first, then val, then train, from the same per-skill streams: the
    held-out splits do not depend on ``train_size``, and the test split equals
    ``make_split(test_size, seed, skills)``.

    Args:
        train_size: training examples (positive).
        val_size: validation examples (positive).
        test_size: test examples (positive).
        seed: seed of the task; the same arguments always give the same splits.
        skills: names from :data:`SKILLS` (None: the six short ones). Repeating a name weights it.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}``, each a list of :class:`Example`.

    Raises:
        ConfigError: unknown skill, a size < 1, or sizes too large for some skill's
            supply of distinct prompts.
    """
    names = _skill_list(skills)
    sizes = {
        "test": _check_size("test_size", test_size),
        "val": _check_size("val_size", val_size),
        "train": _check_size("train_size", train_size),
    }
    total = _per_skill(names, sizes.values())
    sampler = _Sampler(seed, names)
    splits = {split: sampler.take(n, total) for split, n in sizes.items()}
    return {"train": splits["train"], "val": splits["val"], "test": splits["test"]}


def degrade(train: Sequence[Example], gold_fraction: float = 1.0, noise: float = 0.0,
            seed: int = 0) -> list[Example]:
    """A training split made harder in the two ways distillation papers argue from.

    * ``noise``: this share of the examples (a seeded choice) gets a wrong answer, the
      answer of another example of the same skill that differs from its own: noisy
      references, where a teacher trained on them gives back their mode (Kim & Rush's
      argument for Seq-KD).
    * ``gold_fraction``: only this share of the examples (a seeded choice, after the noise)
      keeps its answer as a label (``labelled``); the rest are a transfer set whose answer
      tokens the student never gets a hard loss on, so what it learns there comes from the
      teacher's soft targets (Hinton et al.'s transfer set; word-level KD).

    Held-out splits are never degraded. The same arguments always give the same split.
    """
    if not 0.0 <= noise < 1.0:
        raise ConfigError(f"data.source.noise must be in [0, 1) (got {noise}); it is the share of wrong answers")
    if not 0.0 < gold_fraction <= 1.0:
        raise ConfigError(f"data.source.gold_fraction must be in (0, 1] (got {gold_fraction}); it is the share of "
                          "training answers kept as labels")
    rng = random.Random(f"kd.data.tasks/degrade/{seed}")
    out = list(train)
    if noise > 0:
        by_skill: dict[str, list[str]] = {}
        for ex in out:
            by_skill.setdefault(ex.skill, []).append(ex.response)
        for i in sorted(rng.sample(range(len(out)), round(noise * len(out)))):
            ex = out[i]
            wrong = [r for r in by_skill[ex.skill] if r != ex.response]
            if wrong:
                out[i] = Example(ex.prompt, rng.choice(wrong), ex.skill)
    if gold_fraction < 1.0:
        hidden = set(rng.sample(range(len(out)), len(out) - max(1, round(gold_fraction * len(out)))))
        out = [Example(ex.prompt, ex.response, ex.skill, labelled=False) if i in hidden else ex
               for i, ex in enumerate(out)]
    return out


# ----------------------------------------------------------------------------- scoring


def exact_match(prediction: str, reference: str) -> bool:
    """Whether the prediction is the reference, ignoring surrounding whitespace.

    The only normalisation is :meth:`str.strip` on both sides (leading and trailing
    whitespace, Unicode included); case, inner spaces and punctuation all count, and text
    after the answer (a second line, a stray special token) makes it wrong.
    """
    return prediction.strip() == reference.strip()


def rouge_l(prediction: str, reference: str) -> float:
    """Rouge-L F1 (Lin 2004) of two texts: the longest common subsequence of their words,
    ``2 P R / (P + R)`` with ``P = LCS / len(prediction)``, ``R = LCS / len(reference)``.
    Words are lower-cased runs of letters and digits (punctuation dropped). Deviation from
    the ``rouge-score`` package the MiniLLM/DistiLLM evaluations use: no Porter stemmer.
    """
    import re

    pred, ref = re.findall(r"\w+", prediction.lower()), re.findall(r"\w+", reference.lower())
    if not pred or not ref:
        return 0.0
    row = [0] * (len(ref) + 1)
    for word in pred:  # one row of the LCS table at a time
        prev = 0
        for j, other in enumerate(ref, 1):
            prev, row[j] = row[j], prev + 1 if word == other else max(row[j], row[j - 1])
    lcs = row[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def score(predictions: Sequence[str], examples: Sequence[Example]) -> dict[str, float]:
    """Exact-match accuracy overall and per skill, and the mean Rouge-L F1 (:func:`rouge_l`)
    overall (the metric of open-ended answers such as chatterbot's).

    Args:
        predictions: one decoded answer per example (the generated text after the prompt).
        examples: the examples answered, in the same order.

    Returns:
        ``{"exact_match": share correct, "exact_match/<skill>": share correct within that
        skill, ..., "rouge_l": mean Rouge-L F1}`` with the skills in order of first appearance.
    """
    if len(predictions) != len(examples):
        raise ValueError(f"got {len(predictions)} predictions for {len(examples)} examples")
    if not examples:
        raise ValueError("score() needs at least one example")
    hits: dict[str, list[bool]] = {}
    for prediction, example in zip(predictions, examples):
        hits.setdefault(example.skill, []).append(exact_match(prediction, example.response))
    every = [h for skill_hits in hits.values() for h in skill_hits]
    out = {"exact_match": sum(every) / len(every)}
    out.update({f"exact_match/{skill}": sum(h) / len(h) for skill, h in hits.items()})
    out["rouge_l"] = sum(rouge_l(p, ex.response) for p, ex in zip(predictions, examples)) / len(examples)
    return out


def corpus(examples: Iterable[Example]) -> Iterator[str]:
    """The texts of the examples, prompt then response of each (for training a tokenizer)."""
    for example in examples:
        yield example.prompt
        yield example.response
