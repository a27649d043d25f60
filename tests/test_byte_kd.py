"""Cross-tokenizer recipes (recipes/byte_kd.py): byte-head targets against the exact
recursion of docs/spec.md section 7, byte-offset alignment, the two losses, export."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from kd import ConfigError
from kd.bytes import NUM_SYMBOLS, ByteOracle, ByteVocab, SymbolIndex, detours, marginal_byte_targets
from kd.data import IGNORE_INDEX
from kd.data.lm import LMDataModule
from kd.data.sources import TaskSource
from kd.export import save_student
from kd.models import tiny_causal_lm
from recipes.byte_kd import ULD, ByteKD

A, B = ord("a"), ord("b")


# ----------------------------------------------------------------------------- byte targets


def _bigram_lm(symbols, seed=0, sharpness=2.0):
    """A token LM whose next-token distribution depends on the last token only."""
    v = len(symbols)
    table = torch.softmax(sharpness * torch.randn(v + 1, v, generator=torch.Generator().manual_seed(seed)), -1)
    return lambda history: table[history[-1] if history else v]


def _exact_marginal(oracle, history, partial, k, alphabet):
    """sum over k-symbol strings s of Q_h(u.s.b) / Q_h(u), by enumeration."""
    out = torch.zeros(NUM_SYMBOLS, dtype=torch.float64)
    for mid in itertools.product(alphabet, repeat=k):
        for b in alphabet:
            out[b] += oracle.prefix_mass(history, partial + mid + (b,))
    return out / (oracle.prefix_mass(history, partial) if partial else 1.0)


@pytest.mark.parametrize("seed,with_detours", [(0, False), (1, False), (2, False), (0, True), (1, True), (2, True)])
def test_head_targets_are_the_exact_marginals_up_to_the_reported_leak(seed, with_detours):
    symbols = [(A,), (B,), (A, B), (B, A), (A, A, B)]
    lm = _bigram_lm(symbols, seed)
    ids = [2, 3, 4, 1, 0, 2]  # ab|ba|aab|b|a|ab
    probs = torch.stack([lm(tuple(ids[:i])) for i in range(len(ids))])
    spelled = [c for v in ids for c in symbols[v]]
    starts = list(range(len(spelled)))  # every byte offset, inside teacher tokens too
    index = SymbolIndex(symbols, pad=3)
    extra = {(o, v): lm(tuple(ids[:i]) + (v,)) for o, i, v in detours(ids, index, starts)} if with_detours else None
    if with_detours:  # inside ab at 1 and 10: a; inside ba at 3: b; inside aab at 5: a, at 6: none spells "aa"
        assert sorted(extra) == [(1, 0), (3, 1), (5, 0), (10, 0)]
        _, _, plain_leak = marginal_byte_targets(probs, ids, index, starts, num_heads=3)
    targets, valid, leak = marginal_byte_targets(probs, ids, index, starts, num_heads=3, detour_probs=extra)
    if with_detours:
        assert (leak <= plain_leak + 1e-6).all() and (leak[[1, 3, 5, 10], 0] < plain_leak[[1, 3, 5, 10], 0] - 0.01).all()
        assert leak[1, 0].item() == pytest.approx(0.0, abs=1e-6)  # u = "a": the only missing path was token a
    oracle = ByteOracle(lm, symbols)
    token_start = [sum(len(symbols[v]) for v in ids[:i]) for i in range(len(ids))]
    checked = 0
    for o in starts:
        i = max(j for j, s in enumerate(token_start) if s <= o)
        history, partial = tuple(ids[:i]), tuple(spelled[token_start[i]:o])
        for k in range(3):
            assert bool(valid[o, k]) == (o + k < len(spelled))
            if not valid[o, k]:
                continue
            exact = _exact_marginal(oracle, history, partial, k, (A, B))
            tv = 0.5 * (targets[o, k].double() - exact).abs().sum().item()
            assert tv <= leak[o, k].item() + 1e-6
            assert targets[o, k].sum().item() == pytest.approx(1.0, abs=1e-6)
            if k == 0 and not partial:  # at a teacher boundary head 0 is exact
                assert leak[o, k].item() == 0.0 and tv == pytest.approx(0.0, abs=1e-6)
            checked += 1
    assert checked == sum(min(3, len(spelled) - o) for o in starts)


def test_head_targets_are_marginals_not_conditionals():
    """Unigram teacher {a: .1, b: .2, ab: .3, ba: .4} (docs/spec.md section 7 vectors) at the start:
    byte 1's exact marginal is P(aa)+P(ba) = .52 for 'a'; the conditional given the true
    first byte 'a' would be .1. Paths leaving the canonical token 'ab' after one symbol
    (tokens a, b: mass .3) are the leak."""
    symbols = [(A,), (B,), (A, B), (B, A)]
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    targets, _, leak = marginal_byte_targets(probs, [2], SymbolIndex(symbols, pad=2), [0], num_heads=2)
    assert targets[0, 0, A].item() == pytest.approx(0.4) and targets[0, 0, B].item() == pytest.approx(0.6)
    assert leak[0, 1].item() == pytest.approx(0.3)
    # computed paths: ab -> b (.3), ba -> a (.4); normalised over .7
    assert targets[0, 1, A].item() == pytest.approx(0.4 / 0.7) and targets[0, 1, B].item() == pytest.approx(0.3 / 0.7)
    assert abs(targets[0, 1, A].item() - 0.52) <= leak[0, 1].item()


def test_targets_continue_along_the_canonical_path_with_its_probability():
    """Teacher tokens a|b: head 1 at offset 0 reaches byte 1 through p(a) at step one
    (tokens that end after one byte other than the canonical 'a' leak)."""
    symbols = [(A,), (B,), (A, B)]
    first = torch.tensor([0.5, 0.2, 0.3])
    second = torch.tensor([0.1, 0.9, 0.0])
    targets, valid, leak = marginal_byte_targets(torch.stack([first, second]), [0, 1], SymbolIndex(symbols, pad=2),
                                                 [0], num_heads=2)
    # byte 1: 'ab' gives b with .3, the path a -> (a .1, b .9, ab: a .0) gives .5 * (.1 a + .9 b)
    expect_a, expect_b = 0.5 * 0.1, 0.3 + 0.5 * 0.9
    assert targets[0, 1, A].item() == pytest.approx(expect_a / (expect_a + expect_b))
    assert leak[0, 1].item() == pytest.approx(0.2 / (0.2 + expect_a + expect_b))  # token b ended off the path
    assert valid.all()


# ----------------------------------------------------------------------------- recipes on two tokenizers


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two tokenizers of the embedded task (letters single vs merged) and data batches
    that carry the teacher's prompts."""
    from kd.data.lm import _trained_tokenizer  # the data module's own cached training

    source = TaskSource(train_size=300, val_size=20, test_size=20)
    raw = source.load()
    cache = str(tmp_path_factory.mktemp("tok"))
    teacher_tok = _trained_tokenizer(raw["train"], 300, 40, cache, source.fingerprint())
    student_tok = _trained_tokenizer(raw["train"], 600, 3, cache, source.fingerprint())
    assert len(teacher_tok) != len(student_tok)
    dm = LMDataModule(source, tokenizer=None, vocab_size=600, min_frequency=3, batch_size=8, cache_dir=cache,
                      teacher_tokenizer=teacher_tok)
    dm.setup()
    return dm, student_tok, teacher_tok


@pytest.fixture(scope="module")
def swapped(pair):
    """The same two tokenizers the other way round: the teacher's tokens merge letters, so
    most of the student's token starts fall inside teacher tokens."""
    dm, merged, single = pair
    swapped = LMDataModule(dm.source, tokenizer=None, vocab_size=300, min_frequency=40, batch_size=8,
                           cache_dir=dm.cache_dir, teacher_tokenizer=merged)
    swapped.setup()
    assert swapped.tokenizer.get_vocab() == single.get_vocab()
    return swapped, single, merged


def test_detour_passes_cut_the_leak_inside_teacher_tokens(swapped):
    dm, student_tok, teacher_tok = swapped
    batch = _fixed_batch(dm, student_tok, teacher_tok)
    teacher = tiny_causal_lm(vocab_size=len(teacher_tok), hidden_size=32, num_layers=1, num_heads=2)
    student = tiny_causal_lm(vocab_size=len(student_tok), hidden_size=32, num_layers=1, num_heads=2)
    leaks = {}
    for passes in (False, True):
        recipe = _recipe(ByteKD, student_tok, teacher_tok, teacher=teacher, student=student, num_heads=2,
                         detour_passes=passes)
        rows, teacher_logits = recipe.align(batch)
        inside = sum(o not in set(r.teacher_starts) for r in rows for o in r.student_starts)
        assert inside > 0
        q = recipe.head_targets(rows, teacher_logits)
        leaks[passes] = q["leak"][:, 0][q["valid"][:, 0]]
        assert torch.allclose(q["target"][q["valid"]].sum(-1), torch.ones(()))
    assert (leaks[True] <= leaks[False] + 1e-6).all() and leaks[True].mean() < 0.5 * leaks[False].mean()


def _recipe(cls, student_tok, teacher_tok, teacher=None, student=None, **kw):
    student = student or tiny_causal_lm(vocab_size=len(student_tok), hidden_size=32, num_layers=1, num_heads=2)
    teacher = teacher or tiny_causal_lm(vocab_size=len(teacher_tok), hidden_size=32, num_layers=1, num_heads=2)
    if cls.needs.divergence:
        from kd.divergences import ULD as ULDDivergence

        kw.setdefault("divergence", ULDDivergence())
    recipe = cls(student=student, teacher=teacher, **kw)
    recipe.set_tokenizers(student_tok, teacher_tok)
    recipe.set_vocabulary(len(student_tok))
    return recipe


def _fixed_batch(dm, student_tok, teacher_tok, size=8):
    """A batch chosen without any random state: half responses the two tokenizers split
    differently, half they split alike (the first of each in the training split)."""
    from kd.data.lm import collate_train

    split = dm.splits["train"]
    differ, alike = [], []
    for i, ex in enumerate(split.examples):
        same = len(student_tok(ex.response)["input_ids"]) == len(teacher_tok(ex.response)["input_ids"])
        (alike if same else differ).append(i)
    chosen = differ[: size // 2] + alike[: size - size // 2]
    assert len(differ) >= size // 2, "the fixture's tokenizers must split some responses differently"
    batch = collate_train([split[i] for i in chosen], dm.pad_token_id, dm.teacher_pad_id)
    return {**batch, "index": torch.tensor(chosen)}


def test_teacher_view_spells_the_same_bytes_and_starts_where_its_tokens_start(pair):
    dm, student_tok, teacher_tok = pair
    batch = _fixed_batch(dm, student_tok, teacher_tok)
    recipe = _recipe(ByteKD, student_tok, teacher_tok)
    rows, teacher_logits = recipe.align(batch)
    assert teacher_logits.shape[-1] == len(teacher_tok)
    merged = 0
    for r, row in enumerate(rows):
        assert row.common == len(row.symbols)  # valid text: both spell every byte
        example = dm.splits["train"].examples[int(batch["index"][r])] if "index" in batch else None
        text = bytes(s for s in row.symbols if s < 256).decode()
        assert teacher_tok.decode(row.teacher_ids, skip_special_tokens=True) == text
        if example is not None:
            assert text == example.response
        assert row.teacher_starts == [sum(len(recipe.teacher_bytes.symbols[v]) for v in row.teacher_ids[:i])
                                      for i in range(len(row.teacher_ids))]
        merged += len(row.teacher_ids) != len(row.student_pos)
        # the kept logits are the teacher's own, from the last prompt position on, for its tokens
        prompt = batch["teacher_prompt_ids"][r][batch["teacher_prompt_mask"][r].bool()].tolist()
        with torch.no_grad():
            alone = recipe.teacher(input_ids=torch.tensor([prompt + row.teacher_ids])).logits[0, :, : len(teacher_tok)]
        expect = alone[len(prompt) - 1: len(prompt) - 1 + len(row.teacher_ids)]
        assert torch.allclose(teacher_logits[r, row.teacher_pos], expect, atol=1e-4)
    assert merged > 0  # the two tokenizations differ on some responses


def test_the_teacher_answers_test_prompts_in_its_own_tokens(pair):
    from kd.data.lm import render_prompt

    dm, student_tok, teacher_tok = pair
    batch = next(iter(dm._prompts("val")))
    recipe = _recipe(ULD, student_tok, teacher_tok)
    ids, mask, tok = recipe.teacher_prompts(batch, student_tok)
    assert tok is teacher_tok
    for r, i in enumerate(batch["index"].tolist()):
        prompt = dm.splits["val"].examples[i].prompt
        assert tok.decode(ids[r][mask[r].bool()]) == render_prompt(teacher_tok, prompt)


def test_a_multibyte_character_split_across_tokens_aligns():
    """'é' is two bytes: byte-level BPE without merges spells it with two tokens, a
    tokenizer that merged it with one; both spell the same bytes and only the merged
    side's boundary is shared."""
    from kd.data.tokenizer import train_bpe_tokenizer

    split = ByteVocab(train_bpe_tokenizer(["xyz"] * 10, vocab_size=300, min_frequency=100))
    merged = ByteVocab(train_bpe_tokenizer(["café é"] * 50, vocab_size=300, min_frequency=2))
    symbols = split.spell(split.encode(list("é".encode()) + [256]))[0]
    assert symbols == [0xC3, 0xA9, 256]
    ids = merged.encode(symbols)
    spelled, starts = merged.spell(ids)
    assert spelled == symbols and len(ids) == 2 and starts == [0, 2]
    assert split.spell(split.encode(symbols))[1] == [0, 1, 2]


def test_a_teacher_tokenizer_that_adds_a_dummy_prefix_is_refused(pair):
    """A SentencePiece tokenizer that prepends '▁' spells 'abc' as ' abc': no response
    aligns, and the recipe says why instead of training on nothing."""
    from tokenizers import pre_tokenizers

    from kd.data.tokenizer import train_bpe_tokenizer

    dm, student_tok, _ = pair
    texts = [f"{e.prompt} {e.response}" for e in dm.splits["train"].examples]
    teacher_tok = train_bpe_tokenizer(texts, vocab_size=300, byte_level=False, min_frequency=40)
    teacher_tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    assert teacher_tok.convert_ids_to_tokens(teacher_tok("abc", add_special_tokens=False)["input_ids"])[0].startswith("▁")
    prefixed = LMDataModule(dm.source, vocab_size=600, min_frequency=3, batch_size=8, cache_dir=dm.cache_dir,
                            teacher_tokenizer=teacher_tok)
    prefixed.setup()
    recipe = _recipe(ByteKD, student_tok, teacher_tok)
    with pytest.raises(ConfigError, match="dummy-prefix"):
        recipe.align(next(iter(prefixed.train_dataloader())))


def test_byte_kd_loss_terms_and_gradients(pair):
    import torch.nn.functional as F

    dm, student_tok, teacher_tok = pair
    batch = next(iter(dm.train_dataloader()))
    recipe = _recipe(ByteKD, student_tok, teacher_tok, num_heads=4)
    recipe.train()
    terms = recipe.compute_loss(batch)
    assert terms["misaligned"].item() == 0.0
    for key in ("token_ce", "byte_ce", "byte_kl", "boundary_kl"):
        assert torch.isfinite(terms[key]) and terms[key].item() > 0
    assert 0.0 <= terms["byte_leak"].item() < 1.0
    expected = terms["token_ce"] + 1.0 * terms["byte_ce"] + 0.1 * terms["byte_kl"]
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-5)

    # every term again, by hand, from the student's own outputs and the head targets
    V = len(student_tok)
    with torch.no_grad():
        out = recipe.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             output_hidden_states=True)
        rows, teacher_logits = recipe.align(batch)
        q = recipe.head_targets(rows, teacher_logits)
        logits, labels = out.logits[:, :-1, :V], batch["labels"][:, 1:]
        token_ce = F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), ignore_index=IGNORE_INDEX)
        # head k at (row, pos) reads the last hidden state at the position that predicts the token
        states = out.hidden_states[-1][q["row"], q["pos"]]
        log_q = F.log_softmax(recipe.byte_heads(states).view(len(states), 4, NUM_SYMBOLS).double(), -1)
        true, target, valid = q["true"], q["target"].double(), q["valid"]
        has_byte = true >= 0
        assert valid.any() and has_byte.any() and not has_byte.all()  # some heads look past the response's end
        nll = -log_q.gather(-1, true.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        byte_ce = nll[has_byte].sum() / has_byte.sum()
        kl = (torch.xlogy(target, target) - target * log_q).sum(-1)  # sum p log(p / q), 0 log 0 = 0
        byte_kl = kl[valid].sum() / valid.sum()
        # the student's next byte at its token boundaries: token probabilities summed by their first byte
        p_token = torch.softmax(logits[q["row"], q["pos"]].double(), -1)
        first = torch.tensor([recipe.student_bytes.symbols[v][0] for v in range(V)])
        p_byte = torch.zeros(len(p_token), NUM_SYMBOLS, dtype=torch.double).index_add_(1, first, p_token)
        t0 = target[:, 0]
        boundary = (torch.xlogy(t0, t0) - t0 * p_byte.clamp(min=1e-30).log()).sum(-1)
        boundary_kl = boundary[valid[:, 0]].sum() / valid[:, 0].sum()
    assert terms["token_ce"].item() == pytest.approx(token_ce.item(), rel=1e-5)
    assert terms["byte_ce"].item() == pytest.approx(byte_ce.item(), rel=1e-5)
    assert terms["byte_kl"].item() == pytest.approx(byte_kl.item(), rel=1e-5)
    assert terms["boundary_kl"].item() == pytest.approx(boundary_kl.item(), rel=1e-5)
    assert terms["loss"].item() == pytest.approx((token_ce + byte_ce + 0.1 * byte_kl).item(), rel=1e-5)
    # the heads are trained against byte o_j + k of the response (checked in the next test), one row per
    # student response token
    assert len(q["row"]) == int((labels != IGNORE_INDEX).sum())

    terms["loss"].backward()
    assert recipe.byte_heads.weight.grad.abs().sum() > 0
    assert recipe.student.get_input_embeddings().weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in recipe.teacher.parameters())


def test_heads_learn_the_true_bytes_of_the_response(pair):
    """Head k at the position that predicts student token j is trained on byte o_j + k of
    the example's response (UTF-8, then EOS); -1 past the end."""
    from kd.bytes import EOS

    dm, student_tok, teacher_tok = pair
    batch = next(iter(dm._train_like("val", shuffle=False)))  # rows in example order
    recipe = _recipe(ByteKD, student_tok, teacher_tok, num_heads=3)
    rows, teacher_logits = recipe.align(batch)
    q = recipe.head_targets(rows, teacher_logits)
    n = 0
    for r in range(len(rows)):
        response = list(dm.splits["val"].examples[r].response.encode()) + [EOS]
        mine = q["true"][q["row"] == r]
        offsets = [0]
        for v in batch["labels"][r][batch["labels"][r] >= 0].tolist()[:-1]:
            offsets.append(offsets[-1] + len(recipe.student_bytes.symbols[v]))
        assert len(mine) == len(offsets)
        for o, got in zip(offsets, mine.tolist()):
            assert got == [response[o + k] if o + k < len(response) else -1 for k in range(3)]
            n += 1
    assert n > 0 and bool((q["valid"] == (q["true"] >= 0)).all())


def test_identical_tokenizers_and_teacher_equal_student_give_zero_byte_kl(task_dm):
    """The student's own next-byte distribution at its boundaries equals the teacher's
    byte target there when both are the same model on the same tokenizer, and ULD pairs
    every position with itself (zero)."""
    tok = task_dm.tokenizer
    model = tiny_causal_lm(vocab_size=len(tok), hidden_size=32, num_layers=1, num_heads=2)
    twin = tiny_causal_lm(vocab_size=len(tok), hidden_size=32, num_layers=1, num_heads=2)
    twin.load_state_dict(model.state_dict())
    dm = LMDataModule(TaskSource(train_size=200, val_size=20, test_size=20), vocab_size=300, batch_size=8,
                      max_length=64, teacher_tokenizer=tok)
    dm.tokenizer = tok
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    recipe = _recipe(ByteKD, tok, tok, teacher=twin, student=model)
    terms = recipe.compute_loss(batch)
    assert terms["boundary_kl"].item() == pytest.approx(0.0, abs=1e-6)
    assert terms["byte_kl"].item() > 0  # the untrained heads are not the teacher
    uld = _recipe(ULD, tok, tok, teacher=twin, student=model).compute_loss(batch)
    assert uld["aligned"].item() == 1.0 and uld["uld"].item() == pytest.approx(0.0, abs=1e-6)
    # ... and a different teacher gives a positive value
    other = _recipe(ULD, tok, tok, student=model).compute_loss(batch)
    assert other["uld"].item() > 1e-3


def _sorted_l1(student_logits, teacher_logits):
    """ULD by hand: L1 between the descending-sorted probabilities, the shorter zero-padded."""
    p_s = torch.softmax(student_logits.double(), -1).sort(-1, descending=True).values
    p_t = torch.softmax(teacher_logits.double(), -1).sort(-1, descending=True).values
    width = max(p_s.shape[-1], p_t.shape[-1])
    p_s = torch.nn.functional.pad(p_s, (0, width - p_s.shape[-1]))
    p_t = torch.nn.functional.pad(p_t, (0, width - p_t.shape[-1]))
    return (p_s - p_t).abs().sum(-1)


def test_uld_pairs_exactly_the_positions_where_both_start_a_token_at_the_same_byte():
    """Two tokenizations with known byte offsets, built by hand (recipes.byte_kd.Row):

    row 0, "abcde" + EOS: student ab|c|de|EOS (starts 0 2 3 5), teacher a|bc|d|e|EOS (0 1 3 4 5);
    shared starts 0, 3, 5 -> student tokens 0, 2, 3 with teacher tokens 0, 2, 4.
    row 1, "xyzwv" + EOS: student x|yz|w|v|EOS (0 1 3 4 5), teacher one token per byte but spelling
    the same bytes only up to offset 3 (common = 3): only starts 0 and 1 count (3 is past the common prefix).
    The teacher's kept logits are in a shuffled column order (row.teacher_pos) to catch index mix-ups."""
    from kd.divergences import ULD as ULDDivergence
    from recipes.byte_kd import Row

    torch.manual_seed(0)
    student = tiny_causal_lm(vocab_size=20, hidden_size=16, num_layers=1, num_heads=2)
    teacher = tiny_causal_lm(vocab_size=11, hidden_size=16, num_layers=1, num_heads=2)
    recipe = ULD(student=student, teacher=teacher, divergence=ULDDivergence(), lam=0.5)
    a, b, c, d, e, x, y, z, w, v, eos = (*b"abcdexyzwv", 256)
    rows = [Row(student_pos=[1, 2, 3, 4], student_starts=[0, 2, 3, 5], symbols=[a, b, c, d, e, eos],
                teacher_pos=[4, 0, 3, 1, 2], teacher_starts=[0, 1, 3, 4, 5], common=6),
            Row(student_pos=[0, 1, 2, 3, 4], student_starts=[0, 1, 3, 4, 5], symbols=[x, y, z, w, v, eos],
                teacher_pos=[2, 3, 4, 0, 1], teacher_starts=[0, 1, 2, 3, 4], common=3)]
    teacher_logits = 3 * torch.randn(2, 5, 11)
    recipe.align = lambda batch: (rows, teacher_logits)  # the alignment under test is the pairing in compute_loss
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 0], [5, 11, 12, 13, 14, 15, 0]])
    labels = torch.where(torch.tensor([[0, 0, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1, 0]]).bool(), ids, -100)
    batch = {"input_ids": ids, "attention_mask": torch.tensor([[1] * 6 + [0]] * 2), "labels": labels}
    terms = recipe.compute_loss(batch)

    # (row, student logit position) <-> (row, teacher column): exactly these pairs
    student_at = [(0, 1), (0, 3), (0, 4), (1, 0), (1, 1)]
    teacher_at = [(0, 4), (0, 3), (0, 2), (1, 2), (1, 3)]
    with torch.no_grad():
        logits = student(input_ids=ids, attention_mask=batch["attention_mask"]).logits[:, :-1]
    s = torch.stack([logits[r, p] for r, p in student_at])
    t = torch.stack([teacher_logits[r, p] for r, p in teacher_at])
    expected = _sorted_l1(s, t).mean()
    assert expected.item() == pytest.approx(ULDDivergence()(s, t).item(), rel=1e-5)
    assert terms["uld"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert terms["aligned"].item() == pytest.approx(5 / 9)
    assert terms["misaligned"].item() == pytest.approx(0.5)  # row 1 parts before its end
    token_ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 20), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert terms["token_ce"].item() == pytest.approx(token_ce.item(), rel=1e-5)
    assert terms["loss"].item() == pytest.approx(token_ce.item() + 0.5 * expected.item(), rel=1e-5)
    # a pairing by token index (the paper's), or one ignoring the common prefix, would give another value
    by_index = _sorted_l1(torch.stack([logits[0, p] for p in (1, 2, 3, 4)] + [logits[1, p] for p in range(5)]),
                          torch.stack([teacher_logits[0, p] for p in (4, 0, 3, 1)]
                                      + [teacher_logits[1, p] for p in (2, 3, 4, 0, 1)])).mean()
    assert terms["uld"].item() != pytest.approx(by_index.item(), rel=1e-3)


@pytest.mark.parametrize("tokenizers", ["pair", "swapped"])
def test_uld_pairs_only_positions_where_both_start_a_token(tokenizers, request):
    """pair: the student's tokens merge letters, the teacher's do not, so every student start is a
    teacher start but not the other way round; swapped: many student starts fall inside teacher tokens."""
    dm, student_tok, teacher_tok = request.getfixturevalue(tokenizers)
    batch = _fixed_batch(dm, student_tok, teacher_tok)
    models = []
    for size in (len(student_tok), len(teacher_tok)):
        models.append(tiny_causal_lm(vocab_size=size, hidden_size=32, num_layers=1, num_heads=2))
        with torch.no_grad():  # peaked distributions that differ by position (untrained ones are near uniform,
            models[-1].lm_head.weight.mul_(20)  # which makes every pairing give about the same ULD value)
    recipe = _recipe(ULD, student_tok, teacher_tok, student=models[0], teacher=models[1])
    rows, teacher_logits = recipe.align(batch)
    shared = sum(len(set(r.student_starts) & set(r.teacher_starts)) for r in rows)
    total = sum(len(r.student_starts) for r in rows)
    terms = recipe.compute_loss(batch)
    assert terms["aligned"].item() == pytest.approx(shared / total)
    # the fixed batch holds responses the two tokenizers split differently
    if tokenizers == "pair":
        assert shared == total < sum(len(r.teacher_starts) for r in rows)
    else:
        assert 0 < shared < total
    # the ULD term is the sorted-probability L1 over exactly those pairs (byte offset -> token on each side)
    with torch.no_grad():
        logits = recipe.student(input_ids=batch["input_ids"],
                                attention_mask=batch["attention_mask"]).logits[:, :-1, : len(student_tok)]
    s, t = [], []
    for r, row in enumerate(rows):
        for j, o in enumerate(row.student_starts):
            if o in row.teacher_starts:
                s.append(logits[r, row.student_pos[j]])
                t.append(teacher_logits[r, row.teacher_pos[row.teacher_starts.index(o)]])
    assert len(s) == shared
    assert terms["uld"].item() == pytest.approx(_sorted_l1(torch.stack(s), torch.stack(t)).mean().item(), rel=1e-5)


def test_uld_divergence_vector_and_refusals():
    from kd.divergences import ULD as ULDDivergence
    from kd.divergences import ForwardKL
    from kd.regimes import TeacherGenerated

    p_s, p_t = torch.tensor([[0.6, 0.3, 0.1]]), torch.tensor([[0.5, 0.25, 0.15, 0.1]])
    assert ULDDivergence()(p_s.log(), p_t.log()).item() == pytest.approx(0.30)
    same = torch.tensor([[0.2, 0.5, 0.3]])
    assert ULDDivergence()(same.log(), same[:, [2, 0, 1]].log()).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="every dimension but the vocabulary"):
        ULDDivergence()(torch.zeros(2, 3), torch.zeros(3, 4))
    student, teacher = tiny_causal_lm(vocab_size=300, hidden_size=32, num_layers=1), tiny_causal_lm(vocab_size=300, hidden_size=32, num_layers=1)
    with pytest.raises(ConfigError, match="divergence=uld"):
        ULD(student=student, teacher=teacher, divergence=ForwardKL())
    with pytest.raises(ConfigError, match="teacher-generated"):
        ByteKD(student=student, teacher=teacher, regime=TeacherGenerated())


def test_heads_are_dropped_on_export_and_transformers_loads_the_student(tmp_path, pair):
    from transformers import AutoModelForCausalLM

    dm, student_tok, teacher_tok = pair
    src = tmp_path / "src"
    tiny_causal_lm(vocab_size=len(student_tok), hidden_size=32, num_layers=1, num_heads=2).save_pretrained(src)
    student = AutoModelForCausalLM.from_pretrained(src)  # the path users take
    recipe = _recipe(ByteKD, student_tok, teacher_tok, student=student)
    assert any(k.startswith("byte_heads.") for k in recipe.state_dict())
    out = save_student(recipe.student, tmp_path / "student", tokenizer=student_tok)
    loaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"]
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert not any("byte_heads" in k for k in f.keys())
    ids = torch.tensor([[1, 5, 7, 9]])
    assert torch.equal(loaded(ids).logits, recipe.student(ids).logits)


# ----------------------------------------------------------------------------- through kd


SMALL_PAIR = ["experiment=task_byte_kd", "data.source.train_size=300", "data.source.val_size=30",
              "data.source.test_size=30", "data.generation_eval_size=8", "data.max_new_tokens=6", "data.batch_size=16",
              "data.vocab_size=600", "data.min_frequency=3", "teacher.fit.max_epochs=1",
              "teacher.fit.data.vocab_size=300", "teacher.model.vocab_size=300", "teacher.fit.data.min_frequency=40",
              "student.hidden_size=32", "teacher.model.hidden_size=32", "teacher.model.num_layers=1",
              "trainer.max_epochs=1"]


@pytest.mark.parametrize("recipe", ["byte_kd", "uld"])
def test_kd_runs_cross_tokenizer_recipes_end_to_end(make_cfg, recipe):
    from kd.runs import train as run

    cfg = make_cfg(*SMALL_PAIR, *(["recipe.num_heads=3"] if recipe == "byte_kd" else ["recipe=uld"]))
    summary = run(cfg)
    rows = summary["results"]
    assert set(rows) == {"teacher", "student, from scratch", f"student, {recipe}"}
    assert "test/exact_match" in rows["teacher"]  # the teacher answered in its own tokens
    assert rows["teacher"]["params"] != rows[f"student, {recipe}"]["params"]
    student_dir = f"{cfg.paths.output_dir}/student"
    from transformers import AutoTokenizer

    vocab = json.load(open(f"{student_dir}/config.json"))["vocab_size"]
    assert vocab == len(AutoTokenizer.from_pretrained(student_dir)) != 300  # the student's own, cut to its tokenizer


def test_byte_kd_trains_on_the_students_own_samples(make_cfg):
    """On-policy: the student's samples are re-tokenized for the teacher, whose prompts the
    regime carries over; teacher-generated data is refused before any training."""
    from kd.runs import train as run

    summary = run(make_cfg(*SMALL_PAIR, "recipe.num_heads=3", "regime=on_policy", "scratch_baseline=false"))
    assert "student, byte_kd" in summary["results"]
    from kd.cli import config_error as _config_error

    with pytest.raises(Exception) as info:  # Hydra wraps what constructors raise; kd prints the sentence
        run(make_cfg(*SMALL_PAIR, "regime=teacher_generated"))
    assert "teacher-generated" in str(_config_error(info.value))


def test_same_tokenizer_recipes_refuse_a_teacher_with_its_own_tokenizer(make_cfg):
    from kd.runs import train as run

    cfg = make_cfg(*SMALL_PAIR, "recipe=word_kd")
    with pytest.raises(ConfigError, match="recipe=byte_kd"):
        run(cfg)


def test_plain_text_windows_are_refused_before_anything_trains(make_cfg, tmp_path):
    from kd import ConfigError
    from kd.build import build

    cfg = make_cfg("data=text_lm", "teacher=task_llama", "student=task_llama", "recipe=uld")
    with pytest.raises(ConfigError, match="plain text windows .* have no prompt"):
        build(cfg, setup=False)
    assert not (tmp_path / "cache" / "teachers").exists()  # refused before any teacher trains
