"""The fused loss's compiled path (kd/compiled.py and kd/chunked.py's compiled block
function, issue 27 item 3).

Every check compares against the plain functions of kd.divergences on logits built from the
same hidden states and heads (values and autograd gradients). Compiling on CPU costs seconds
per graph, so the matrix over every divergence runs through the ``aot_eager`` backend (dynamo
traces the block function, AOT autograd captures it: what the compiled path runs, without
inductor's code generation), and inductor itself compiles one block function whose
divergence parameter, temperature and row count change through its arguments."""

from __future__ import annotations

import logging

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

import kd.chunked as K
import kd.compiled as C
import kd.divergences as D
from kd import ConfigError
from kd.signals import HeadLogits

MODULES = {
    "forward_kl": lambda **kw: D.ForwardKL(**kw),
    "reverse_kl": lambda **kw: D.ReverseKL(**kw),
    "jsd": lambda **kw: D.JSD(beta=0.3, **kw),
    "skew_forward_kl": lambda **kw: D.SkewForwardKL(alpha=0.2, **kw),
    "skew_reverse_kl": lambda **kw: D.SkewReverseKL(alpha=0.2, **kw),
    "tvd": lambda **kw: D.TVD(**kw),
    "soft_cross_entropy": lambda **kw: D.SoftCrossEntropy(**kw),
}


@pytest.fixture
def backend(monkeypatch):
    """Use a counting torch.compile backend for the compiled block function; fresh dynamo state."""

    def use(name: str) -> CompileCounterWithBackend:
        counter = CompileCounterWithBackend(name)
        monkeypatch.setattr(C, "BACKEND", counter)
        K._COMPILED_ROWS.reset()
        torch._dynamo.reset()
        return counter

    yield use
    K._COMPILED_ROWS.reset()
    torch._dynamo.reset()


def _graphs() -> int:
    """Graphs dynamo holds for the block function (compiles that restarted their analysis,
    which a counting backend sees twice, count once)."""
    return len(torch._dynamo.eval_frame._debug_get_cache_entry_list(K._dense_rows.__code__))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _problem(dtype: torch.dtype, valid: int, seed: int = 0, vocab: int = 13):
    """Hidden states (3, 6, .) and heads, a mask with ``valid`` True entries (one sequence empty)."""
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(3, 6, 8, dtype=dtype, generator=g).requires_grad_()
    ws = torch.randn(vocab, 8, dtype=dtype, generator=g).requires_grad_()
    bs = torch.randn(vocab, dtype=dtype, generator=g).requires_grad_()
    ht = torch.randn(3, 6, 6, dtype=dtype, generator=g).requires_grad_()
    wt = torch.randn(vocab, 6, dtype=dtype, generator=g).requires_grad_()
    mask = torch.zeros(3 * 6, dtype=torch.bool)
    mask[torch.randperm(12, generator=g)[:valid]] = True  # the last sequence has no valid position
    return hs, ws, bs, ht, wt, mask.view(3, 6)


def _logits(h, w, b, softcap, scale):
    z = (h @ w.T + (0 if b is None else b)) * scale
    return softcap * torch.tanh(z / softcap) if softcap else z


@pytest.mark.parametrize("name", sorted(MODULES))
def test_compiled_block_equals_plain_for_every_divergence_reduction_mask_temperature_and_softcap(name, backend):
    """Values and gradients (student hidden, head, bias; teacher hidden and head) through the
    compiled block function equal the plain function's (float64, 1e-10), and the row count,
    temperature and reduction weights change without a new graph: one graph per softcap
    setting and per gradient need (values only for ``none``'s forward, then both models)."""
    backend("aot_eager")
    make = MODULES[name]
    cases = [("mean", 1.0, None, 10), ("sum", 2.5, None, 7), ("seq_mean", 2.5, 3.0, 11), ("none", 0.7, 3.0, 6),
             ("mean", 1.3, 3.0, 12)]
    for reduction, temperature, softcap, valid in cases:  # blocks of 4: last blocks of 2 or 3 rows, never 1
        hs, ws, bs, ht, wt, mask = _problem(torch.float64, valid, seed=valid)
        student, teacher = HeadLogits(hs, ws, bs, softcap, 1.3), HeadLogits(ht, wt, None, softcap, 0.8)
        got = make(reduction=reduction, chunk_size=4, compile=True)(student, teacher, mask, temperature)
        want = make(reduction=reduction, chunked=False)(_logits(hs, ws, bs, softcap, 1.3),
                                                       _logits(ht, wt, None, softcap, 0.8), mask, temperature)
        case = (reduction, temperature, softcap)
        assert got.dtype == want.dtype and got.shape == want.shape, case
        assert _rel(got, want) < 1e-10, case
        inputs = [hs, ws, bs, ht, wt]
        for a, b in zip(torch.autograd.grad(got.sum(), inputs), torch.autograd.grad(want.sum(), inputs)):
            assert _rel(a, b) < 1e-10, case
    assert K._COMPILED_ROWS.failed is None
    # graphs: (no softcap, both grads), (softcap, values only), (softcap, both grads); none per N or T
    assert _graphs() == 3


def test_given_teacher_logits_that_want_gradients_through_the_compiled_block(backend):
    backend("aot_eager")
    hs, ws, bs, _, _, mask = _problem(torch.float64, 10, seed=3)
    t_logits = (torch.randn(3, 6, 13, dtype=torch.float64, generator=torch.Generator().manual_seed(9)) * 2)
    t_logits.requires_grad_()
    got = D.JSD(beta=0.7, chunk_size=4, compile="true")(HeadLogits(hs, ws, bs), t_logits, mask, 1.7)
    want = D.JSD(beta=0.7)(hs @ ws.T + bs, t_logits, mask, 1.7)
    assert _rel(got, want) < 1e-10
    for a, b in zip(torch.autograd.grad(got, [hs, ws, bs, t_logits]), torch.autograd.grad(want, [hs, ws, bs, t_logits])):
        assert _rel(a, b) < 1e-10
    assert K._COMPILED_ROWS.failed is None


def test_inductor_compiles_one_graph_whatever_the_rows_parameter_and_temperature(backend):
    """Inductor (C++ code on CPU): one JSD graph per dtype serves every row count (blocks of
    2 to 5 rows), every beta and temperature; float64 to 1e-10, float32 to 1e-5 relative;
    bf16 inputs accumulate in float32 (a float32 loss, bf16 gradients within bf16 rounding)."""
    import torch._inductor.config as inductor_config

    # no worker pool to start for one graph; patch() restores the setting (a monkeypatch undo
    # left inductor without it, which broke vLLM's own compile later in the same process)
    with inductor_config.patch(compile_threads=1):
        backend("inductor")
        g = torch.Generator().manual_seed(0)
        for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
            ws = torch.randn(40, 8, dtype=dtype, generator=g).requires_grad_()
            bs = torch.randn(40, dtype=dtype, generator=g).requires_grad_()
            wt = torch.randn(40, 8, dtype=dtype, generator=g)
            for n, beta, temperature in ((13, 0.5, 1.0), (7, 0.9, 2.0), (22, 0.1, 0.5)):
                hs = torch.randn(n, 8, dtype=dtype, generator=g).requires_grad_()
                ht = torch.randn(n, 8, dtype=dtype, generator=g)
                got = D.JSD(beta=beta, chunk_size=5, compile="true")(HeadLogits(hs, ws, bs), HeadLogits(ht, wt),
                                                                    temperature=temperature)
                want = D.jsd(hs @ ws.T + bs, ht @ wt.T, beta=beta, temperature=temperature)
                assert got.dtype == dtype and _rel(got, want) < tol, (dtype, n)
                for a, b in zip(torch.autograd.grad(got, [hs, ws, bs]), torch.autograd.grad(want, [hs, ws, bs])):
                    assert _rel(a, b) < tol, (dtype, n)
        assert _graphs() == 2  # float64 and float32, no recompile per N, beta or temperature
        hs = torch.randn(17, 8, generator=g).bfloat16().requires_grad_()  # blocks of 5, 5, 5, 2
        ws = (torch.randn(40, 8, generator=g) * 0.5).bfloat16().requires_grad_()
        ht, wt = torch.randn(17, 8, generator=g).bfloat16(), (torch.randn(40, 8, generator=g) * 0.5).bfloat16()
        got = D.JSD(chunk_size=5, compile="true")(HeadLogits(hs, ws), HeadLogits(ht, wt))
        want = D.jsd(hs @ ws.T, ht @ wt.T)  # the plain path: bf16 logits upcast to float32
        assert got.dtype == torch.float32 and _rel(got, want) < 1e-5
        for a, b in zip(torch.autograd.grad(got, [hs, ws]), torch.autograd.grad(want, [hs, ws])):
            assert a.dtype == torch.bfloat16 and _rel(a, b) < 2e-2  # bf16 gradients: a few bf16 roundings
        assert K._COMPILED_ROWS.failed is None and _graphs() == 3


def test_a_failed_compile_falls_back_to_eager_with_one_warning(backend, monkeypatch):
    def broken(graph, inputs):
        raise RuntimeError("no C++ compiler found")

    backend("eager")
    monkeypatch.setattr(C, "BACKEND", broken)
    hs, ws, bs, ht, wt, mask = _problem(torch.float64, 10, seed=5)
    want = D.forward_kl(hs @ ws.T + bs, ht @ wt.T, mask)
    want_grad = torch.autograd.grad(want, hs)[0]
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("kd.compiled")
    logger.addHandler(handler)
    try:
        for _ in range(2):
            got = D.ForwardKL(chunk_size=4, compile=True)(HeadLogits(hs, ws, bs), HeadLogits(ht, wt), mask)
            assert _rel(got, want) < 1e-10
            assert _rel(torch.autograd.grad(got, hs)[0], want_grad) < 1e-10
    finally:
        logger.removeHandler(handler)
    lines = [r.getMessage() for r in records]
    assert len(lines) == 1 and "no C++ compiler found" in lines[0] and "eager" in lines[0]


def test_compile_setting_auto_is_cuda_only_and_bad_values_name_the_choices(backend, monkeypatch):
    assert C.wanted("auto", "cuda") and not C.wanted("auto", "cpu")
    assert C.wanted(True, "cpu") and C.wanted("true", "cpu") and not C.wanted(False, "cuda")
    with pytest.raises(ConfigError, match="auto, true, false"):
        D.JSD(compile="sometimes")
    counter = backend("eager")
    hs, ws, bs, ht, wt, mask = _problem(torch.float64, 10, seed=6)
    D.JSD(chunk_size=4)(HeadLogits(hs, ws, bs), HeadLogits(ht, wt), mask).backward()  # auto, on CPU: eager
    D.JSD(chunk_size=4, compile=False)(HeadLogits(hs, ws, bs), HeadLogits(ht, wt), mask).backward()
    assert counter.frame_count == 0 and _graphs() == 0
