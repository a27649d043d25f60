"""DistilBERT (docs/spec.md section 2): masking, student init from the teacher, the triple loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kd import ConfigError
from kd.data.mlm import MLMCollator, mask_tokens, num_targets, token_weights
from kd.divergences import ForwardKL, ReverseKL
from kd.models import init_from_teacher, layer_map, tiny_masked_lm
from recipes.distilbert import DistilBERT, cosine_loss

V, PAD, CLS, SEP, MASK = 40, 0, 1, 2, 3
SPECIAL = [PAD, CLS, SEP, MASK]


def _batch(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), max(lengths)), PAD)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(4, V, (n,), generator=g)
        ids[i, 0], ids[i, n - 1] = CLS, SEP
    return ids, (ids != PAD).long()


def test_cosine_loss_is_0_1_2_for_identical_orthogonal_opposite():
    h = torch.tensor([[1.0, 0.0]])
    mask = torch.tensor([True])
    assert cosine_loss(h, h, mask).item() == pytest.approx(0.0)
    assert cosine_loss(h, torch.tensor([[0.0, 3.0]]), mask).item() == pytest.approx(1.0)
    assert cosine_loss(h, -2 * h, mask).item() == pytest.approx(2.0)


def test_number_of_targets_and_special_tokens_never_chosen():
    ids, attention = _batch([10, 7])
    assert num_targets(attention) == 3  # ceil(0.15 * 17)
    weights = token_weights(torch.ones(V), SPECIAL)
    for seed in range(300):
        _, labels = mask_tokens(ids, attention, weights, MASK, V, generator=torch.Generator().manual_seed(seed))
        chosen = labels != -100
        assert int(chosen.sum()) == 3
        assert not chosen[(ids == CLS) | (ids == SEP) | (ids == PAD)].any()


def test_rare_tokens_are_masked_more_often_per_occurrence():
    counts = torch.ones(V)
    counts[10], counts[11] = 1000.0, 1.0
    weights = token_weights(counts, SPECIAL)
    assert weights[11] / weights[10] == pytest.approx(1000**0.7)
    ids = torch.tensor([[10] * 10 + [11] * 10])
    picked = torch.zeros(2)
    for seed in range(200):
        _, labels = mask_tokens(ids, torch.ones_like(ids), weights, MASK, V, generator=torch.Generator().manual_seed(seed))
        picked += torch.stack([(labels == 10).sum(), (labels == 11).sum()])
    assert picked[1] > 20 * picked[0]


def test_chosen_positions_are_80_percent_mask_10_kept_10_random():
    ids, attention = _batch([200] * 50)
    weights = token_weights(torch.ones(V), SPECIAL)
    masked, labels = mask_tokens(ids, attention, weights, MASK, V, generator=torch.Generator().manual_seed(0))
    chosen = labels != -100
    n = int(chosen.sum())
    assert n == num_targets(attention)
    as_mask = (masked[chosen] == MASK).float().mean().item()
    kept = (masked[chosen] == ids[chosen]).float().mean().item()
    assert as_mask == pytest.approx(0.8, abs=0.03)
    assert kept == pytest.approx(0.1 + 0.1 / V, abs=0.03)  # kept, or a random draw of the same id
    assert torch.equal(masked[~chosen], ids[~chosen])  # nothing else changes


def test_collator_redraws_in_training_and_is_fixed_for_held_out_splits():
    weights = token_weights(torch.ones(V), SPECIAL)
    items = [{"input_ids": _batch([12])[0][0].tolist(), "index": i} for i in range(4)]
    train = MLMCollator(weights, MASK, PAD, V)
    assert any(not torch.equal(train(items)["labels"], train(items)["labels"]) for _ in range(5))
    held = MLMCollator(weights, MASK, PAD, V, seed=0)
    assert torch.equal(held(items)["labels"], held(items)["labels"])
    # fixed means a function of the examples (their indices) and the seed: not of how many batches came
    # before, nor of the global random state, so every evaluation masks the same positions
    first = held(items)
    torch.manual_seed(123)
    for _ in range(3):
        train(items)  # other draws in between
    fresh = MLMCollator(weights, MASK, PAD, V, seed=0)(items)
    for key in ("input_ids", "labels"):
        assert torch.equal(fresh[key], first[key]) and torch.equal(held(items)[key], first[key]), key
    others = [MLMCollator(weights, MASK, PAD, V, seed=1)(items),
              held([{**it, "index": it["index"] + 4} for it in items])]
    assert all(not torch.equal(o["labels"], first["labels"]) for o in others)  # other seed, other examples


def test_layer_maps():
    assert layer_map(12, 6, "distilbert") == [0, 2, 4, 7, 9, 11]
    assert layer_map(12, 6, "even") == [0, 2, 4, 7, 9, 11]
    assert layer_map(4, 2, "even") == [0, 3]
    with pytest.raises(ConfigError, match="12 -> 6 map"):
        layer_map(8, 4, "distilbert")
    with pytest.raises(ConfigError, match="must list 2 teacher layers"):
        layer_map(4, 2, [0, 9])


def test_student_initialised_from_the_teacher_copies_the_mapped_layers():
    torch.manual_seed(0)
    teacher = tiny_masked_lm(vocab_size=V, hidden_size=16, num_layers=12, num_heads=2)
    student = tiny_masked_lm(vocab_size=V, hidden_size=16, num_layers=6, num_heads=2)
    assert init_from_teacher(student, teacher, "distilbert") == [0, 2, 4, 7, 9, 11]
    s, t = student.bert.encoder.layer[3], teacher.bert.encoder.layer[7]
    for (name, a), (_, b) in zip(s.named_parameters(), t.named_parameters()):
        assert torch.equal(a, b), name
    assert torch.equal(student.bert.embeddings.word_embeddings.weight, teacher.bert.embeddings.word_embeddings.weight)
    assert torch.equal(student.bert.embeddings.LayerNorm.weight, teacher.bert.embeddings.LayerNorm.weight)
    assert torch.equal(student.cls.predictions.transform.dense.weight, teacher.cls.predictions.transform.dense.weight)
    wider = tiny_masked_lm(vocab_size=V, hidden_size=32, num_layers=6, num_heads=2)
    with pytest.raises(ConfigError, match="everything but depth"):
        init_from_teacher(wider, teacher)


def _recipe_and_batch(**kwargs):
    torch.manual_seed(0)
    teacher = tiny_masked_lm(vocab_size=V, hidden_size=16, num_layers=2, num_heads=2, dropout=0.0)
    student = tiny_masked_lm(vocab_size=V, hidden_size=16, num_layers=1, num_heads=2, dropout=0.0)
    recipe = DistilBERT(student=student, teacher=teacher, **{"divergence": ForwardKL(), **kwargs})
    ids, attention = _batch([10, 7])
    weights = token_weights(torch.ones(V), SPECIAL)
    masked, labels = mask_tokens(ids, attention, weights, MASK, V, generator=torch.Generator().manual_seed(0))
    return recipe, {"input_ids": masked, "attention_mask": attention, "labels": labels, "original_ids": ids}


def _by_hand(recipe, batch, rows_mask, temperature=2.0, reverse=False):
    s_out = recipe.student(**{k: batch[k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True)
    with torch.no_grad():
        t_out = recipe.teacher(**{k: batch[k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True)
    s, t = s_out.logits[rows_mask] / temperature, t_out.logits[rows_mask] / temperature
    p, q = (F.log_softmax(s, -1), F.log_softmax(t, -1)) if reverse else (F.log_softmax(t, -1), F.log_softmax(s, -1))
    kl = (p.exp() * (p - q)).sum(-1).mean() * temperature**2
    gold = batch["labels"] != -100
    mlm = F.cross_entropy(s_out.logits[gold], batch["labels"][gold])
    nonpad = batch["attention_mask"].bool()
    cos = (1 - F.cosine_similarity(s_out.hidden_states[-1][nonpad], t_out.hidden_states[-1][nonpad], dim=-1)).mean()
    return kl, mlm, cos


def test_triple_loss_matches_a_hand_computation_on_all_non_pad_rows():
    recipe, batch = _recipe_and_batch()
    terms = recipe.compute_loss(batch)
    kl, mlm, cos = _by_hand(recipe, batch, batch["attention_mask"].bool())
    # float32 and a KL near 0: the fused path (default) sums in another order, ~1e-7 absolute
    # (float64 equality of the fused and dense paths: tests/test_fused_recipes.py)
    assert terms["kd"].item() == pytest.approx(kl.item(), rel=1e-5, abs=1e-6)
    assert terms["mlm"].item() == pytest.approx(mlm.item(), rel=1e-5)
    assert terms["cos"].item() == pytest.approx(cos.item(), rel=1e-5)
    assert terms["loss"].item() == pytest.approx((5 * kl + 2 * mlm + cos).item(), rel=1e-5)
    restricted, _ = _recipe_and_batch(restrict_ce_to_mask=True)
    kl_masked, _, _ = _by_hand(restricted, batch, batch["labels"] != -100)
    assert restricted.compute_loss(batch)["kd"].item() == pytest.approx(kl_masked.item(), rel=1e-5, abs=1e-6)
    assert kl_masked.item() != pytest.approx(kl.item(), rel=1e-3)


def test_the_divergence_group_replaces_the_kl():
    recipe, batch = _recipe_and_batch(divergence=ReverseKL())
    kl, _, _ = _by_hand(recipe, batch, batch["attention_mask"].bool(), reverse=True)
    assert recipe.compute_loss(batch)["kd"].item() == pytest.approx(kl.item(), rel=1e-5, abs=1e-6)


TINY_TEXT = ["data=text", "teacher=text_bert", "student=from_teacher", "data.max_length=32", "data.vocab_size=600",
             "teacher.model.hidden_size=32", "teacher.model.num_layers=4", "teacher.fit.max_epochs=1",
             "trainer.max_epochs=1", "trainer.limit_train_batches=4", "trainer.limit_val_batches=2",
             "trainer.limit_test_batches=2"]


def test_distilbert_run_on_real_text_from_a_teacher_initialised_student(make_cfg):
    pytest.importorskip("gensim")
    from kd.runs import train as run

    summary = run(make_cfg(*TINY_TEXT, "recipe=distilbert", "downstream=topics", "downstream.epochs=1"))
    rows = summary["results"]
    assert set(rows) == {"teacher", "student, from scratch", "student, distilbert"}
    assert all(0.0 < row["downstream/acc"] <= 1.0 for row in rows.values())
    assert rows["student, distilbert"]["params"] < rows["teacher"]["params"]
    for row in rows.values():
        assert 0.0 <= row["test/acc"] <= 1.0 and row["test/ppl"] > 1.0  # masked-token accuracy, perplexity


def test_teacher_init_without_kd_is_its_own_row(make_cfg, tmp_path):
    """The ablation row, and its student really starts from the cached teacher's mapped layers: with
    lr 0 (and no weight decay) nothing moves, so the exported student's layer i is the cached teacher's
    layer map[i], and everything that is not a layer (embeddings, head) the teacher's own."""
    pytest.importorskip("gensim")
    import re

    from kd.models import read_state_dict
    from kd.runs import train as run

    summary = run(make_cfg(*TINY_TEXT, "recipe=supervised", "optimizer.lr=0", "optimizer.weight_decay=0"))
    assert set(summary["results"]) == {"student, teacher init (no KD)"}
    (entry,) = (tmp_path / "cache" / "teachers").iterdir()
    teacher, student = read_state_dict(entry), read_state_dict(tmp_path / "run" / "student")
    pattern = re.compile(r"(.*\blayer\.)(\d+)(\..*)")
    depth = lambda state: 1 + max(int(m.group(2)) for k in state if (m := pattern.match(k)))  # noqa: E731
    assert (depth(teacher), depth(student)) == (4, 2)
    mapping = layer_map(4, 2, "even")
    assert mapping == [0, 3]
    for key, value in student.items():
        m = pattern.match(key)
        source = f"{m.group(1)}{mapping[int(m.group(2))]}{m.group(3)}" if m else key
        assert torch.equal(value, teacher[source]), (key, source)
        if m and int(m.group(2)) == 1 and value.numel() > 1:  # layer 1 is teacher layer 3, not teacher layer 1
            assert not torch.equal(value, teacher[key]), key
    assert any(pattern.match(k) for k in student) and any(not pattern.match(k) for k in student)


def test_downstream_topics_rank_a_trained_encoder_above_chance(make_cfg):
    pytest.importorskip("chatterbot_corpus")
    from kd.data.tokenizer import train_wordpiece_tokenizer
    from kd.downstream import TopicClassification, topic_examples

    pairs = topic_examples()
    classes = {c for _, c in pairs}
    assert len(pairs) == 2026 and len(classes) == 21
    tok = train_wordpiece_tokenizer([q for q, _ in pairs], vocab_size=800)
    torch.manual_seed(0)
    model = tiny_masked_lm(vocab_size=800, hidden_size=32, num_layers=1, num_heads=2, dropout=0.0)
    before = [p.clone() for p in model.parameters()]
    acc = TopicClassification(epochs=3, lr=2e-3)(model, tok)
    majority = max(sum(c == k for _, c in pairs) for k in classes) / len(pairs)
    assert acc > majority + 0.05  # learnt something beyond the largest class
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the model itself is untouched
    from kd.models import freeze

    assert TopicClassification(epochs=3, lr=2e-3)(freeze(model), tok) == acc  # a frozen teacher is fine-tuned too


@pytest.mark.parametrize("family", ["distilbert", "roberta"])
def test_other_encoder_families_shrink_and_initialise_from_the_teacher(family):
    import transformers

    from kd.models import shallower_copy

    torch.manual_seed(0)
    if family == "distilbert":
        config = transformers.DistilBertConfig(vocab_size=V, dim=16, n_layers=4, n_heads=2, hidden_dim=32)
        teacher = transformers.DistilBertForMaskedLM(config)
        layers = lambda m: m.distilbert.transformer.layer  # noqa: E731
    else:
        config = transformers.RobertaConfig(vocab_size=V, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                                            intermediate_size=32, max_position_embeddings=40)
        teacher = transformers.RobertaForMaskedLM(config)
        layers = lambda m: m.roberta.encoder.layer  # noqa: E731
    student = shallower_copy(teacher)
    assert len(layers(student)) == 2
    assert init_from_teacher(student, teacher, "even") == [0, 3]
    for a, b in zip(layers(student)[1].parameters(), layers(teacher)[3].parameters()):
        assert torch.equal(a, b)
    x = torch.randint(5, V, (2, 7))
    assert student(input_ids=x).logits.shape == (2, 7, V)
