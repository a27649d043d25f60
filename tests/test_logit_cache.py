"""The teacher logit cache (``regime=teacher_logits``, docs/spec.md section 8): what it
stores, that recipes reading it equal the live teacher at k = V, its key and reuse, broken
entries, a full run whose training steps never call the teacher, and the refusals."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch

from kd import ConfigError, subruns
from kd.build import build
from kd.cache import MARKER, file_sha256
from kd.checks import check_recipe
from kd.data import IGNORE_INDEX
from kd.data.lm import LMDataModule
from kd.data.sources import TaskSource
from kd.divergences import JSD, ForwardKL
from kd.models import freeze, tiny_causal_lm
from kd.recipe import Needs
from kd.regimes import TeacherLogits
from kd.signals import SIGNAL_FORMS
from recipes.gkd import GKD
from recipes.hinton import Hinton
from recipes.seqkd import SeqKD
from tests.conftest import SMALL_TASK


@pytest.fixture(scope="module")
def dm():
    module = LMDataModule(TaskSource(train_size=48, val_size=8, test_size=8), vocab_size=300, batch_size=8,
                          max_length=48)
    module.setup()
    return module


def model(seed: int, vocab: int = 320):
    """A tiny Llama whose output layer (320) is padded past the tokenizer's vocabulary."""
    torch.manual_seed(seed)
    return tiny_causal_lm(vocab_size=vocab, hidden_size=32, num_layers=1).eval()


class Calls:
    """Counts a model's forward calls (a forward hook)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.n = 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, *args) -> None:
        self.n += 1


def fixed_batch(dm, rows=(0, 5, 17, 30, 47)):
    """Training examples by index, collated as the training loader collates them."""
    return dm._train_like("train", shuffle=False).collate_fn([dm.splits["train"][i] for i in rows])


# ----------------------------------------------------------------------------- format


def test_training_batches_carry_each_examples_index(dm):
    batch = next(iter(dm.train_dataloader()))
    assert batch["index"].shape == (len(batch["input_ids"]),)
    for row, i in enumerate(batch["index"].tolist()):
        prompt, response = dm.splits["train"].encoded[i]
        n = len(prompt) + len(response)
        assert batch["input_ids"][row, :n].tolist() == prompt + response


def test_cache_round_trips_the_teachers_top_k(dm, tmp_path):
    """(a) Each example's rows are the teacher's top-k at T of a forward on that example
    alone (fp16 tolerance), and a batch puts them at the recipe's shifted positions."""
    teacher = freeze(model(1))
    V, T, k = len(dm.tokenizer), 2.0, 16
    regime = TeacherLogits(cache_dir=str(tmp_path), top_k=k, temperature=T)
    regime.prepare(teacher, dm)
    assert regime.ids.dtype == np.uint16 and regime.logprobs.dtype == np.float16 and regime.ids.shape[1] == k
    counts = [len(r) for _, r in dm.splits["train"].encoded]
    assert regime.offsets.tolist() == [0, *np.cumsum(counts).tolist()]
    for i in (0, 11, 47):
        prompt, response = dm.splits["train"].encoded[i]
        with torch.no_grad():
            logits = teacher(input_ids=torch.tensor([prompt + response])).logits[0, :, :V]
        # position j predicts token j+1: the response's tokens are predicted from len(prompt)-1 on
        expected = torch.log_softmax(logits[len(prompt) - 1 : len(prompt) - 1 + len(response)] / T, -1).topk(k)
        a, b = regime.offsets[i], regime.offsets[i + 1]
        assert torch.equal(torch.from_numpy(regime.ids[a:b].astype(np.int64)), expected.indices)
        torch.testing.assert_close(torch.from_numpy(regime.logprobs[a:b].astype(np.float32)), expected.values,
                                   rtol=1e-3, atol=2e-3)
    batch = fixed_batch(dm)
    cached = regime.batch(None, batch, dm)
    topk = cached["teacher_topk"]
    mask = batch["labels"][:, 1:] != IGNORE_INDEX
    assert topk.ids.shape == topk.logprobs.shape == (*mask.shape, k) and topk.tail
    assert topk.ids.dtype == torch.long and topk.logprobs.dtype == torch.float32
    with torch.no_grad():
        logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1, :V]
    expected = torch.log_softmax(logits / T, -1).topk(k)
    assert torch.equal(topk.ids[mask], expected.indices[mask])
    torch.testing.assert_close(topk.logprobs[mask], expected.values[mask], rtol=1e-3, atol=2e-3)
    assert all(torch.equal(cached[key], batch[key]) for key in batch)  # the batch itself is unchanged


@pytest.mark.parametrize("recipe", ["hinton", "gkd", "word_kd"])
def test_full_vocabulary_cache_gives_the_live_teachers_loss(recipe, dm, tmp_path):
    """(b) k = V: the loss on a cached batch is the loss with the live teacher (fp32
    storage to 1e-5, fp16 to 1e-3), and the teacher never runs on the cached batch."""
    teacher, student = freeze(model(1)), model(2)
    T = 2.0
    make = {"hinton": lambda: Hinton(student=student, teacher=teacher, divergence=ForwardKL(), temperature=T),
            "gkd": lambda: GKD(student=student, teacher=teacher, divergence=JSD(beta=0.5), temperature=T),
            "word_kd": lambda: SeqKD(student=student, teacher=teacher, alpha=0.5, temperature=T)}[recipe]
    batch = fixed_batch(dm)
    for dtype, tolerance in (("float32", 1e-5), ("float16", 1e-3)):
        regime = TeacherLogits(cache_dir=str(tmp_path), top_k=10_000, temperature=T, logprob_dtype=dtype)
        regime.prepare(teacher, dm)
        assert regime.ids.shape[1] == len(dm.tokenizer)  # clipped to the vocabulary: the full teacher
        cached = regime.batch(student, batch, dm)
        r = make()
        r.set_vocabulary(len(dm.tokenizer))
        live = r.compute_loss(batch)["loss"]
        calls = Calls(teacher)
        from_cache = r.compute_loss(cached)["loss"]
        assert calls.n == 0
        assert from_cache.item() == pytest.approx(live.item(), abs=tolerance, rel=tolerance), dtype


def test_tail_bin_and_renormalised_top_k_differ_below_the_full_vocabulary(dm, tmp_path):
    teacher, student = freeze(model(1)), model(2)
    batch = fixed_batch(dm)
    recipe = Hinton(student=student, teacher=teacher, divergence=ForwardKL(), temperature=1.0)
    recipe.set_vocabulary(len(dm.tokenizer))
    live = recipe.compute_loss(batch)["soft_kd"].item()
    losses = {}
    for tail in (True, False):
        regime = TeacherLogits(cache_dir=str(tmp_path), top_k=4, temperature=1.0, tail=tail)
        regime.prepare(teacher, dm)
        losses[tail] = recipe.compute_loss(regime.batch(student, batch, dm))["soft_kd"].item()
    # merging bins never increases a KL (data processing): the tail-bin loss is below the full one,
    # and renormalising drops the tail mass altogether
    assert losses[True] <= live + 1e-6 and losses[False] != pytest.approx(losses[True])


# ----------------------------------------------------------------------------- key and reuse


def test_cache_is_reused_without_running_the_teacher_and_keyed_by_what_shapes_it(dm, tmp_path):
    """(c) A second prepare finds the entry and never calls the teacher; top_k, the
    temperature, the storage dtype, the teacher's weights and the data change the key."""
    teacher = freeze(model(1))
    calls = Calls(teacher)
    first = TeacherLogits(cache_dir=str(tmp_path), top_k=16, temperature=2.0)
    first.prepare(teacher, dm)
    assert first.built and calls.n == math.ceil(len(dm.splits["train"]) / first.batch_size)
    calls.n = 0
    again = TeacherLogits(cache_dir=str(tmp_path), top_k=16, temperature=2.0)
    again.prepare(teacher, dm)
    assert calls.n == 0 and not again.built and again.path == first.path
    assert np.array_equal(again.ids, first.ids) and np.array_equal(again.logprobs, first.logprobs)

    key = first.key(teacher, dm)
    assert TeacherLogits(cache_dir=str(tmp_path), top_k=16, temperature=2.0).key(teacher, dm) == key
    changed = [TeacherLogits(cache_dir=str(tmp_path), top_k=8, temperature=2.0).key(teacher, dm),
               TeacherLogits(cache_dir=str(tmp_path), top_k=16, temperature=1.0).key(teacher, dm),
               TeacherLogits(cache_dir=str(tmp_path), top_k=16, temperature=2.0,
                             logprob_dtype="float32").key(teacher, dm),
               first.key(freeze(model(2)), dm)]
    other = LMDataModule(TaskSource(train_size=40, val_size=8, test_size=8), vocab_size=300, max_length=48)
    other.tokenizer = dm.tokenizer
    other.setup()
    changed.append(first.key(teacher, other))
    assert len({key, *changed}) == 1 + len(changed)
    # tail only changes how the cache is read, not what it holds
    assert TeacherLogits(cache_dir=str(tmp_path), top_k=16, temperature=2.0, tail=False).key(teacher, dm) == key


@pytest.mark.parametrize("breakage", ["truncate", "corrupt", "foreign", "offsets"])
def test_broken_entries_are_detected_and_rebuilt(breakage, dm, tmp_path):
    """(d) A truncated shard, flipped bytes, another entry's marker, or a consistent entry
    whose offsets do not fit the data: each is rebuilt (the teacher runs again), never used."""
    teacher = freeze(model(1))
    good = TeacherLogits(cache_dir=str(tmp_path), top_k=16)
    good.prepare(teacher, dm)
    ids, logprobs = np.array(good.ids), np.array(good.logprobs)
    path = good.path
    good.ids = good.logprobs = None  # let go of the memory maps before damaging the files
    if breakage == "truncate":
        blob = (path / "ids.npy").read_bytes()
        (path / "ids.npy").write_bytes(blob[: len(blob) // 2])
    elif breakage == "corrupt":
        blob = bytearray((path / "logprobs.npy").read_bytes())
        blob[-10] ^= 0xFF
        (path / "logprobs.npy").write_bytes(bytes(blob))
    elif breakage == "foreign":
        meta = json.loads((path / MARKER).read_text())
        (path / MARKER).write_text(json.dumps({**meta, "name": "someone-else"}))
    else:  # readable, checksums right, but the offsets describe other response lengths
        offsets = np.load(path / "offsets.npy")
        offsets[1:-1] += 1
        np.save(path / "offsets.npy", offsets)
        meta = json.loads((path / MARKER).read_text())
        meta["files"]["offsets.npy"] = {"size": (path / "offsets.npy").stat().st_size,
                                        "sha256": file_sha256(path / "offsets.npy")}
        (path / MARKER).write_text(json.dumps(meta))
    calls = Calls(teacher)
    fresh = TeacherLogits(cache_dir=str(tmp_path), top_k=16)
    fresh.prepare(teacher, dm)
    assert fresh.built and calls.n > 0 and fresh.path == path
    assert np.array_equal(fresh.ids, ids) and np.array_equal(fresh.logprobs, logprobs)


# ----------------------------------------------------------------------------- bytes per token


def test_bytes_per_token_are_logged_and_at_most_300_at_k_64(dm, tmp_path, caplog):
    """(g) uint16 ids + fp16 log-probs: k * (2 + 2) = 256 bytes a position, plus offsets."""
    with caplog.at_level(logging.INFO, logger="kd.regimes"):
        regime = TeacherLogits(cache_dir=str(tmp_path), top_k=64)
        regime.prepare(freeze(model(1)), dm)
    assert 256 <= regime.bytes_per_token <= 300
    sizes = sum((regime.path / f).stat().st_size for f in ("ids.npy", "logprobs.npy", "offsets.npy"))
    assert regime.bytes_per_token == pytest.approx(sizes / regime.info["positions"])
    line = [r.getMessage() for r in caplog.records if "bytes per token" in r.getMessage()]
    assert line and f"{regime.bytes_per_token:.1f} bytes per token" in line[-1]


# ----------------------------------------------------------------------------- classifiers


def test_a_classifiers_cache_holds_one_position_per_example(tmp_path):
    from kd.data.digits import DigitsDataModule
    from kd.models import MLPClassifier

    data = DigitsDataModule(batch_size=32, val_size=270, test_size=1400)  # 127 training images
    data.setup()
    torch.manual_seed(0)
    teacher, student = freeze(MLPClassifier(in_features=64, hidden=[16], num_classes=10)), MLPClassifier(
        in_features=64, hidden=[8], num_classes=10)
    regime = TeacherLogits(cache_dir=str(tmp_path), top_k=64, temperature=4.0, logprob_dtype="float32")
    regime.prepare(teacher, data)
    assert regime.ids.shape == (len(data.splits["train"]), 10)  # k clipped to the 10 classes
    batch = next(iter(data.train_dataloader()))
    cached = regime.batch(student, batch, data)
    assert cached["teacher_topk"].ids.shape == (len(batch["inputs"]), 10)
    recipe = Hinton(student=student, teacher=teacher, divergence=ForwardKL(), temperature=4.0)
    live = recipe.compute_loss(batch)["loss"]
    calls = Calls(teacher)
    assert recipe.compute_loss(cached)["loss"].item() == pytest.approx(live.item(), abs=1e-5)
    assert calls.n == 0


# ----------------------------------------------------------------------------- end to end


def test_a_run_trains_from_the_cache_without_calling_the_teacher_in_training_steps(make_cfg):
    """(e) kd's composition root, recipe=hinton on the task with regime=teacher_logits: the
    cache is built once when training starts, no training step calls the teacher, and a
    second run reuses the cache without any teacher forward before training."""
    cfg = make_cfg(*SMALL_TASK, "recipe=hinton", "regime=teacher_logits", "regime.top_k=32", "trainer.max_epochs=1",
                   "trainer.limit_train_batches=4", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
                   "data.generation_eval_size=0")
    seen = []
    for attempt in range(2):
        run = build(cfg)
        subruns.prepare(run)
        regime = run.recipe.regime
        assert isinstance(regime, TeacherLogits) and regime.temperature == cfg.recipe.temperature == 4.0
        calls = Calls(run.teacher)
        state = {"steps": 0, "in_step": 0, "in_prepare": 0}
        step, prepare = run.recipe.training_step, regime.prepare

        def counted_step(*args, **kwargs):
            before = calls.n
            out = step(*args, **kwargs)
            state["steps"] += 1
            state["in_step"] += calls.n - before
            return out

        def counted_prepare(*args, **kwargs):
            before = calls.n
            prepare(*args, **kwargs)
            state["in_prepare"] += calls.n - before

        run.recipe.training_step = counted_step
        regime.prepare = counted_prepare
        metrics = run.fit()
        assert state["steps"] == 4 and state["in_step"] == 0, state
        assert math.isfinite(metrics["test/loss"]) and "test/kl_to_teacher" in metrics  # evaluation: live teacher
        seen.append((state["in_prepare"], regime.built, regime.path))
    (built_calls, built, path), (reused_calls, rebuilt, again) = seen
    assert built and built_calls > 0
    assert not rebuilt and reused_calls == 0 and again == path


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("overrides,sentence", [
    (["recipe=supervised"], "regime=teacher_logits caches a teacher's outputs but recipe supervised runs without "
                            "one; choose a teacher with teacher=<config> or use regime=offline"),
    (["recipe=uld", "teacher=task_llama_tok512"], "recipe uld distils a teacher with its own tokenizer, whose "
                                                  "positions the logit cache (kept in the data's tokens) cannot "
                                                  "serve; use regime=offline"),
    (["recipe=minillm"], "recipe minillm cannot train with regime=teacher_logits; use regime=offline"),
    (["recipe=hinton", "regime.temperature=2"], "regime.temperature=2 stores the teacher at another temperature than "
                                                "recipe hinton's loss (T=4); drop the regime.temperature override, "
                                                "it follows recipe.temperature"),
])
def test_unsupported_combinations_are_refused_with_one_sentence(overrides, sentence, make_cfg):
    """(f) Refused while composing, before any model trains."""
    with pytest.raises(ConfigError) as err:
        build(make_cfg(*SMALL_TASK, "regime=teacher_logits", *overrides), setup=False)
    assert str(err.value) == sentence


def test_masked_lm_data_and_other_needs_are_refused(make_cfg):
    with pytest.raises(ConfigError, match="regime=teacher_logits caches the teacher once per training example of "
                                          "causal-LM or classification data, which MLMDataModule is not"):
        build(make_cfg("data=text", "teacher=text_bert", "recipe=hinton", "regime=teacher_logits"), setup=False)
    regime = TeacherLogits()
    with pytest.raises(ConfigError, match="also distils the teacher's hidden states, which the logit cache does not"):
        regime.check_recipe("probe", Needs(hidden_states=True), teacher=True, routed=False, temperature=None)
    with pytest.raises(ConfigError, match="regime=teacher_logits generates data with one teacher, not with routed "):
        check_recipe("hinton", Needs(teacher_signals=SIGNAL_FORMS), teacher=True, routed=True, regime=regime)
    regime.check_recipe("gkd", Needs(teacher_signals=SIGNAL_FORMS), teacher=True, routed=False, temperature=None)
    assert regime.temperature == 1.0  # no loss temperature: T = 1
    for bad, match in ((dict(top_k=0), "regime.top_k must be a positive number"),
                       (dict(logprob_dtype="int4"), "regime.logprob_dtype must be one of"),
                       (dict(temperature=0.0), "regime.temperature must be > 0")):
        with pytest.raises(ConfigError, match=match):
            TeacherLogits(**bad)


def test_a_cache_prepared_for_other_rows_refuses_the_batch(dm, tmp_path):
    regime = TeacherLogits(cache_dir=str(tmp_path), top_k=8)
    regime.prepare(freeze(model(1)), dm)
    batch = fixed_batch(dm)
    with pytest.raises(RuntimeError, match="holds other response lengths than this batch"):
        regime.batch(None, {**batch, "index": batch["index"].flip(0)}, dm)
    with pytest.raises(ConfigError, match="looks training rows up by their example index"):
        regime.batch(None, {k: v for k, v in batch.items() if k != "index"}, dm)


def test_plain_text_windows_cache_every_predicted_token(tmp_path):
    """Plain text (empty prompts, no chat template): the first token of a window has no
    position predicting it, so the cache holds len - 1 rows per window, and the cached
    loss at k = V is the live teacher's."""
    from kd.data.sources import TextWindows

    text = tmp_path / "text.txt"
    words = [f"w{i % 37}" for i in range(4000)]
    text.write_text("\n".join(" ".join(words[i : i + 200]) for i in range(0, 4000, 200)))
    data = LMDataModule(TextWindows(str(text), words=24, val_fraction=0.1, test_fraction=0.1), vocab_size=300,
                        batch_size=4, max_length=40, generation_eval_size=0, chat_template=False)
    data.setup()
    teacher, student = freeze(model(1)), model(2)
    regime = TeacherLogits(cache_dir=str(tmp_path / "cache"), top_k=10_000, temperature=1.0, logprob_dtype="float32")
    regime.prepare(teacher, data)
    assert np.diff(regime.offsets).tolist() == [len(r) - 1 for p, r in data.splits["train"].encoded]
    batch = next(iter(data.train_dataloader()))
    recipe = Hinton(student=student, teacher=teacher, divergence=ForwardKL(), temperature=1.0)
    recipe.set_vocabulary(len(data.tokenizer))
    live = recipe.compute_loss(batch)["loss"].item()
    assert recipe.compute_loss(regime.batch(student, batch, data))["loss"].item() == pytest.approx(live, rel=1e-5)


class TauHinton(Hinton):
    """Hinton's loss whose temperature argument is called ``tau``: it declares it."""

    needs = Needs(divergence=True, teacher_signals=SIGNAL_FORMS, loss_temperature="tau")

    def __init__(self, *, tau: float = 2.5, **kwargs):
        super().__init__(temperature=tau, **kwargs)


@pytest.mark.parametrize("tau,stored", [(["+recipe.tau=3"], 3.0), ([], 2.5)])
def test_the_cache_is_stored_at_the_loss_temperature_the_recipe_declares(tau, stored, make_cfg):
    """A loss temperature whose argument is not called ``temperature`` is found through
    ``Needs.loss_temperature``: from the config, else from the class's default."""
    cfg = make_cfg(*SMALL_TASK, "recipe=hinton", f"recipe._target_={__name__}.TauHinton", "~recipe.temperature",
                   *tau, "regime=teacher_logits")
    run = build(cfg, setup=False)
    assert run.recipe.temperature == stored and run.recipe.regime.temperature == stored
