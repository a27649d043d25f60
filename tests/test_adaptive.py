"""DistiLLM's adaptive off-policy regime (kd.regimes.Adaptive): the student-data probability
under a scripted validation loss, the replay buffer's contents and sampling, the state a
resumed run continues from, and the validation hook inside Lightning."""

from __future__ import annotations

import csv
from collections import Counter

import pytest
import torch

from kd import ConfigError
from kd.data import IGNORE_INDEX
from kd.models import tiny_causal_lm
from kd.regimes import Adaptive, OnPolicy

GREEDY = {"temperature": 0.0}


@pytest.fixture(scope="module")
def student():
    torch.manual_seed(3)
    return tiny_causal_lm(vocab_size=300, hidden_size=32, num_layers=1, tie_word_embeddings=False).eval()


def rows_of(batch):
    """Each row as (prompt ids, response ids, index)."""
    out = []
    for r in range(len(batch["labels"])):
        prompt = batch["prompt_ids"][r][batch["prompt_mask"][r].bool()].tolist()
        labels = batch["labels"][r]
        out.append((tuple(prompt), tuple(labels[labels != IGNORE_INDEX].tolist()), int(batch["index"][r])))
    return out


def test_the_student_data_probability_follows_the_scripted_validation_loss():
    regime = Adaptive(init_prob=0.0, loss_eps=0.1, prob_step=0.1)
    losses = [2.0, 1.9, 2.05, 2.13, 2.2, 2.25, 2.3, 2.5, 2.49]
    # by hand: the first loss is the reference 2.0; 1.9 and 2.05 stay below 2.1; 2.13 >= 2.1 raises phi to 0.1
    # (reference 2.13); 2.2 < 2.23; 2.25 >= 2.23 -> 0.2 (reference 2.25); 2.3 < 2.35; 2.5 >= 2.35 -> 0.3; 2.49 < 2.6
    expected = [0.0, 0.0, 0.0, 0.1, 0.1, 0.2, 0.2, 0.3, 0.3]
    seen = []
    for loss in losses:
        regime.on_validation({"val/loss": loss, "val/acc": 0.5})
        seen.append(regime.prob)
    assert seen == pytest.approx(expected)
    # it never passes 1, and another monitor follows another value
    steep = Adaptive(init_prob=0.85, loss_eps=0.0, monitor="val/acc")
    for value in (0.1, 0.2, 0.3, 0.4):
        steep.on_validation({"val/loss": 9.0, "val/acc": value})
    assert steep.prob == 1.0
    with pytest.raises(ConfigError, match="regime.monitor=val/nope is not among the validation values"):
        Adaptive(monitor="val/nope").on_validation({"val/loss": 1.0})


def test_the_buffer_keeps_the_newest_student_samples_and_replays_them(dm, student):
    loader = iter(dm.train_dataloader())
    data = [next(loader) for _ in range(4)]
    regime = Adaptive(init_prob=1.0, capacity=16, replay_ratio=0.0, sampling=GREEDY)  # every student batch fresh
    made = []
    for batch in data[:3]:
        out = regime.batch(student, batch, dm)
        assert regime.last == "fresh"
        # the fresh batch is the student's own (greedy: exactly OnPolicy's)
        own = OnPolicy(sampling=GREEDY).batch(student, batch, dm)
        assert torch.equal(out["input_ids"], own["input_ids"]) and torch.equal(out["labels"], own["labels"])
        made.append(rows_of(out))
    # capacity 16 = two batches: the first batch's rows were dropped, the oldest first
    kept = [(r["prompt"], r["response"], r["index"]) for r in regime.buffer.rows]
    assert [(tuple(p), tuple(a), i) for p, a, i in kept] == made[1] + made[2]

    replay = Adaptive(init_prob=1.0, capacity=16, replay_ratio=1.0, seed=4, sampling=GREEDY)  # every one replayed
    replay.buffer.load_state_dict(regime.buffer.state_dict())
    stored = set(made[1] + made[2])
    drawn = Counter()
    for _ in range(20):
        out = replay.batch(student, data[3], dm)
        assert replay.last == "replayed"
        rows = rows_of(out)
        assert len(rows) == 8 and len(set(rows)) == 8 and set(rows) <= stored  # stored rows, none twice
        drawn.update(rows)
        # the replayed batch is a well-formed training batch: prompt then response, labels on the response only
        for r, (prompt, response, _) in enumerate(rows):
            n = len(prompt) + len(response)
            assert out["input_ids"][r][:n].tolist() == list(prompt + response)
            assert out["attention_mask"][r].sum() == n
    assert set(drawn) == stored  # every kept row comes back (20 draws of 8 of 16)


def test_the_three_kinds_of_batch_follow_phi_and_the_replay_schedule(dm, student):
    batch = next(iter(dm.train_dataloader()))
    assert all(Adaptive(init_prob=0.0).batch(student, batch, dm) is batch for _ in range(5))  # phi 0: the data
    regime = Adaptive(init_prob=0.6, capacity=8, replay_ratio="decreasing", seed=1, sampling=GREEDY)
    regime.set_progress(25, 100)  # t = 0.25: a student batch is fresh with probability 0.75
    kinds = []
    for _ in range(300):
        regime.batch(student, batch, dm)
        kinds.append(regime.last)
    counts = Counter(kinds[1:])  # the first student batch fills the buffer (capacity 8 = one batch)
    assert counts["dataset"] / 299 == pytest.approx(0.4, abs=0.08)
    assert counts["fresh"] / (counts["fresh"] + counts["replayed"]) == pytest.approx(0.75, abs=0.1)
    assert regime.counts == Counter(kinds)
    for schedule, progress, fresh in (("decreasing", 0.3, 0.7), ("increasing", 0.3, 0.3), ("constant", 0.9, 0.5),
                                      (0.25, 0.9, 0.75)):
        r = Adaptive(replay_ratio=schedule)
        r.set_progress(int(progress * 10), 10)
        assert r.fresh_share() == pytest.approx(fresh)


def test_a_restored_regime_continues_the_same_schedule_with_the_same_buffer(dm, student):
    loader = iter(dm.train_dataloader())
    data = [next(loader) for _ in range(6)]

    def run(regime, batches):
        return [(regime.last, rows_of(out) if out is not batch else None)
                for batch in batches for out in [regime.batch(student, batch, dm)]]

    settings = dict(init_prob=0.7, capacity=16, replay_ratio="constant", seed=9, sampling=GREEDY)
    whole = Adaptive(**settings)
    expected = run(whole, data * 3)
    assert {kind for kind, _ in expected} == {"fresh", "replayed", "dataset"}
    first = Adaptive(**settings)
    part = run(first, (data * 3)[:7])
    first.on_validation({"val/loss": 1.0})
    state = first.state_dict()
    resumed = Adaptive(**{**settings, "seed": 0, "init_prob": 0.0})
    resumed.load_state_dict(state)
    assert resumed.reference == 1.0 and resumed.prob == 0.7 and len(resumed.buffer) == len(first.buffer)
    assert part + run(resumed, (data * 3)[7:]) == expected
    with pytest.raises(ConfigError, match="regime.replay_ratio must be one of"):
        Adaptive(replay_ratio="sometimes")
    with pytest.raises(ConfigError, match=r"regime.init_prob must be in \[0, 1\]"):
        Adaptive(init_prob=2)


def test_the_validation_values_reach_the_regime_inside_lightning(make_cfg, tmp_path):
    from kd.runs import train
    from tests.conftest import SMALL_TASK

    train(make_cfg(*SMALL_TASK, "recipe=gkd", "regime=adaptive", "regime.init_prob=0.5", "regime.capacity=16",
                   "regime.sampling.max_new_tokens=4", "trainer.max_epochs=2", "trainer.limit_train_batches=3",
                   "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "scratch_baseline=false",
                   "logger=csv", "trainer.log_every_n_steps=1"))
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)["kd_regime"]
    assert isinstance(state["reference"], float)  # the first validation's loss became the reference
    assert sum(state["counts"].values()) == 6 and len(state["buffer"]) > 0
    # every step logs the regime's numbers; the kinds logged are the kinds counted
    rows = [r for r in csv.DictReader(open(next((tmp_path / "run").rglob("metrics.csv"))))
            if r.get("train/regime/student_prob")]
    assert len(rows) == 6 and all(float(r["train/regime/student_prob"]) >= 0.5 for r in rows)
    assert sum(float(r["train/regime/fresh"]) for r in rows) == state["counts"]["fresh"]
    assert sum(float(r["train/regime/replayed"]) for r in rows) == state["counts"]["replayed"]
    # the epoch means are the shares of every batch, one row per epoch (3 batches each)
    epochs = [r for r in csv.DictReader(open(next((tmp_path / "run").rglob("metrics.csv"))))
              if r.get("train/regime/fresh_epoch")]
    assert len(epochs) == 2
    for epoch, r in enumerate(epochs):
        steps = [s for s in rows if int(s["epoch"]) == epoch]
        assert len(steps) == 3
        for kind in ("fresh", "replayed"):
            assert float(r[f"train/regime/{kind}_epoch"]) == pytest.approx(
                sum(float(s[f"train/regime/{kind}"]) for s in steps) / 3)
