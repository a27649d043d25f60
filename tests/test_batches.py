"""The batch contract (:mod:`kd.batches`): padding and joining, the one model call shared by
recipes and the logit cache's teacher pass, the per-row keys on-policy regimes carry, and
the one cache root regimes built from Python default to."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kd import ConfigError, batches
from kd.data import IGNORE_INDEX
from kd.data.lm import LMDataModule, collate_train
from kd.data.sources import TaskSource
from kd.divergences import ForwardKL
from kd.logit_cache import teacher_rows
from kd.models import freeze, tiny_causal_lm
from kd.regimes import Mixed, OnPolicy, TeacherGenerated, TeacherLogits
from recipes.hinton import Hinton


@pytest.fixture(scope="module")
def dm():
    module = LMDataModule(TaskSource(train_size=16, val_size=4, test_size=4), vocab_size=300, batch_size=4,
                          max_length=40, max_new_tokens=4)
    module.setup()
    return module


def model(seed: int, vocab: int = 320):
    torch.manual_seed(seed)
    return tiny_causal_lm(vocab_size=vocab, hidden_size=32, num_layers=1).eval()


# ----------------------------------------------------------------------------- padding and joining


def test_left_and_right_padding():
    ids, mask = batches.left_pad([[4, 5], [6], []], pad_token_id=9)
    assert ids.tolist() == [[4, 5], [9, 6], [9, 9]] and mask.tolist() == [[1, 1], [0, 1], [0, 0]]
    ids, mask = batches.right_pad([[4, 5], [6], []], pad_token_id=9)
    assert ids.tolist() == [[4, 5], [6, 9], [9, 9]] and mask.tolist() == [[1, 1], [1, 0], [0, 0]]
    assert ids.dtype == mask.dtype == torch.long


def test_joining_lists_and_generated_tensors_give_one_layout():
    """The collate function's lists and a sampler's padded tensors join the same way."""
    joined = batches.join_rows([[5, 6], [7, 8, 9]], [[3, 4], [2]], pad_token_id=0)
    assert joined["input_ids"].tolist() == [[5, 6, 3, 4], [7, 8, 9, 2]]
    assert joined["labels"].tolist() == [[IGNORE_INDEX] * 2 + [3, 4], [IGNORE_INDEX] * 3 + [2]]
    assert joined["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]
    prompts, pmask = batches.left_pad([[5, 6], [7, 8, 9]], pad_token_id=0)
    responses, rmask = torch.tensor([[3, 4, 0], [2, 0, 0]]), torch.tensor([[1, 1, 0], [1, 0, 0]])
    from_tensors = batches.join_prompts_and_responses(prompts, pmask, responses, rmask, pad_token_id=0)
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(from_tensors[key], joined[key]), key
    assert torch.equal(from_tensors["prompt_ids"], prompts)
    items = [{"prompt_ids": [5, 6], "response_ids": [3, 4], "index": 0},
             {"prompt_ids": [7, 8, 9], "response_ids": [2], "index": 1}]
    collated = collate_train(items, pad_token_id=0)
    for key in ("input_ids", "attention_mask", "labels", "prompt_ids", "prompt_mask"):
        assert torch.equal(collated[key], from_tensors[key]), key


# ----------------------------------------------------------------------------- keys


def test_predicates_read_the_keys():
    causal = {"input_ids": torch.zeros(1, 2), "attention_mask": torch.ones(1, 2), "labels": torch.zeros(1, 2)}
    masked = {**causal, "original_ids": torch.zeros(1, 2)}
    prompts = {"prompt_ids": torch.zeros(1, 2), "prompt_mask": torch.ones(1, 2)}
    assert batches.is_causal_lm(causal) and not batches.is_masked_lm(causal)
    assert batches.is_masked_lm(masked) and not batches.is_causal_lm(masked) and batches.is_tokens(masked)
    assert batches.is_prompts_only(prompts) and not batches.is_prompts_only({**causal, **prompts})
    with pytest.raises(ConfigError, match="not a format recipes understand"):
        batches.batch_targets(prompts)


def test_on_policy_batches_keep_the_row_keys(dm):
    batch = next(iter(dm.train_dataloader()))
    batch = {**batch, "teacher_index": torch.arange(len(batch["input_ids"]))}
    sampled = OnPolicy(sampling={"temperature": 0.0}).batch(model(2, vocab=300), batch, dm)
    for key in batches.ROW_KEYS:
        if key in batch:
            assert torch.equal(sampled[key], batch[key]), key
    assert batches.INDEX in sampled and batches.TEACHER_INDEX in sampled


# ----------------------------------------------------------------------------- one model call


class SmallHead(torch.nn.Module):
    """A language model whose output layer has fewer logits than the tokenizer has tokens."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.width))


def test_the_teacher_pass_makes_the_recipes_model_call(dm):
    """The logit cache's rows are the recipe's teacher logits at the mask, cut to the
    tokenizer's vocabulary, and both refuse a too small output layer in one sentence."""
    teacher, student = freeze(model(1)), model(2)
    batch = next(iter(dm.train_dataloader()))
    recipe = Hinton(student=student, teacher=teacher, divergence=ForwardKL(), temperature=1.0)
    V = len(dm.tokenizer)
    recipe.set_vocabulary(V)
    with torch.no_grad():
        out = recipe.outputs(teacher, batch)
        rows = teacher_rows(teacher, batch, V)
    assert out.logits.shape[-1] == V and torch.equal(rows, out.logits[out.mask])
    small = SmallHead(200)
    with pytest.raises(ConfigError) as err:
        teacher_rows(small, batch, V)
    assert str(err.value) == (f"the teacher has 200 output logits but the tokenizer {V} tokens; give the teacher a "
                              "vocabulary at least as large as the tokenizer's")
    with pytest.raises(ConfigError, match="^a model has 200 output logits"):
        batches.outputs(small, batch, vocab_size=V)


# ----------------------------------------------------------------------------- one cache root


def test_regimes_built_from_python_keep_their_caches_under_kd_cache_dir(tmp_path, monkeypatch):
    """Without a cache_dir, regimes use $KD_CACHE_DIR as kd runs do (not ~/.cache/kd)."""
    monkeypatch.setenv("KD_CACHE_DIR", str(tmp_path / "kd-cache"))
    assert TeacherGenerated().cache.root == tmp_path / "kd-cache"
    assert Mixed(seq_kd=True).teacher_data.cache.root == tmp_path / "kd-cache"
    assert TeacherLogits().cache.root == tmp_path / "kd-cache"
    assert TeacherLogits(cache_dir=str(tmp_path / "given")).cache.root == tmp_path / "given"
    monkeypatch.delenv("KD_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert TeacherLogits().cache.root == tmp_path / "home" / ".cache" / "kd"
