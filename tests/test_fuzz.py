"""Config fuzzing: seeded random combinations of every group's options (recipe, teacher,
student, divergence, data, regime) plus knob overrides. Each must compose and build, or be
refused before anything trains with one sentence (exit code 2 from the console script);
never a traceback, never a raw TypeError/KeyError. Every combination is composed and
built in-process (data set up, tokenizers and vocabularies checked); a sample of those that
build runs end to end under debug=fast_dev_run."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from kd import ConfigError
from kd.build import build
from kd.cli import composition_error, one_sentence_errors
from kd.config import CONF_DIR
from kd.runs import train
from tests.conftest import QUIET, compose_cfg

GROUPS = ("recipe", "teacher", "student", "divergence", "data", "regime")
OPTIONS = {g: sorted(p.stem for p in (CONF_DIR / g).glob("*.yaml")) for g in GROUPS}

#: knobs a user tries; some do not exist for every combination (that must be refused too)
KNOBS = ["seed=3", "optimizer.lr=0.01", "trainer.max_epochs=2", "data.batch_size=8", "recipe.temperature=2.0",
         "recipe.lam=0.3", "divergence.beta=0.3", "divergence.reduction=seq_mean", "regime.lmbda=0.7",
         "regime.sampling.temperature=0.5", "teacher.fit.max_epochs=1", "student.hidden_size=48",
         "recipe.num_minibatches=2", "regime.seq_kd=true"]

COMBINATIONS = 60
END_TO_END = 6


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny jsonl dataset, a text corpus and a tiny saved transformers model + tokenizer."""
    from kd.data.tokenizer import train_bpe_tokenizer
    from kd.models import save_model, tiny_causal_lm

    root = tmp_path_factory.mktemp("fuzz")
    lines = [f'{{"prompt": "say {w}", "response": "{w} {w}"}}' for w in ("red", "blue", "green", "gold") * 10]
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    (root / "docs.txt").write_text("\n".join(f"the {w} cat sat on the {v} mat" for w in ("red", "big", "old")
                                             for v in ("blue", "new", "soft", "warm")) + "\n")
    tok = train_bpe_tokenizer([line for line in lines] * 3, vocab_size=300, min_frequency=2)
    save_model(tiny_causal_lm(vocab_size=len(tok), hidden_size=32, num_layers=1), root / "model")
    tok.save_pretrained(root / "model")
    return root


def _small(choice: dict[str, str], files: Path) -> list[str]:
    """Overrides that keep whatever was chosen tiny (only keys the chosen groups have)."""
    data = choice.get("data", "digits")
    out = []
    if data == "task":
        out += ["data.source.train_size=120", "data.source.val_size=12", "data.source.test_size=12",
                "data.vocab_size=300", "data.min_frequency=20", "data.generation_eval_size=4",
                "data.max_new_tokens=4"]
    elif data in ("jsonl", "hf"):
        out += [f"data.source.train={files / 'train.jsonl'}"] if data == "jsonl" else [
            "data.source.path=json", f"data.source.data_files={files / 'train.jsonl'}"]
        out += ["data.max_new_tokens=4", "data.max_length=32"]
    elif data == "chatterbot":
        out += ["data.source.categories=[greetings]", "data.max_new_tokens=4", "data.max_length=48"]
    elif data == "text":
        out += [f"data.source.corpus={files / 'docs.txt'}", "data.vocab_size=200", "data.max_length=16"]
    for role in ("teacher", "student"):
        if choice.get(role) == "hf":
            out.append(f"{role}.name_or_path={files / 'model'}")
    return out


#: knobs every combination has
COMMON_KNOBS = ["seed=3", "optimizer.lr=0.01", "trainer.max_epochs=2", "data.batch_size=8"]


def _needs(recipe: str):
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    return get_class(OmegaConf.load(CONF_DIR / "recipe" / f"{recipe}.yaml")._target_).needs


def _combinations(files: Path) -> list[list[str]]:
    """Half fully random choices; half where data, teacher and student are of one kind (what
    a user who read the README picks) with random recipe, divergence, regime and knobs."""
    from kd.config import option_kind, options_of_kind

    rng = random.Random(20261129)
    combos = []
    for n in range(COMBINATIONS):
        if n % 2 == 0:
            choice = {g: rng.choice(OPTIONS[g]) for g in GROUPS if rng.random() < 0.6}
            knobs = rng.sample(KNOBS, rng.randint(0, 2))
        else:
            data = rng.choice(OPTIONS["data"])
            kind = option_kind("data", data)
            recipe = rng.choice([r for r in OPTIONS["recipe"] if _needs(r).data in (None, (kind,))])
            choice = {"data": data, "teacher": rng.choice(options_of_kind("teacher", kind)),
                      "student": rng.choice(options_of_kind("student", kind)), "recipe": recipe}
            if _needs(recipe).divergence and rng.random() < 0.5:
                choice["divergence"] = rng.choice(OPTIONS["divergence"])
            if rng.random() < 0.4:
                choice["regime"] = rng.choice(OPTIONS["regime"])
            knobs = rng.sample(COMMON_KNOBS, rng.randint(0, 2))
        combos.append([f"{g}={o}" for g, o in choice.items()] + _small(choice, files) + knobs)
    return combos


def _outcome(overrides: list[str], root: Path) -> str:
    """'built' or 'refused: <sentence>'; anything else fails the test."""
    problem = composition_error("train", overrides)
    if problem is not None:
        assert "\n" not in problem and problem, overrides
        return f"refused: {problem}"
    cfg = compose_cfg([*QUIET, *overrides], root)
    try:
        build(cfg)
    except ConfigError as e:
        sentence = str(e)
        assert sentence and "\n" not in sentence, (overrides, sentence)
        return f"refused: {sentence}"
    return "built"


def test_random_combinations_build_or_are_refused_in_one_sentence(files, tmp_path, capsys):
    outcomes = {}
    for n, overrides in enumerate(_combinations(files)):
        try:
            outcomes[tuple(overrides)] = _outcome(overrides, tmp_path / f"c{n}")
        except Exception as e:  # a traceback a user would see
            pytest.fail(f"kd {' '.join(overrides)} raised {type(e).__name__}: {e}")
    built = [list(o) for o, r in outcomes.items() if r == "built"]
    refused = [r for r in outcomes.values() if r != "built"]
    assert len(outcomes) >= 50 and len(built) >= 10 and len(refused) >= 10, (len(built), len(refused))

    # a sample of what builds runs to the end (or stops before training with one sentence)
    by_recipe: dict[str, list[str]] = {}
    for overrides in built:
        recipe = next((o for o in overrides if o.startswith("recipe=")), "recipe=hinton")
        by_recipe.setdefault(recipe, overrides)
    completed = 0
    for n, overrides in enumerate(list(by_recipe.values())[:END_TO_END]):
        cfg = compose_cfg([*QUIET, *overrides, "debug=fast_dev_run"], tmp_path / f"e{n}")
        capsys.readouterr()
        try:
            summary = one_sentence_errors("kd", train, cfg)
        except SystemExit as e:
            assert e.code == 2, overrides
            lines = capsys.readouterr().err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("kd: error: "), (overrides, lines)
            continue
        assert summary["results"], overrides
        completed += 1
    assert completed >= END_TO_END // 2, completed


# ----------------------------------------------------------------------------- combinations that must be refused

#: the embedded task at toy size with its Llamas (build(setup=False) never trains a tokenizer)
TASK_DATA = ["data=task", "data.source.train_size=120", "data.source.val_size=12", "data.source.test_size=12",
             "data.vocab_size=300", "data.min_frequency=20"]
TASK = [*TASK_DATA, "teacher=task_llama", "student=task_llama", "student.hidden_size=32",
        "teacher.model.hidden_size=32", "teacher.model.num_layers=1"]
ROUTED = [*TASK_DATA, "teacher=none", "student=task_llama", "student.hidden_size=32"]
DIGITS = ["data=digits", "teacher=digits_cnn", "student=digits_mlp"]
ONE_TEACHER = "teachers={a: {model: {_target_: kd.models.tiny_causal_lm, vocab_size: 300, hidden_size: 32, num_layers: 1}}}"
TWO_TEACHERS = ("teachers={a: {model: {_target_: kd.models.tiny_causal_lm, vocab_size: 300, hidden_size: 32, "
                "num_layers: 1}}, b: {model: {_target_: kd.models.tiny_causal_lm, vocab_size: 300, hidden_size: 32, "
                "num_layers: 1}}}")

#: (overrides, a piece of the one sentence that refuses them, whether build sets up the data):
#: at least one per refusal rule of kd/build.py, kd/recipe.py, kd/regimes.py and the recipes
REFUSALS: list[tuple[list[str], str, bool]] = [
    # composition (kd.cli.composition_error)
    (["recipe=no_such_recipe"], "no_such_recipe", False),
    # build._check_kinds
    ([*DIGITS, "recipe=gkd"], "recipe gkd distils", False),
    ([*TASK_DATA, "teacher=digits_cnn", "student=task_llama"], "teacher=digits_cnn is a", False),
    ([*TASK_DATA, "teacher=task_llama", "student=digits_mlp"], "student=digits_mlp builds a", False),
    ([*DIGITS, "student=from_teacher"], "copies a transformers teacher's layers", False),
    ([*DIGITS, "regime=on_policy"], "regime=on_policy generates text and needs a language-model datamodule", False),
    ([*DIGITS, "divergence.reduction=seq_mean"], "divergence.reduction=seq_mean averages over each sequence", False),
    # build._check_resolves
    (["data=jsonl", "teacher=task_llama", "student=task_llama"], "data.source.train must be set for this run", False),
    ([*DIGITS, "+student.width=${data.no_such_key}"], "cannot be resolved", False),
    # build._check_groups
    ([*DIGITS, "recipe=supervised", "divergence=forward_kl"], "recipe supervised uses no divergence", False),
    ([*TASK, ONE_TEACHER, "data.routes={upper: a}"], "teacher= and teachers: both name teachers", False),
    ([*DIGITS, "teacher=none"], "recipe hinton needs a teacher", False),
    ([*TASK, "recipe=minillm", "trainer.accumulate_grad_batches=2"], "runs its own optimisation loop", False),
    ([*TASK, "recipe=minillm", "trainer.gradient_clip_val=1.0"], "runs its own optimisation loop", False),
    ([*DIGITS, "seed=abc"], "seed must be an integer", False),
    ([*DIGITS, "student_init=/tmp", "student_sft={max_epochs: 1}"], "student_init and student_sft both", False),
    ([*DIGITS, "student_init=/no/such/student"], "student_init '/no/such/student' does not exist", False),
    ([*DIGITS, "ckpt_path=/no/such/last.ckpt"], "ckpt_path '/no/such/last.ckpt' does not exist", False),
    # build.build: routed teachers, students copied from a teacher
    ([*ROUTED, ONE_TEACHER], "nothing routes examples to them", False),
    ([*ROUTED, ONE_TEACHER, "data.routes={upper: b}"], "which teachers: does not name", False),
    ([*ROUTED, ONE_TEACHER, "data.routes={upper: a}", "regime=teacher_generated"],
     "generates data with one teacher, not with routed teachers", False),
    ([*ROUTED, ONE_TEACHER, "data.routes={upper: a}", "recipe=byte_kd"],
     "recipe byte_kd gives its teacher its own tokenizer, which routed teachers (teachers:) cannot have", False),
    # kd.checks.check_recipe (also what DistillationRecipe.__init__ asks)
    ([*DIGITS, "~divergence"], "recipe hinton needs a divergence", False),
    ([*TASK, "recipe=minillm", "regime=on_policy"], "recipe minillm cannot train with regime=on_policy; use regime=offline", False),
    ([*TASK, "recipe=cross_stage", "regime=mixed"], "recipe cross_stage cannot train with regime=mixed; use regime=offline", False),
    # kd.regimes: the logit cache's rules
    ([*TASK, "recipe=supervised", "regime=teacher_logits"],
     "regime=teacher_logits caches a teacher's outputs but recipe supervised runs without one", False),
    ([*ROUTED, ONE_TEACHER, "data.routes={upper: a}", "regime=teacher_logits"],
     "regime=teacher_logits generates data with one teacher, not with routed teachers", False),
    ([*TASK, "recipe=uld", "regime=teacher_logits"], "whose positions the logit cache", False),
    ([*TASK, "recipe=byte_kd", "regime=teacher_logits"], "whose positions the logit cache", False),
    (["data=text", "teacher=text_bert", "student=from_teacher", "recipe=hinton", "regime=teacher_logits"],
     "masked-LM data draws new masks", False),
    (["data=text", "teacher=text_bert", "student=from_teacher", "recipe=distilbert", "regime=teacher_logits"],
     "also distils the teacher's hidden states, which the logit cache does not hold", False),
    ([*TASK, "recipe.temperature=2.0", "regime=teacher_logits", "regime.temperature=3.0"],
     "stores the teacher at another temperature", False),
    ([*TASK, "regime=teacher_logits", "regime.top_k=0"], "regime.top_k must be a positive number", False),
    ([*TASK, "regime=teacher_logits", "regime.logprob_dtype=int8"], "regime.logprob_dtype must be one of", False),
    # kd.regimes: generated data and mixtures
    ([*TASK, "regime=mixed", "regime.lmbda=1.5"], "regime.lmbda must be in [0, 1]", False),
    ([*TASK, "regime=teacher_generated", "regime.select=best"], "regime.select must be", False),
    ([*TASK, "regime=teacher_generated", "regime.num_candidates=0"], "regime.num_candidates must be >= 1", False),
    ([*TASK, "regime=on_policy", "regime.sampling.top_p=0"], "top_p must be in (0, 1]", False),
    # the recipes' own settings
    ([*DIGITS, "recipe.lam=1.5"], "recipe.lam must be in [0, 1]", False),
    ([*DIGITS, "recipe.temperature=0"], "recipe.temperature must be > 0", False),
    ([*TASK, "recipe=gkd", "divergence.reduction=sum"], "GKD averages over tokens or sequences", False),
    ([*TASK, "recipe=minillm", "recipe.variant=blog"], "recipe.variant must be one of", False),
    ([*TASK, "recipe=minillm", "recipe.mix_alpha=1.5"], "recipe.mix_alpha must be in [0, 1]", False),
    ([*TASK, "recipe=minillm", "recipe.num_minibatches=64", "data.batch_size=8"],
     "splits each batch of 8 rollouts into more mini-batches than rollouts", False),
    ([*TASK, "recipe=cross_stage", "recipe.estimator=grpo"], "recipe.estimator must be one of", False),
    ([*TASK, "recipe=cross_stage", "recipe.stage_objective=grpo", "recipe.group_size=1"],
     "recipe.group_size must be >= 2", False),
    ([*TASK, "recipe=cross_stage", "recipe.lam=0", "recipe.stage_weight=0"], "not both 0", False),
    ([*TASK, "recipe=seqkd", "recipe.alpha=2"], "recipe.alpha must be in [0, 1]", False),
    ([*TASK, "recipe=byte_kd", "regime=mixed", "regime.seq_kd=true"],
     "cross-tokenizer recipes cannot train on teacher-generated tokens", False),
    ([*TASK, "recipe=uld", "divergence=forward_kl"], "recipe uld compares distributions over two vocabularies", False),
    ([*TASK, "recipe=byte_kd", "recipe.num_heads=0"], "recipe.num_heads must be >= 1", False),
    (["data=text", "teacher=text_bert", "student=from_teacher", "recipe=distilbert", "recipe.temperature=0"],
     "recipe.temperature must be > 0", False),
    # data and tokenizers (these set the data up)
    ([*TASK, "data.source.skills=[juggle]"], "unknown skill(s) 'juggle'", True),
    ([*TASK, "teacher=task_llama_tok512", "teacher.model.hidden_size=32", "teacher.model.num_layers=1"],
     "the data's and the teacher's tokenizers differ", True),
]


def _refusal(overrides: list[str], root: Path, setup: bool) -> str:
    """The sentence refusing ``overrides`` before anything trains, or 'built'."""
    problem = composition_error("train", overrides)
    if problem is not None:
        return problem
    cfg = compose_cfg([*QUIET, *overrides], root)
    try:
        build(cfg, setup=setup)
    except ConfigError as e:
        return str(e)
    return "built"


@pytest.mark.parametrize("overrides,sentence,setup", REFUSALS, ids=[s for _, s, _ in REFUSALS])
def test_combinations_that_must_be_refused_are(overrides, sentence, setup, tmp_path):
    """Each combination a rule forbids is refused before anything trains, by that rule's
    sentence (one line), never built; nothing is trained or cached on the way."""
    got = _refusal(overrides, tmp_path, setup)
    assert got != "built", f"kd {' '.join(overrides)} built; expected a refusal with {sentence!r}"
    assert sentence in got and "\n" not in got, (overrides, got)
    assert not (tmp_path / "cache" / "teachers").exists() and not (tmp_path / "run" / "checkpoints").exists()
