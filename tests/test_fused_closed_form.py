"""The fused loss's closed-form block gradients and vocabulary tiles (kd/chunked.py, issue 27).

Every check compares against the plain functions of kd.divergences on logits built from the
same hidden states and heads (values and autograd gradients), or against a formula written
out here (forward KL's ``q - p``), never against the fused path's own output."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

import kd.divergences as D
from kd import ConfigError
from kd.chunked import Form, default_tile_size, form_terms, fused_loss, scalar_weights, token_log_probs
from kd.signals import HeadLogits, Labels, TopK

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}

#: every divergence with a closed form, with a non-trivial shape parameter
MODULES = {
    "forward_kl": lambda **kw: D.ForwardKL(**kw),
    "reverse_kl": lambda **kw: D.ReverseKL(**kw),
    "jsd": lambda **kw: D.JSD(beta=0.3, **kw),
    "jsd_ends": lambda **kw: D.JSD(beta=1.0, **kw),
    "skew_forward_kl": lambda **kw: D.SkewForwardKL(alpha=0.2, **kw),
    "skew_reverse_kl": lambda **kw: D.SkewReverseKL(alpha=0.2, **kw),
    "tvd": lambda **kw: D.TVD(**kw),
    "soft_cross_entropy": lambda **kw: D.SoftCrossEntropy(**kw),
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _problem(dtype: torch.dtype, seed: int = 0, vocab: int = 13):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(3, 5, 8, dtype=dtype, generator=g).requires_grad_()
    ws = torch.randn(vocab, 8, dtype=dtype, generator=g).requires_grad_()
    bs = torch.randn(vocab, dtype=dtype, generator=g).requires_grad_()
    ht = torch.randn(3, 5, 6, dtype=dtype, generator=g).requires_grad_()
    wt = torch.randn(vocab, 6, dtype=dtype, generator=g).requires_grad_()
    mask = torch.rand(3, 5, generator=g) > 0.3
    mask[2] = False  # a sequence without any valid position
    mask[0, 0] = True
    return hs, ws, bs, ht, wt, mask


def _logits(h, w, b, softcap, scale):
    z = (h @ w.T + (0 if b is None else b)) * scale
    return softcap * torch.tanh(z / softcap) if softcap else z


@pytest.mark.parametrize("tile", [None, 4])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", sorted(MODULES))
def test_closed_form_equals_plain_for_every_reduction_temperature_softcap_and_scale(name, dtype, tile):
    """Values and gradients (student hidden, head, bias; teacher hidden and head) of the fused
    path, whole rows and tiles of 4 of 13 entries, equal the plain function's."""
    make = MODULES[name]
    for reduction in D.REDUCTIONS:
        for temperature in (1.0, 2.5):
            for softcap in (None, 3.0):
                hs, ws, bs, ht, wt, mask = _problem(dtype)
                student, teacher = HeadLogits(hs, ws, bs, softcap, 1.3), HeadLogits(ht, wt, None, softcap, 0.8)
                got = make(reduction=reduction, chunk_size=4, tile_size=tile)(student, teacher, mask, temperature)
                want = make(reduction=reduction, chunked=False)(_logits(hs, ws, bs, softcap, 1.3),
                                                               _logits(ht, wt, None, softcap, 0.8), mask, temperature)
                case = (reduction, temperature, softcap)
                assert got.dtype == want.dtype and got.shape == want.shape, case
                assert _rel(got, want) < TOL[dtype], case
                inputs = [hs, ws, bs, ht, wt]
                for a, b in zip(torch.autograd.grad(got.sum(), inputs), torch.autograd.grad(want.sum(), inputs)):
                    assert _rel(a, b) < TOL[dtype], case


@pytest.mark.parametrize("tile", [None, 5])
@pytest.mark.parametrize("name", sorted(MODULES))
def test_closed_form_with_given_and_top_k_teachers(name, tile):
    """Teacher logits that want gradients, and cached top-k teachers (k < V and k = V, with
    and without the tail bin), against the plain path on the same signals."""
    make = MODULES[name]
    hs, ws, bs, _, _, mask = _problem(torch.float64, seed=1)
    t_logits = torch.randn(3, 5, 13, dtype=torch.float64, generator=torch.Generator().manual_seed(9)) * 2
    t_logits.requires_grad_()
    for reduction in ("mean", "none", "seq_mean"):
        got = make(reduction=reduction, chunk_size=4, tile_size=tile)(HeadLogits(hs, ws, bs), t_logits, mask, 1.7)
        want = make(reduction=reduction)(hs @ ws.T + bs, t_logits, mask, 1.7)
        assert _rel(got, want) < 1e-10, reduction
        for a, b in zip(torch.autograd.grad(got.sum(), [hs, ws, bs, t_logits]),
                        torch.autograd.grad(want.sum(), [hs, ws, bs, t_logits])):
            assert _rel(a, b) < 1e-10, reduction
    log_p = (t_logits.detach() / 1.7).log_softmax(-1)
    for k in (3, 13):
        values, ids = log_p.topk(k, -1)
        for tail in (True, False):
            cached = TopK(ids, values, tail)
            got = make(chunk_size=4, tile_size=tile)(HeadLogits(hs, ws, bs), cached, mask, 1.7)
            want = make(chunked=False)(HeadLogits(hs, ws, bs), cached, mask, 1.7)
            assert _rel(got, want) < 1e-10, (k, tail)
            for a, b in zip(torch.autograd.grad(got, [hs, ws, bs]), torch.autograd.grad(want, [hs, ws, bs])):
                assert _rel(a, b) < 1e-10, (k, tail)


@pytest.mark.parametrize("tile", [None, 3])
def test_gold_label_cross_entropy_in_tiles(tile):
    hs, ws, bs, _, _, mask = _problem(torch.float64, seed=2)
    labels = torch.randint(0, 13, (3, 5), generator=torch.Generator().manual_seed(3))
    rows = mask.reshape(-1).nonzero().squeeze(-1)
    target = Labels(labels)
    weights = scalar_weights(rows, "mean", (3, 5), torch.float64)
    got = fused_loss(HeadLogits(hs, ws, bs, 2.0), target, None, rows, weights, temperature=1.5, chunk_size=3,
                     tile_size=tile)
    logits = (2.0 * torch.tanh((hs @ ws.T + bs) / 2.0) / 1.5).reshape(-1, 13)[rows]
    want = F.cross_entropy(logits, labels.reshape(-1)[rows])
    assert _rel(got, want) < 1e-10
    for a, b in zip(torch.autograd.grad(got, [hs, ws, bs]), torch.autograd.grad(want, [hs, ws, bs])):
        assert _rel(a, b) < 1e-10
    values = fused_loss(HeadLogits(hs, ws, bs, 2.0), target, None, rows, None, temperature=1.5, chunk_size=3,
                        tile_size=tile)
    logits = (2.0 * torch.tanh((hs @ ws.T + bs) / 2.0) / 1.5).reshape(-1, 13)[rows]
    plain = F.cross_entropy(logits, labels.reshape(-1)[rows], reduction="none")
    assert _rel(values, plain) < 1e-10
    scale = torch.linspace(0.5, 2.0, rows.numel(), dtype=torch.float64)  # a non-uniform incoming gradient
    for a, b in zip(torch.autograd.grad((values * scale).sum(), [hs, ws, bs]),
                    torch.autograd.grad((plain * scale).sum(), [hs, ws, bs])):
        assert _rel(a, b) < 1e-10


def test_forward_kl_gradient_is_q_minus_p_over_the_count():
    """With an identity head the hidden states are the logits; at T = 1 the mean forward KL's
    gradient is ``(softmax(z_S) - softmax(z_T)) / n`` on the valid rows and 0 elsewhere."""
    g = torch.Generator().manual_seed(4)
    z_s = torch.randn(2, 6, 7, dtype=torch.float64, generator=g).requires_grad_()
    z_t = torch.randn(2, 6, 7, dtype=torch.float64, generator=g)
    mask = torch.rand(2, 6, generator=g) > 0.4
    eye = torch.eye(7, dtype=torch.float64)
    for tile in (None, 2):
        loss = D.ForwardKL(chunk_size=3, tile_size=tile)(HeadLogits(z_s, eye), HeadLogits(z_t, eye), mask)
        (grad,) = torch.autograd.grad(loss, z_s)
        q, p = z_s.detach().exp() / z_s.detach().exp().sum(-1, keepdim=True), z_t.exp() / z_t.exp().sum(-1, keepdim=True)
        want = torch.where(mask[..., None], (q - p) / mask.sum(), torch.zeros(()))
        assert torch.allclose(grad, want, rtol=0, atol=1e-14)


def test_form_terms_partials_are_the_derivatives_of_the_value():
    """``df/da = G - q sum G`` (and ``H - p sum H`` for the teacher), checked against autograd
    on the value alone for each form on random rows."""
    g = torch.Generator().manual_seed(5)
    a = torch.randn(4, 9, dtype=torch.float64, generator=g).requires_grad_()
    b = torch.randn(4, 9, dtype=torch.float64, generator=g).requires_grad_()
    for form in (Form("forward_kl"), Form("reverse_kl"), Form("jsd", 0.4), Form("skew_forward_kl", 0.3),
                 Form("skew_reverse_kl", 0.3), Form("tvd"), Form("soft_cross_entropy")):
        lq, lp = a.log_softmax(-1), b.log_softmax(-1)
        value, gs, hs, q, p = form_terms(form, lq.detach(), lp.detach(), True, True)
        want_a, want_b = torch.autograd.grad(form_terms(form, lq, lp, False, False)[0].sum(), [a, b])
        assert torch.allclose(gs - q * gs.sum(-1, keepdim=True), want_a, atol=1e-12), form
        assert torch.allclose(hs - p * hs.sum(-1, keepdim=True), want_b, atol=1e-12), form


def test_jsd_and_skew_ends_are_the_plain_kls():
    assert Form("jsd", 0.0).canonical() == Form("forward_kl")
    assert Form("jsd", 1.0).canonical() == Form("reverse_kl")
    assert Form("skew_reverse_kl", 0.0).canonical() == Form("reverse_kl")
    with pytest.raises(ValueError, match="no closed form"):
        Form("uld")


class _BiggestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("name", ["forward_kl", "jsd", "tvd"])
def test_tiles_bound_the_working_memory_by_block_times_tile(name):
    """With tiles no tensor reaches a block's whole rows (C x V), in forward or backward."""
    torch.manual_seed(0)
    n, hidden, vocab, chunk, tile = 64, 2, 64, 8, 16
    hs, ws = torch.randn(n, hidden, requires_grad=True), torch.randn(vocab, hidden, requires_grad=True)
    ht, wt = torch.randn(n, hidden), torch.randn(vocab, hidden)
    with _BiggestTensor() as seen:
        D.chunked_divergence(hs, ws, ht, wt, name, chunk_size=chunk, tile_size=tile).backward()
    assert seen.largest <= max(chunk * tile, vocab * hidden, n * hidden) < chunk * vocab


def test_no_autograd_graph_is_built_per_block(monkeypatch):
    hs, ws, bs, ht, wt, mask = _problem(torch.float64, seed=6)

    def no_autograd(*args, **kwargs):
        raise AssertionError("autograd called inside the fused loss")

    want = D.jsd(hs @ ws.T + bs, ht @ wt.T, mask)
    want_grads = torch.autograd.grad(want, [hs, ws])
    monkeypatch.setattr(torch.autograd, "grad", no_autograd)
    loss = D.JSD(chunk_size=4)(HeadLogits(hs, ws, bs), HeadLogits(ht, wt), mask)
    hs.grad = ws.grad = None
    loss.backward()
    assert _rel(hs.grad, want_grads[0]) < 1e-10 and _rel(ws.grad, want_grads[1]) < 1e-10


def test_a_subclass_with_its_own_per_position_function_runs_through_autograd():
    class Doubled(D.ForwardKL):
        def per_position(self, student_logprobs, teacher_logprobs):
            return 2 * D.forward_kl_per_position(student_logprobs, teacher_logprobs)

    hs, ws, bs, ht, wt, mask = _problem(torch.float64, seed=7)
    got = Doubled(chunk_size=4)(HeadLogits(hs, ws, bs), HeadLogits(ht, wt), mask)
    assert _rel(got, 2 * D.forward_kl(hs @ ws.T + bs, ht @ wt.T, mask)) < 1e-10


def test_bf16_inputs_compute_in_float32_and_match_the_plain_path():
    g = torch.Generator().manual_seed(8)
    hs = torch.randn(16, 8, generator=g).bfloat16().requires_grad_()
    ws = (torch.randn(40, 8, generator=g) * 0.5).bfloat16().requires_grad_()
    ht, wt = torch.randn(16, 8, generator=g).bfloat16(), (torch.randn(40, 8, generator=g) * 0.5).bfloat16()
    for tile in (None, 16):
        got = D.JSD(chunk_size=5, tile_size=tile)(HeadLogits(hs, ws), HeadLogits(ht, wt))
        want = D.jsd(hs @ ws.T, ht @ wt.T)  # the plain path: bf16 logits upcast to float32
        assert got.dtype == torch.float32 and _rel(got, want) < 1e-5
        g_got, g_want = torch.autograd.grad(got, [hs, ws]), torch.autograd.grad(want, [hs, ws])
        for a, b in zip(g_got, g_want):
            assert a.dtype == torch.bfloat16 and _rel(a, b) < 2e-2  # bf16 gradients: a few bf16 roundings


def test_default_tiles_keep_whole_rows_while_they_fit_and_are_overridable():
    assert default_tile_size(49152, 85, "cpu") == 49152
    tile = default_tile_size(2**22, 32, "cpu")
    assert tile < 2**22 and 32 * tile <= 2**24
    with pytest.raises(ConfigError, match="tile_size must be a positive"):
        D.JSD(tile_size=0)


@pytest.mark.parametrize("tile", [None, 4])
def test_sampled_token_log_probs_through_a_ppo_ratio(tile):
    """The fused sampled-token log-probabilities equal log_softmax gathered at the tokens, and
    a nonlinear loss of them (a clipped PPO surrogate over a ratio, MiniLLM / GRPO style) has
    the same gradients."""
    from kd.policy import clipped_surrogate, sampled_log_probs

    hs, ws, bs, _, _, mask = _problem(torch.float64, seed=10)
    tokens = torch.randint(0, 13, (3, 5), generator=torch.Generator().manual_seed(11))
    tokens[~mask] = -100
    old = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(12)) * 0.1 - 2.5
    advantage = torch.linspace(-1, 1, 15, dtype=torch.float64).view(3, 5)
    got = token_log_probs(HeadLogits(hs, ws, bs), tokens, mask, chunk_size=4, tile_size=tile)
    want = torch.where(mask, sampled_log_probs((hs @ ws.T + bs).log_softmax(-1), tokens), torch.zeros(()))
    assert _rel(got, want) < 1e-10 and bool((got[~mask] == 0).all())

    def surrogate(new):
        ratio = torch.exp(torch.where(mask, new - old, torch.zeros(())))
        return D.reduce(clipped_surrogate(ratio, advantage, 0.2), mask)

    for a, b in zip(torch.autograd.grad(surrogate(got), [hs, ws, bs]),
                    torch.autograd.grad(surrogate(want), [hs, ws, bs])):
        assert _rel(a, b) < 1e-10
