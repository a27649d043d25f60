"""Speculative KD's interleaved sampling (kd/speculative.py, regime=speculative): its two
limits (K >= V is the student's own sampling, K = 1 greedy the teacher's greedy answer), the
replacements a hand-made pair of distributions must give (checked against a plain
CDF-inversion reference written here), routed teachers, and one-sentence refusals."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from kd import ConfigError
from kd.batches import REPLACED
from kd.data import IGNORE_INDEX
from kd.generation import GenerationConfig, generate
from kd.models import tiny_causal_lm
from kd.regimes import OnPolicy, Speculative
from kd.speculative import Interleave
from kd.teachers import Teachers


def model(seed, vocab=300):
    """A tiny random LM with its own output head (a tied one mostly repeats its last token,
    and two such models would agree everywhere)."""
    torch.manual_seed(seed)
    return tiny_causal_lm(vocab_size=vocab, hidden_size=32, num_layers=1, tie_word_embeddings=False).eval()


def responses(out):
    return [row[row != IGNORE_INDEX].tolist() for row in out["labels"]]


def test_k_at_least_the_vocabulary_gives_the_students_own_samples(dm):
    student, teacher = model(3), model(4)
    batch = next(iter(dm.train_dataloader()))
    for sampling in ({"temperature": 1.0}, {"temperature": 0.8, "top_p": 0.9}):
        torch.manual_seed(11)
        own = OnPolicy(sampling=sampling).batch(student, batch, dm)
        regime = Speculative(top_k=len(dm.tokenizer), sampling=sampling)
        regime.prepare(teacher, dm)
        torch.manual_seed(11)
        spec = regime.batch(student, batch, dm)
        for key in ("input_ids", "attention_mask", "labels", "prompt_ids", "prompt_mask"):
            assert torch.equal(spec[key], own[key]), key
        assert not spec[REPLACED].any() and regime.metrics() == {"replaced_share": 0.0}


def test_k_one_with_greedy_sampling_gives_the_teachers_greedy_answer(dm):
    student, teacher = model(3), model(4)
    batch = next(iter(dm.train_dataloader()))
    regime = Speculative(top_k=1, sampling={"temperature": 0.0})
    regime.prepare(teacher, dm)
    out = regime.batch(student, batch, dm)
    config = GenerationConfig(max_new_tokens=6, temperature=0.0, eos_token_id=dm.tokenizer.eos_token_id,
                              pad_token_id=dm.pad_token_id, vocab_size=len(dm.tokenizer))
    gold = generate(teacher, batch["prompt_ids"], batch["prompt_mask"], config)
    own = generate(student, batch["prompt_ids"], batch["prompt_mask"], config)
    assert responses(out) == [r[m].tolist() for r, m in zip(gold.responses, gold.response_mask)]
    assert responses(out) != [r[m].tolist() for r, m in zip(own.responses, own.response_mask)]
    # the marks sit on response tokens only, and their share is what is logged
    marks = out[REPLACED]
    assert not (marks & (out["labels"] == IGNORE_INDEX)).any()
    share = marks.sum().item() / (out["labels"] != IGNORE_INDEX).sum().item()
    assert 0 < share <= 1 and regime.metrics()["replaced_share"] == pytest.approx(share)
    # the first token of each row is replaced exactly when the student's greedy choice differs from the teacher's
    first = [len(p[m.bool()]) for p, m in zip(batch["prompt_ids"], batch["prompt_mask"])]
    for row, start in enumerate(first):
        assert bool(marks[row, start]) == (own.responses[row, 0] != gold.responses[row, 0]).item()


class Bigram(nn.Module):
    """A causal LM whose next-token logits depend on the last token only (a fixed table),
    with the call signature generate() uses; its "cache" is a placeholder."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.as_tensor(table, dtype=torch.float32)
        self.anchor = nn.Parameter(torch.zeros(1))  # generate() reads the device of a parameter

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False):
        return SimpleNamespace(logits=self.table[input_ids], past_key_values=())


def reference_interleave(student_table, teacher_table, prompts, k, steps, generator):
    """Plain loops: draw the student's token by CDF inversion with one uniform per row; a token
    outside the teacher's k best is redrawn from the teacher with one uniform per rejected row."""
    sp = torch.softmax(torch.as_tensor(student_table, dtype=torch.float64), -1).tolist()
    tp = torch.softmax(torch.as_tensor(teacher_table, dtype=torch.float64), -1).tolist()

    def invert(probs, u):
        total, acc = sum(probs), 0.0
        for token, p in enumerate(probs):
            acc += p
            if acc > u * total:
                return token
        return len(probs) - 1

    last = [p[-1] for p in prompts]
    tokens, marks = [[] for _ in prompts], [[] for _ in prompts]
    for _ in range(steps):
        u = torch.rand((len(prompts), 1), dtype=torch.float64, generator=generator).squeeze(-1).tolist()
        proposals = [invert(sp[t], u[i]) for i, t in enumerate(last)]
        ranks = [sorted(range(len(tp[t])), key=lambda j: -tp[t][j]) for t in last]
        kth = [tp[t][ranks[i][k - 1]] for i, t in enumerate(last)]
        rejected = [i for i, y in enumerate(proposals) if tp[last[i]][y] < kth[i]]
        if rejected:
            v = torch.rand((len(rejected), 1), dtype=torch.float64, generator=generator).squeeze(-1).tolist()
            for i, vi in zip(rejected, v):
                proposals[i] = invert(tp[last[i]], vi)
        for i, y in enumerate(proposals):
            tokens[i].append(y)
            marks[i].append(i in rejected)
        last = proposals
    return tokens, marks


def test_a_hand_made_pair_of_distributions_gives_the_expected_replacements():
    # vocabulary of 5; the student's next token depends on the last one, and so does the teacher's ranking
    student_table = [[0.0, 3.0, 2.0, 1.0, 0.5], [2.0, 0.0, 1.0, 0.0, 3.0], [1.0, 1.0, 1.0, 1.0, 1.0],
                     [0.0, 0.0, 0.0, 4.0, 0.0], [3.0, 0.0, 0.0, 0.0, 2.5]]
    teacher_table = [[4.0, 0.0, 1.0, 2.0, 3.0], [0.0, 4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 4.0, 0.0, 3.0],
                     [3.0, 4.0, 0.0, 1.0, 2.0], [2.0, 1.0, 0.0, 4.0, 3.0]]
    student, teacher = Bigram(student_table), Bigram(teacher_table)
    prompts = [[0], [1], [2], [3], [4], [2]]
    ids = torch.tensor(prompts)
    config = GenerationConfig(max_new_tokens=8, temperature=1.0)
    for k in (1, 2, 3, 5):
        out = generate(student, ids, None, config, generator=torch.Generator().manual_seed(5),
                       mix=Interleave(teacher, k))
        tokens, marks = reference_interleave(student_table, teacher_table, prompts, k, 8,
                                             torch.Generator().manual_seed(5))
        assert out.responses.tolist() == tokens, k
        assert out.replaced.tolist() == marks, k
        if k == 5:
            assert not out.replaced.any()  # K = V: every proposal stands
        if k == 1:
            assert out.replaced.any()
    # greedy: the student's argmax stands only when it is among the teacher's K best
    out = generate(student, ids, None, GenerationConfig(max_new_tokens=1, temperature=0.0), mix=Interleave(teacher, 2))
    # last token 0: student argmax 1, teacher ranks 0, 4 -> replaced by 0;  1: student 4, teacher 1, 2 -> 1
    # 2: student ties (argmax 0), teacher 2, 4 -> 2;  3: student 3, teacher 1, 0 -> 1;  4: student 0, teacher 3, 4 -> 3
    assert out.responses[:, 0].tolist() == [0, 1, 2, 1, 3, 2]
    assert out.replaced[:, 0].tolist() == [True, True, True, True, True, True]
    out = generate(student, ids, None, GenerationConfig(max_new_tokens=1, temperature=0.0), mix=Interleave(teacher, 3))
    # K = 3: the teacher's third best joins; only row 4's proposal (0) is now among them
    assert out.responses[:, 0].tolist() == [0, 1, 2, 1, 0, 2]
    assert out.replaced[:, 0].tolist() == [True, True, True, True, False, True]


def test_routed_teachers_verify_their_own_rows_and_rows_without_one_keep_the_students_tokens():
    student_table = [[0.0, 3.0, 2.0, 1.0], [2.0, 0.0, 1.0, 3.5], [1.0, 3.0, 0.0, 1.5], [0.5, 0.0, 3.0, 1.0]]
    first_table = [[4.0, 0.0, 1.0, 2.0], [0.0, 4.0, 3.0, 2.0], [1.0, 2.0, 4.0, 0.0], [3.0, 4.0, 0.0, 1.0]]
    second_table = [[0.0, 1.0, 2.0, 4.0], [4.0, 3.0, 0.0, 1.0], [0.0, 4.0, 1.0, 2.0], [2.0, 0.0, 1.0, 4.0]]
    student = Bigram(student_table)
    teachers = Teachers({"a": Bigram(first_table), "b": Bigram(second_table)})
    ids = torch.tensor([[0], [1], [2], [3], [0]])
    route = torch.tensor([0, 1, -1, 1, 0])
    config = GenerationConfig(max_new_tokens=5, temperature=0.0)
    models = [m for _, m in teachers.items()]
    out = generate(student, ids, None, config, mix=Interleave(models, 1, route))

    def greedy(table, start, n=5):
        seq = [start]
        for _ in range(n):
            seq.append(max(range(len(table)), key=lambda j: table[seq[-1]][j]))
        return seq[1:]

    assert out.responses.tolist() == [greedy(first_table, 0), greedy(second_table, 1), greedy(student_table, 2),
                                      greedy(second_table, 3), greedy(first_table, 0)]
    assert not out.replaced[2].any()


def test_speculative_refusals_are_one_sentence():
    with pytest.raises(ConfigError, match="regime.top_k must be a positive number"):
        Speculative(top_k=0)
    regime = Speculative()
    needs = SimpleNamespace(teacher_tokenizer="own")
    with pytest.raises(ConfigError, match="use regime=on_policy"):
        regime.check_recipe("byte_kd", needs, teacher=True, routed=False, temperature=None)
    with pytest.raises(ConfigError, match="runs without one"):
        regime.check_recipe("supervised", SimpleNamespace(teacher_tokenizer="shared"), teacher=False, routed=False,
                            temperature=None)


def test_gkd_trains_on_speculative_batches_with_routed_teachers_inside_lightning(make_cfg, tmp_path):
    import csv

    from omegaconf import OmegaConf, open_dict

    from kd.runs import train
    from tests.conftest import SMALL_TASK

    teacher = {"model": {"_target_": "kd.models.tiny_causal_lm", "vocab_size": "${data.vocab_size}",
                         "hidden_size": 32, "num_layers": 1, "max_position_embeddings": "${data.max_length}"},
               "fit": {"max_epochs": 1, "seed": 0, "optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True,
                                                                 "lr": 1e-3}}}
    cfg = make_cfg(*[o for o in SMALL_TASK if not o.startswith("teacher")], "teacher=none", "recipe=gkd",
                   "regime=speculative", "regime.top_k=2", "regime.sampling.max_new_tokens=4",
                   "data.routes={upper: a, reverse: b}", "trainer.max_steps=3", "trainer.limit_val_batches=0",
                   "trainer.limit_test_batches=1", "scratch_baseline=false", "logger=csv", "trainer.log_every_n_steps=1")
    with open_dict(cfg):
        cfg.teachers = OmegaConf.create({"a": teacher, "b": teacher})
    summary = train(cfg)
    assert "student, gkd" in summary["results"]
    rows = list(csv.DictReader(open(next((tmp_path / "run").rglob("metrics.csv")))))
    shares = [float(r["train/regime/replaced_share"]) for r in rows if r.get("train/regime/replaced_share")]
    assert len(shares) == 3 and all(0.0 < s <= 1.0 for s in shares)  # two untrained-alike models disagree often
