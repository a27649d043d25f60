"""Every remaining loss on the fused path (issue 27 item 4): MiniLLM, cross_stage, DistilBERT,
ULD and BLD, the evaluation metrics, and the two new helpers of kd/chunked.py.

Each fused value and gradient is checked against the plain (full-logits) computation on the
same models and batch (float64 to 1e-10, float32 to 1e-5 relative; BLD's byte terms compute in
float32 by design, so 1e-5), and each recipe's fused loss is checked to build no ``(N, V)``
tensor: a dispatch mode records every tensor an operation returns whose last dimension is the
vocabulary, and the most rows any of them has must stay within one block."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import kd.chunked as C
import kd.divergences as D
from kd.evaluation import StageMetrics
from kd.models import tiny_causal_lm, tiny_masked_lm
from kd.signals import HeadLogits, Labels, TopK
from tests import test_byte_kd
from tests.test_byte_kd import _fixed_batch, _recipe

pair = test_byte_kd.pair  # the two tokenizers' fixture, shared

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
#: rows of one block in the no-(N, V) checks (default_chunk_size's least)
BLOCK = 32


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _close(got: dict, want: dict, tol: float, keys=None) -> None:
    for key in keys or want:
        assert _rel(torch.as_tensor(got[key]), torch.as_tensor(want[key])) < tol, key


def _grads(loss: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for g, p in zip(grads, params)])


class _VocabRows(TorchDispatchMode):
    """The most rows of any new dense tensor an operation returns whose last dimension is one of
    ``widths`` (an ``(N, V)`` logits tensor is created by some operation before any view of it)."""

    def __init__(self, widths: set[int]) -> None:
        super().__init__()
        self.widths, self.rows = widths, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            # views (a head's transpose, a slice) and sparse maps hold no new logits
            if (isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] in self.widths and not t.is_sparse
                    and not t._is_view()):
                self.rows = max(self.rows, t.numel() // max(t.shape[-1], 1))
        return out


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of BLOCK rows whatever the vocabulary (default_chunk_size's least)."""
    monkeypatch.setitem(C.TARGET_BLOCK, "cpu", 1)


def _attached(recipe, dm):
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, max_steps=1)
    recipe.trainer = trainer
    trainer.datamodule = dm
    recipe.set_vocabulary(len(dm.tokenizer))
    return recipe


def _causal_pair(vocab: int, dtype=torch.float64):
    torch.manual_seed(0)
    student = tiny_causal_lm(vocab_size=vocab + 20, hidden_size=32, num_layers=1).to(dtype)  # padded head
    teacher = tiny_causal_lm(vocab_size=vocab + 20, hidden_size=48, num_layers=1).to(dtype)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(5)  # a teacher that really differs
    return student, teacher


# ----------------------------------------------------------------------------- kd/chunked.py helpers


def _problem(dtype, seed=0, vocab=13):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(3, 5, 8, dtype=dtype, generator=g).requires_grad_()
    ws = torch.randn(vocab, 8, dtype=dtype, generator=g).requires_grad_()
    bs = torch.randn(vocab, dtype=dtype, generator=g).requires_grad_()
    ht = torch.randn(3, 5, 6, dtype=dtype, generator=g)
    wt = torch.randn(vocab, 6, dtype=dtype, generator=g)
    mask = torch.rand(3, 5, generator=g) > 0.3
    mask[0, 0] = True
    w = torch.rand(3, 5, dtype=dtype, generator=g) + 0.5
    return hs, ws, bs, ht, wt, mask, w


@pytest.mark.parametrize("tile", [None, 4])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", ["reverse_kl", "forward_kl", "jsd"])
def test_fused_loss_and_values_equals_the_weighted_plain_sum_and_its_values(name, dtype, tile):
    """``sum w_i D_i`` with its gradients and the values ``D_i`` of one sweep equal the plain
    per-position function's on logits, at two temperatures, with a softcap and a scale."""
    per = {"reverse_kl": D.reverse_kl_per_position, "forward_kl": D.forward_kl_per_position,
           "jsd": lambda q, p: D.jsd_per_position(q, p, 0.3)}[name]
    form = C.Form(name, 0.3 if name == "jsd" else 0.0)
    for temperature in (1.0, 2.5):
        hs, ws, bs, ht, wt, mask, w = _problem(dtype)
        student, teacher = HeadLogits(hs, ws, bs, 3.0, 1.3), HeadLogits(ht, wt)
        rows = mask.reshape(-1).nonzero().squeeze(-1)
        got, values = C.fused_loss_and_values(student, teacher, rows, w.reshape(-1)[rows], form=form,
                                              temperature=temperature, chunk_size=4, tile_size=tile)
        log_q = torch.log_softmax(student.materialize() / temperature, -1)
        log_p = torch.log_softmax(teacher.materialize() / temperature, -1)
        plain = per(log_q, log_p)
        want = (plain * w)[mask].sum()
        assert not values.requires_grad and _rel(values, plain[mask]) < TOL[dtype]
        assert _rel(got, want) < TOL[dtype]
        for a, b in zip(torch.autograd.grad(got, [hs, ws, bs]), torch.autograd.grad(want, [hs, ws, bs])):
            assert _rel(a, b) < TOL[dtype], temperature


def test_fused_loss_and_values_of_labels_is_the_weighted_cross_entropy():
    hs, ws, bs, _, _, mask, w = _problem(torch.float64, seed=1)
    labels = torch.randint(0, 13, (3, 5))
    rows = mask.reshape(-1).nonzero().squeeze(-1)
    got, values = C.fused_loss_and_values(HeadLogits(hs, ws, bs), Labels(labels), rows, w.reshape(-1)[rows],
                                          form=None, chunk_size=3)
    ce = F.cross_entropy((hs @ ws.T + bs).reshape(-1, 13), labels.reshape(-1), reduction="none").view(3, 5)
    want = (ce * w)[mask].sum()
    assert _rel(values, ce[mask]) < 1e-10 and _rel(got, want) < 1e-10
    for a, b in zip(torch.autograd.grad(got, [hs, ws, bs]), torch.autograd.grad(want, [hs, ws, bs])):
        assert _rel(a, b) < 1e-10


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_map_rows_grad_equals_the_function_of_the_full_logits(dtype):
    """A function of whole rows with no closed form (sorted probabilities) over blocks of 4
    rows under checkpointing: the same values and gradients as on the full logits."""
    hs, ws, bs, _, _, mask, w = _problem(dtype, seed=2)
    student = HeadLogits(hs, ws, bs, 2.0, 0.7)
    rows = mask.reshape(-1).nonzero().squeeze(-1)

    def fn(z):
        return torch.softmax(z, -1).sort(-1, descending=True).values[:, :3]

    got = C.map_rows_grad(student, fn, rows, chunk_size=4)
    want = fn(student.materialize().reshape(-1, 13)[rows])
    assert _rel(got, want) < TOL[dtype]
    weights = torch.randn(want.shape, dtype=dtype)
    for a, b in zip(torch.autograd.grad((got * weights).sum(), [hs, ws, bs]),
                    torch.autograd.grad((want * weights).sum(), [hs, ws, bs])):
        assert _rel(a, b) < TOL[dtype]
    assert C.map_rows_grad(student, fn, rows[:0]).shape == (0, 3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_uld_fused_over_two_vocabularies_equals_the_plain_loss(dtype):
    """ULD on hidden states and a head (13 tokens) against a teacher of 9 tokens, as logits and
    as hidden states and head: the plain loss's values and gradients, every reduction."""
    hs, ws, bs, ht, _, mask, _ = _problem(dtype, seed=3)
    wt = torch.randn(9, 6, dtype=dtype)
    for reduction in ("mean", "sum", "none", "seq_mean"):
        for temperature in (1.0, 2.0):
            for teacher in (HeadLogits(ht, wt), ht @ wt.T):
                got = D.ULD(reduction=reduction, chunk_size=4)(HeadLogits(hs, ws, bs), teacher, mask, temperature)
                want = D.ULD(reduction=reduction, chunked=False)(hs @ ws.T + bs, ht @ wt.T, mask, temperature)
                assert got.shape == want.shape and _rel(got, want) < TOL[dtype]
                for a, b in zip(torch.autograd.grad(got.sum(), [hs, ws, bs]),
                                torch.autograd.grad(want.sum(), [hs, ws, bs])):
                    assert _rel(a, b) < TOL[dtype], (reduction, temperature)


def test_metrics_of_a_topk_teacher_are_computed_from_hidden_states():
    hs, ws, bs, _, _, mask, _ = _problem(torch.float32, seed=4)
    labels = torch.randint(0, 13, (3, 5))
    labels[~mask] = -100
    log_p = torch.log_softmax(torch.randn(3, 5, 13), -1).topk(4, -1)
    teacher = TopK(log_p.indices, log_p.values)
    fused, dense = StageMetrics(), StageMetrics()
    fused.update(HeadLogits(hs, ws, bs), labels, mask, teacher)
    dense.update(hs @ ws.T + bs, labels, mask, teacher)
    got, want = fused.compute(), dense.compute()
    assert set(got) == set(want) and "kl_to_teacher" in got
    for key in want:
        assert float(got[key]) == pytest.approx(float(want[key]), rel=1e-5), key


# ----------------------------------------------------------------------------- MiniLLM


@pytest.mark.parametrize("variant", ["paper", "code"])
def test_minillm_fused_equals_dense(task_dm, variant):
    """The same rollouts (one seed): rewards, advantages, old log-probs and weights, then every
    term of a PPO update with the LM term and the student's gradients, fused and dense (float64)."""
    from recipes.minillm import MiniLLM

    V = len(task_dm.tokenizer)
    student, teacher = _causal_pair(V)
    batch = next(iter(task_dm.train_dataloader()))
    recipes = [_attached(MiniLLM(student=student, teacher=teacher, variant=variant, chunked=c), task_dm)
               for c in (True, False)]
    buffers = [r.rollout(batch) for r in recipes]
    fused, dense = buffers
    assert "teacher_hidden" in fused and "teacher_logprobs" not in fused and "teacher_logprobs" in dense
    assert torch.equal(fused["input_ids"], dense["input_ids"]) and torch.equal(fused["mask"], dense["mask"])
    mask = fused["mask"]
    assert mask.sum() > BLOCK
    for key in ("old_logprobs", "rewards", "advantages", "weights"):
        assert _rel(fused[key][mask], dense[key][mask]) < 1e-10, key
    data = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    params = [p for p in student.parameters()]
    results = []
    for recipe, buffer in zip(recipes, buffers):
        buffer = {**buffer, "old_logprobs": buffer["old_logprobs"] - 0.3 * mask}  # ratios of e^0.3: some clip
        terms = recipe.minibatch_loss(buffer, data)
        results.append((terms, _grads(terms["loss"], params)))
    (t_fused, g_fused), (t_dense, g_dense) = results
    assert t_dense["clip_fraction"] > 0 and t_dense["lm"] > 0
    _close(t_fused, t_dense, 1e-10)
    assert _rel(g_fused, g_dense) < 1e-10


def test_minillm_builds_no_full_logits(task_dm, small_blocks):
    from recipes.minillm import MiniLLM

    V = len(task_dm.tokenizer)
    student, teacher = _causal_pair(V, torch.float32)
    batch = next(iter(task_dm.train_dataloader()))
    recipe = _attached(MiniLLM(student=student, teacher=teacher, variant="code"), task_dm)
    data = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    buffer = recipe.rollout(batch)  # sampling itself (kd.generation) is not the loss: outside the check
    with _VocabRows({V, V + 20}) as seen:
        student = recipe.outputs(student, buffer, fused=True)
        scored = recipe.score(student.logits, recipe.teacher_outputs(buffer).logits, student.labels, buffer["mask"],
                              buffer["weights"][buffer["mask"]])
        recipe.minibatch_loss(buffer, data)["loss"].backward()
        recipe._eval_step("val", data)
    assert _rel(scored["rewards"], buffer["rewards"]) < 1e-5
    # at most a block of logits rows, or the teacher's head transposed (48 rows, its hidden size)
    assert buffer["mask"].sum() > 4 * 48 and 0 < seen.rows <= max(BLOCK, 48)


# ----------------------------------------------------------------------------- cross_stage


def _cross_stage_pair(task_dm, estimator, dtype=torch.float64):
    from recipes.cross_stage import CrossStage

    V = len(task_dm.tokenizer)
    student, teacher = _causal_pair(V, dtype)
    recipes = [_attached(CrossStage(student=student, teacher=teacher, estimator=estimator, chunked=c,
                                    sampling={"max_new_tokens": 6}), task_dm) for c in (True, False)]
    return student, recipes


@pytest.mark.parametrize("estimator", ["sampled", "dense"])
def test_cross_stage_fused_equals_dense(task_dm, estimator):
    """The distillation term and its per-teacher statistics, and GRPO's surrogate, on one sampled
    batch: values and the student's gradients fused and dense (float64)."""
    student, recipes = _cross_stage_pair(task_dm, estimator)
    batch = next(iter(task_dm.train_dataloader()))
    sampled = recipes[0].rollout(batch, torch.arange(len(batch["input_ids"])))
    sampled.pop("responses")
    sampled["sample_logprobs"] = sampled["sample_logprobs"].double() - 0.2  # rho = e^0.2: some clip
    sampled["advantages"] = torch.linspace(-1.0, 1.0, len(sampled["input_ids"]), dtype=torch.float64)
    params = list(student.parameters())
    results = []
    for recipe in recipes:
        loss, stats = recipe.distill_loss(sampled)
        grpo = recipe.grpo_loss(sampled)
        results.append(({"loss": loss, "grpo": grpo, **stats}, _grads(loss + grpo, params)))
    (t_fused, g_fused), (t_dense, g_dense) = results
    assert set(t_fused) == set(t_dense)
    _close(t_fused, t_dense, 1e-10)
    assert _rel(g_fused, g_dense) < 1e-10


def test_cross_stage_builds_no_full_logits(task_dm, small_blocks):
    student, (recipe, _) = _cross_stage_pair(task_dm, "dense", torch.float32)
    batch = next(iter(task_dm.train_dataloader()))
    recipe.compute_loss(batch)  # checks the heads once
    sampled = recipe.rollout(batch, torch.arange(len(batch["input_ids"])))  # sampling: outside the check
    sampled.pop("responses")
    V = len(task_dm.tokenizer)
    with _VocabRows({V, V + 20}) as seen:
        loss, _ = recipe.distill_loss(sampled)
        (loss + recipe.grpo_loss({**sampled, "advantages": torch.ones(len(sampled["input_ids"]))})).backward()
    # at most a block of logits rows, or the teacher's head transposed (48 rows, its hidden size)
    assert sampled["attention_mask"].sum() > 2 * 48 and 0 < seen.rows <= max(BLOCK, 48)


# ----------------------------------------------------------------------------- DistilBERT


def _distilbert(chunked, dtype=torch.float64, length=24):
    from kd.data.mlm import mask_tokens, token_weights
    from recipes.distilbert import DistilBERT

    vocab, special = 40, [0, 1, 2, 3]
    torch.manual_seed(0)
    teacher = tiny_masked_lm(vocab_size=vocab, hidden_size=16, num_layers=2, num_heads=2, dropout=0.0).to(dtype)
    student = tiny_masked_lm(vocab_size=vocab, hidden_size=16, num_layers=1, num_heads=2, dropout=0.0).to(dtype)
    recipe = DistilBERT(student=student, teacher=teacher, divergence=D.ForwardKL(chunked=chunked))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab, (4, length), generator=g)
    attention = torch.ones_like(ids)
    attention[1, length // 2:] = 0
    ids[attention == 0] = 0
    weights = token_weights(torch.ones(vocab), special)
    masked, labels = mask_tokens(ids, attention, weights, 3, vocab, generator=g)
    return recipe, {"input_ids": masked, "attention_mask": attention, "labels": labels, "original_ids": ids}


def test_distilbert_fused_equals_dense():
    """KL, MLM cross-entropy and cosine terms and the student's gradients with the MLM head split
    into its transform and the tied decoder, and with the full logits (float64)."""
    results = []
    for chunked in (True, False):
        recipe, batch = _distilbert(chunked)
        assert recipe.fused is chunked
        out = recipe.outputs(recipe.student, batch, fused=recipe.fused)
        assert isinstance(out.logits, HeadLogits) is chunked
        terms = recipe.compute_loss(batch)
        results.append((terms, _grads(terms["loss"], list(recipe.student.parameters()))))
    (t_fused, g_fused), (t_dense, g_dense) = results
    _close(t_fused, t_dense, 1e-10)
    assert _rel(g_fused, g_dense) < 1e-10


def test_distilbert_builds_no_full_logits(small_blocks):
    recipe, batch = _distilbert(True, torch.float32, length=48)  # not 40: attention rows are (L, L)
    recipe.compute_loss(batch)  # checks the heads once
    with _VocabRows({40}) as seen:
        recipe.compute_loss(batch)["loss"].backward()
        recipe._eval_step("val", batch)
    assert 0 < seen.rows <= BLOCK < 4 * 48


# ----------------------------------------------------------------------------- ULD and BLD


def _cross_tokenizer(pair, cls, dtype, **kw):
    dm, student_tok, teacher_tok = pair
    torch.manual_seed(0)
    student = tiny_causal_lm(vocab_size=len(student_tok), hidden_size=32, num_layers=1, num_heads=2).to(dtype)
    teacher = tiny_causal_lm(vocab_size=len(teacher_tok), hidden_size=32, num_layers=1, num_heads=2).to(dtype)
    recipes = []
    for chunked in (True, False):
        options = {"divergence": D.ULD(chunked=chunked)} if cls.needs.divergence else {"chunked": chunked}
        recipe = _recipe(cls, student_tok, teacher_tok, teacher=teacher, student=student, **options, **kw)
        recipes.append(recipe.to(dtype))
    if hasattr(recipes[0], "byte_heads"):
        recipes[1].byte_heads.load_state_dict(recipes[0].byte_heads.state_dict())
    return student, recipes, _fixed_batch(dm, student_tok, teacher_tok)


@pytest.mark.parametrize("name", ["uld", "byte_kd"])
def test_cross_tokenizer_recipes_fused_equal_dense(pair, name):
    """ULD (float64 throughout: 1e-10) and BLD (its byte terms compute in float32: 1e-5), every
    term and the student's gradients, the student fused or given as logits."""
    from recipes.byte_kd import ULD, ByteKD

    cls = {"uld": ULD, "byte_kd": ByteKD}[name]
    student, recipes, batch = _cross_tokenizer(pair, cls, torch.float64,
                                               **({"num_heads": 2, "lam_boundary_kl": 0.5} if name == "byte_kd" else {}))
    results = []
    for recipe in recipes:
        assert recipe.fused_student is (recipe is recipes[0])
        terms = recipe.compute_loss(batch)
        results.append((terms, _grads(terms["loss"], list(student.parameters()))))
    (t_fused, g_fused), (t_dense, g_dense) = results
    tol = 1e-10 if name == "uld" else 1e-5
    _close(t_fused, t_dense, tol)
    assert t_dense["uld" if name == "uld" else "boundary_kl"] > 0
    assert _rel(g_fused, g_dense) < tol


@pytest.mark.parametrize("name", ["uld", "byte_kd"])
def test_cross_tokenizer_recipes_build_no_full_student_logits(pair, name, small_blocks):
    from recipes.byte_kd import ULD, ByteKD

    cls = {"uld": ULD, "byte_kd": ByteKD}[name]
    _, (recipe, _), batch = _cross_tokenizer(pair, cls, torch.float32,
                                             **({"num_heads": 2, "lam_boundary_kl": 0.5} if name == "byte_kd" else {}))
    recipe.compute_loss(batch)  # checks the heads once
    V = len(pair[1])
    assert V != len(pair[2])  # the teacher's logits (its own vocabulary) are not counted
    with _VocabRows({V}) as seen:
        recipe.compute_loss(batch)["loss"].backward()
    assert batch["attention_mask"].sum() > BLOCK and 0 < seen.rows <= BLOCK
