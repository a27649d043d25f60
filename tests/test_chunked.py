"""Chunked (fused-linear) divergences, the top-k teacher signal and token selection.

Reference values are the independent test vectors of docs/spec.md sections 8 and 9; the
chunked path is checked against the plain functions of kd.divergences on logits built
from the same hidden states and heads (values and gradients)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kd.divergences as D
from kd.signals import TAIL_FLOOR, HeadLogits, TopK
from kd.evaluation import StageMetrics, cross_entropy
from kd.models import head_matches, split_head, tiny_causal_lm
from tests.conftest import SMALL_TASK

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _problem(dtype: torch.dtype, seed: int = 0, teacher_grad: bool = False, V: int = 11):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(3, 5, 8, dtype=dtype, generator=g).requires_grad_()
    ws = torch.randn(V, 8, dtype=dtype, generator=g).requires_grad_()
    bs = torch.randn(V, dtype=dtype, generator=g).requires_grad_()
    ht = torch.randn(3, 5, 6, dtype=dtype, generator=g).requires_grad_(teacher_grad)
    wt = torch.randn(V, 6, dtype=dtype, generator=g).requires_grad_(teacher_grad)
    mask = torch.rand(3, 5, generator=g) > 0.3
    mask[2] = False  # a sequence without any valid position
    mask[0, 0] = True
    return hs, ws, bs, ht, wt, mask


def _grads(loss: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss.sum(), inputs))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", sorted(D.DIVERGENCES))
def test_chunked_equals_plain_for_every_reduction_temperature_and_softcap(dtype, name):
    cls = D.DIVERGENCES[name]
    for reduction in D.REDUCTIONS:
        for temperature in (1.0, 2.5):
            for softcap in (None, 3.0):
                hs, ws, bs, ht, wt, mask = _problem(dtype)
                student = HeadLogits(hs, ws, bs, softcap)
                teacher = HeadLogits(ht, wt, None, softcap)
                plain_logits = softcap * torch.tanh((hs @ ws.T + bs) / softcap) if softcap else hs @ ws.T + bs
                t_logits = softcap * torch.tanh((ht @ wt.T) / softcap) if softcap else ht @ wt.T
                want = cls(reduction=reduction)(plain_logits, t_logits, mask, temperature)  # the plain function
                got = cls(reduction=reduction, chunk_size=4)(student, teacher, mask, temperature)
                assert got.shape == want.shape
                assert _rel(got, want) < TOL[dtype], (reduction, temperature, softcap)
                for g_got, g_want in zip(_grads(got, [hs, ws, bs]), _grads(want, [hs, ws, bs])):
                    assert _rel(g_got, g_want) < TOL[dtype], (reduction, temperature, softcap)


@pytest.mark.parametrize("name", sorted(D.DIVERGENCES))
def test_chunked_gradients_reach_a_teacher_that_requires_them(name):
    hs, ws, bs, ht, wt, mask = _problem(torch.float64, seed=1, teacher_grad=True)
    cls = D.DIVERGENCES[name]
    got = cls(chunk_size=3)(HeadLogits(hs, ws, bs), HeadLogits(ht, wt), mask, 1.5)
    want = cls()(hs @ ws.T + bs, ht @ wt.T, mask, 1.5)
    for a, b in zip(_grads(got, [hs, ws, bs, ht, wt]), _grads(want, [hs, ws, bs, ht, wt])):
        assert _rel(a, b) < 1e-10


def test_public_entry_point_takes_names_logits_and_biases():
    hs, ws, bs, ht, wt, mask = _problem(torch.float64, seed=2)
    tb = torch.randn(11, dtype=torch.float64)
    got = D.chunked_divergence(hs, ws, ht, wt, "jsd", beta=0.3, mask=mask, temperature=2.0, chunk_size=2,
                               student_bias=bs, teacher_bias=tb)
    want = D.jsd(hs @ ws.T + bs, ht @ wt.T + tb, mask, temperature=2.0, beta=0.3)
    assert _rel(got, want) < 1e-10
    from_logits = D.chunked_divergence(hs, ws, None, None, D.ReverseKL(reduction="sum"), mask=mask,
                                       student_bias=bs, teacher_logits=ht @ wt.T + tb)
    assert _rel(from_logits, D.reverse_kl(hs @ ws.T + bs, ht @ wt.T + tb, mask, reduction="sum")) < 1e-10
    with pytest.raises(ValueError, match="teacher_hidden and teacher_weight"):
        D.chunked_divergence(hs, ws, None, None, "tvd")


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operation returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_full_logits_tensor_exists_in_forward_or_backward():
    torch.manual_seed(0)
    n, hidden, vocab, chunk = 256, 4, 40, 8
    hs = torch.randn(n, hidden, requires_grad=True)
    ws = torch.randn(vocab, hidden, requires_grad=True)
    ht, wt = torch.randn(n, hidden), torch.randn(vocab, hidden)
    for name in sorted(D.DIVERGENCES):
        with _LargestTensor() as seen:
            loss = D.chunked_divergence(hs, ws, ht, wt, name, chunk_size=chunk)
            loss.backward()
        # blocks of (chunk, V) logits and the (V, H) / (N, H) gradients, never (N, V)
        assert seen.largest <= max(chunk * vocab, n * hidden) < n * vocab, name


# ----------------------------------------------------------------------------- top-k (section 8)

P_T = torch.tensor([[0.5, 0.3, 0.1, 0.06, 0.04]], dtype=torch.float64)
P_S = torch.tensor([[0.4, 0.2, 0.2, 0.1, 0.1]], dtype=torch.float64)


def test_topk_with_tail_bin_matches_the_recipes_vectors():
    top2 = TopK(torch.tensor([[0, 1]]), P_T.log()[:, :2])
    assert D.ForwardKL()(P_S.log(), top2).item() == pytest.approx(0.094582, abs=1e-6)
    assert D.ReverseKL()(P_S.log(), top2).item() == pytest.approx(0.106908, abs=1e-6)
    renorm = TopK(top2.ids, top2.logprobs, tail=False)
    assert D.ForwardKL()(P_S.log(), renorm).item() == pytest.approx(0.003832, abs=1e-6)
    full = TopK(torch.arange(5)[None], P_T.log())
    assert D.ForwardKL()(P_S.log(), full).item() == pytest.approx(0.096595, abs=1e-6)
    assert D.ReverseKL()(P_S.log(), full).item() == pytest.approx(0.110991, abs=1e-6)


def test_a_cached_tail_that_rounds_to_zero_below_the_vocabulary_keeps_reverse_kl_finite():
    """Top-4 of 5 tokens whose stored probabilities sum past 1 (rounding of a tiny tail):
    the tail is floored at 1e-6, so reverse KL over the 5 bins with the student's
    [0.4, 0.2, 0.2, 0.1 | 0.1] is 0.4 ln(0.4/0.5) + 0.2 ln(0.2/0.3) + 0.2 ln(0.2/0.1)
    + 0.1 ln(0.1/0.1) + 0.1 ln(0.1/1e-6) = 1.119572."""
    cached = TopK(torch.tensor([[0, 1, 2, 3]]), torch.tensor([[0.5, 0.3, 0.1, 0.1000001]], dtype=torch.float64).log())
    assert TAIL_FLOOR == 1e-6
    assert D.ReverseKL()(P_S.log(), cached).item() == pytest.approx(1.119572, abs=1e-5)
    assert math.isfinite(D.JSD()(P_S.log(), cached).item()) and math.isfinite(D.ForwardKL()(P_S.log(), cached).item())


@pytest.mark.parametrize("name", sorted(D.DIVERGENCES))
def test_topk_with_k_equal_to_the_vocabulary_is_the_live_teacher(name):
    hs, ws, bs, ht, wt, mask = _problem(torch.float64, seed=3)
    teacher_logits = ht @ wt.T
    log_p = (teacher_logits / 2.0).log_softmax(-1)
    values, ids = log_p.topk(11, -1)
    cached = TopK(ids, values)
    cls = D.DIVERGENCES[name]
    for student in (hs @ ws.T + bs, HeadLogits(hs, ws, bs)):
        want = cls()(hs @ ws.T + bs, teacher_logits, mask, 2.0)
        got = cls(chunk_size=4)(student, cached, mask, 2.0)
        assert _rel(got, want) < 1e-10
        for a, b in zip(_grads(got, [hs, ws, bs]), _grads(want, [hs, ws, bs])):
            assert _rel(a, b) < 1e-10


def test_chunked_topk_equals_plain_topk():
    hs, ws, bs, ht, wt, mask = _problem(torch.float64, seed=4)
    values, ids = (ht @ wt.T).log_softmax(-1).topk(3, -1)
    for tail in (True, False):
        cached = TopK(ids, values, tail)
        for name, cls in D.DIVERGENCES.items():
            got = cls(chunk_size=2)(HeadLogits(hs, ws, bs), cached, mask)
            want = cls(chunked=False)(HeadLogits(hs, ws, bs), cached, mask)
            assert _rel(got, want) < 1e-10, (name, tail)


# ----------------------------------------------------------------------------- selection (section 9)

ROWS_P = torch.tensor([[0.97, 0.01, 0.01, 0.01], [0.25] * 4, [0.6, 0.2, 0.1, 0.1], [0.9, 0.05, 0.03, 0.02]],
                      dtype=torch.float64)
ROWS_T = torch.cat([torch.tensor([[0.05, 0.9, 0.03, 0.02]], dtype=torch.float64), ROWS_P[1:]])


def test_selection_vectors():
    entropy = D.entropy_of(ROWS_P.log())
    assert entropy.tolist() == pytest.approx([0.167701, 1.386294, 1.088900, 0.428048], abs=1e-6)
    kl = D.forward_kl(ROWS_P.log(), ROWS_T.log(), reduction="none")
    assert kl.tolist() == pytest.approx([3.948386, 0, 0, 0], abs=1e-6)
    assert D.select_tokens(entropy, kl, "entropy", 0.5).tolist() == [1, 2]
    assert D.select_tokens(entropy, kl, "overconfident", 0.25).tolist() == [0]
    assert D.select_tokens(entropy, kl, "both", 0.5).tolist() == [0, 1]
    assert D.select_tokens(entropy, kl, "all", 0.5).tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("chunked", [False, True])
def test_selected_loss_averages_over_the_kept_tokens_only(chunked):
    student, teacher = ROWS_P.log()[None], ROWS_T.log()[None]  # (1, 4, 4) as logits
    eye = torch.eye(4, dtype=torch.float64)
    s = HeadLogits(student.clone().requires_grad_(), eye) if chunked else student.clone().requires_grad_()
    t = HeadLogits(teacher, eye) if chunked else teacher
    div = D.ForwardKL(select="overconfident", keep=0.25)
    loss = div(s, t)
    assert loss.item() == pytest.approx(3.948386, abs=1e-6)  # the one kept token, not 3.948386 / 4
    assert div.kept.tolist() == [[True, False, False, False]]
    grad = torch.autograd.grad(loss, s.hidden if chunked else s)[0]
    assert grad[0, 1:].abs().max() == 0 and grad[0, 0].abs().max() > 0  # dropped tokens get no gradient
    entropy_div = D.ForwardKL(select="entropy", keep=0.5, reduction="sum")
    assert entropy_div(s, t).item() == pytest.approx(0.0, abs=1e-12)  # tokens 1, 2 agree with the teacher


def test_selection_is_the_same_in_the_chunked_and_plain_paths():
    hs, ws, bs, ht, wt, mask = _problem(torch.float64, seed=5)
    for select in ("entropy", "overconfident", "both"):
        for name, cls in D.DIVERGENCES.items():
            a, b = cls(select=select, keep=0.3, chunk_size=3), cls(select=select, keep=0.3, chunked=False)
            got = a(HeadLogits(hs, ws, bs), HeadLogits(ht, wt), mask, 1.5)
            want = b(HeadLogits(hs, ws, bs), HeadLogits(ht, wt), mask, 1.5)
            assert torch.equal(a.kept, b.kept) and int(a.kept.sum()) == math.ceil(0.3 * int(mask.sum()))
            assert _rel(got, want) < 1e-10, (select, name)


def test_bad_selection_settings_are_one_sentence():
    from kd import ConfigError

    with pytest.raises(ConfigError, match="choose one of all, entropy"):
        D.ForwardKL(select="tip")
    with pytest.raises(ConfigError, match=r"keep must be in \(0, 1\]"):
        D.JSD(select="entropy", keep=0)
    with pytest.raises(ConfigError, match="keep divergence.select=all"):
        D.ULD(select="entropy", keep=0.5)


# ----------------------------------------------------------------------------- CE, metrics, models


def test_fused_cross_entropy_and_metrics_equal_the_dense_ones():
    hs, ws, bs, ht, wt, mask = _problem(torch.float64, seed=6)
    labels = torch.randint(0, 11, (3, 5))
    labels[~mask] = -100
    for reduction in ("mean", "sum", "none"):
        got = cross_entropy(HeadLogits(hs, ws, bs), labels, reduction)
        want = cross_entropy(hs @ ws.T + bs, labels, reduction)
        assert _rel(got, want) < 1e-10
        for a, b in zip(_grads(got, [hs, ws, bs]), _grads(want, [hs, ws, bs])):
            assert _rel(a, b) < 1e-10
    fused, dense = StageMetrics().double(), StageMetrics().double()
    fused.update(HeadLogits(hs, ws, bs), labels, mask, HeadLogits(ht, wt))
    dense.update(hs @ ws.T + bs, labels, mask, ht @ wt.T)
    got, want = fused.compute(), dense.compute()
    assert set(got) == set(want)
    for key in want:
        assert float(got[key]) == pytest.approx(float(want[key]), rel=1e-9), key


def test_a_gemma_style_softcapped_model_splits_into_body_and_head():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=8, final_logit_softcapping=2.0)
    model = Gemma2ForCausalLM(config).double()
    ids = torch.randint(0, 64, (2, 7))
    mask = torch.ones_like(ids)
    assert head_matches(model, ids, mask)
    body, head, softcap, scale = split_head(model)
    assert softcap == 2.0 and scale == 1.0
    hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state
    logits = model(input_ids=ids, attention_mask=mask).logits
    assert logits.abs().max() <= 2.0  # the softcap bounds the logits
    teacher = torch.randn(2, 7, 64, dtype=torch.float64)
    got = D.ForwardKL()(HeadLogits(hidden, head.weight, head.bias, softcap, scale), teacher)
    assert _rel(got, D.forward_kl(logits, teacher)) < 1e-10


def test_models_whose_head_is_not_a_plain_linear_are_not_split():
    from kd.models import tiny_masked_lm

    mlm = tiny_masked_lm(vocab_size=40, hidden_size=16, num_layers=1, num_heads=2)
    ids = torch.randint(0, 40, (1, 6))
    assert not head_matches(mlm, ids, torch.ones_like(ids))  # BERT's head transforms the states first
    assert head_matches(tiny_causal_lm(vocab_size=40, hidden_size=16, num_layers=1, num_heads=2), ids,
                        torch.ones_like(ids))


# ----------------------------------------------------------------------------- recipes


def _pair(vocab: int = 300):
    torch.manual_seed(0)
    return (tiny_causal_lm(vocab_size=vocab + 20, hidden_size=32, num_layers=1),  # head padded past the tokenizer
            tiny_causal_lm(vocab_size=vocab + 20, hidden_size=48, num_layers=1))


@pytest.mark.parametrize("recipe_name", ["hinton", "gkd", "word_kd"])
def test_recipes_compute_the_same_loss_and_gradients_fused_and_dense(task_dm, recipe_name):
    from recipes.gkd import GKD
    from recipes.hinton import Hinton
    from recipes.seqkd import SeqKD

    batch = next(iter(task_dm.train_dataloader()))
    results = []
    for chunked in (True, False):
        student, teacher = _pair(len(task_dm.tokenizer))
        divergence = D.JSD(beta=0.3, chunked=chunked, chunk_size=16)
        recipe = {"hinton": lambda: Hinton(student=student, teacher=teacher, divergence=divergence, lam=0.6,
                                           temperature=2.0),
                  "gkd": lambda: GKD(student=student, teacher=teacher, divergence=divergence),
                  "word_kd": lambda: SeqKD(student=student, teacher=teacher, alpha=0.5, temperature=2.0,
                                           chunked=chunked)}[recipe_name]()
        recipe.set_vocabulary(len(task_dm.tokenizer))
        terms = recipe.compute_loss(batch)
        terms["loss"].backward()
        assert recipe.fused is chunked
        grads = torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])
        results.append((terms, grads))
    (fused, g_fused), (dense, g_dense) = results
    for key in dense:
        assert _rel(fused[key].float(), dense[key].float()) < 1e-5, key
    assert _rel(g_fused, g_dense) < 1e-4


def test_gkd_with_token_selection_counts_the_kept_tokens(task_dm):
    from recipes.gkd import GKD

    student, teacher = _pair(len(task_dm.tokenizer))
    recipe = GKD(student=student, teacher=teacher, divergence=D.JSD(select="entropy", keep=0.5))
    recipe.set_vocabulary(len(task_dm.tokenizer))
    batch = next(iter(task_dm.train_dataloader()))
    terms = recipe.compute_loss(batch)
    valid = int((batch["labels"][:, 1:] != -100).sum())
    assert int(terms["num_items"]) == math.ceil(valid / 2)


def test_token_selection_and_the_chunked_switch_are_command_line_knobs(make_cfg):
    from kd.build import build
    from kd.runs import train

    run = build(make_cfg(*SMALL_TASK, "recipe=gkd", "divergence.select=overconfident", "divergence.keep=0.1"),
                setup=False)
    assert (run.recipe.divergence.select, run.recipe.divergence.keep, run.recipe.fused) == ("overconfident", 0.1, True)
    assert not build(make_cfg(*SMALL_TASK, "recipe=gkd", "divergence.chunked=false"), setup=False).recipe.fused
    summary = train(make_cfg(*SMALL_TASK, "recipe=hinton", "divergence.select=entropy", "divergence.keep=0.5",
                             "debug=fast_dev_run"))
    assert "student, hinton" in summary["results"]


def test_no_gradient_work_under_no_grad(monkeypatch):
    hs, ws, bs, ht, wt, mask = _problem(torch.float64, seed=7)  # hs, ws, bs require grad

    def no_backward(*args, **kwargs):
        raise AssertionError("gradients computed under no_grad")

    monkeypatch.setattr(torch.autograd, "grad", no_backward)
    with torch.no_grad():
        loss = D.JSD(chunk_size=4)(HeadLogits(hs, ws, bs), HeadLogits(ht, wt), mask)
    assert not loss.requires_grad
    assert _rel(loss, D.jsd(hs @ ws.T + bs, ht @ wt.T, mask)) < 1e-10
