"""Masked cross-entropy, epoch metrics weighted by counts, seed summaries."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch

from kd import ConfigError
from kd.data import IGNORE_INDEX
from kd.evaluation import StageMetrics, cross_entropy, summarize
from kd.signals import HeadLogits, TopK


def test_cross_entropy_ignores_unlabelled_positions():
    logits = torch.tensor([[1.0, 2.0, 3.0], [5.0, 0.0, 0.0]])
    labels = torch.tensor([2, IGNORE_INDEX])
    assert cross_entropy(logits, labels).item() == pytest.approx(0.407606, abs=1e-6)
    assert cross_entropy(logits, torch.tensor([IGNORE_INDEX, IGNORE_INDEX])).item() == 0.0
    assert cross_entropy(logits, labels, reduction="none")[1].item() == 0.0


def test_stage_metrics_weight_batches_by_their_counts():
    m = StageMetrics()
    # batch 1: 2 labelled rows, 1 correct; batch 2: 1 labelled row, correct
    m.update(torch.tensor([[2.0, 0.0], [2.0, 0.0]]), torch.tensor([0, 1]), torch.ones(2, dtype=torch.bool))
    m.update(torch.tensor([[0.0, 2.0], [0.0, 0.0]]), torch.tensor([1, IGNORE_INDEX]), torch.ones(2, dtype=torch.bool))
    out = m.compute()
    assert out["acc"].item() == pytest.approx(2 / 3)
    ce_good, ce_bad = math.log(1 + math.exp(-2)), math.log(1 + math.exp(2))
    assert out["loss"].item() == pytest.approx((2 * ce_good + ce_bad) / 3, abs=1e-6)
    assert "kl_to_teacher" not in out


def test_stage_metrics_with_teacher():
    m = StageMetrics()
    s = torch.log(torch.tensor([[0.2, 0.5, 0.3]]))
    t = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    m.update(s, torch.tensor([0]), torch.ones(1, dtype=torch.bool), t)
    out = m.compute()
    assert out["kl_to_teacher"].item() == pytest.approx(0.583815, abs=1e-5)  # docs/spec.md section 5
    assert out["teacher_acc"].item() == 1.0 and out["acc"].item() == 0.0


def test_each_routed_top_k_teachers_kl_is_over_its_bins_and_its_rows_without_the_full_student_logits(monkeypatch):
    """A served (top-k) routed teacher's validation KL: over the k + 1 bins (the top-k ids
    and the tail), averaged over the masked positions of the rows routed to it; a student
    given as hidden states and head gives the same values without building its (B, L, V)
    logits, which the fused path exists to avoid."""
    g = torch.Generator().manual_seed(3)
    B, L, H, V, k = 3, 4, 6, 7, 2
    hidden, weight = torch.randn(B, L, H, generator=g), torch.randn(V, H, generator=g)
    teacher = torch.log_softmax(torch.randn(B, L, V, generator=g), -1)
    top = teacher.topk(k, -1)
    route = torch.tensor([0, 1, 0])
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, 3] = mask[2, 0] = False
    student = (hidden @ weight.T).double()
    expected = {0: [], 1: []}
    for r in range(B):
        for t in range(L):
            if mask[r, t]:
                q = torch.softmax(student[r, t], -1)
                p_top = top.values[r, t].double().exp()
                q_top = q[top.indices[r, t]]
                p_bins = torch.cat([p_top, (1 - p_top.sum()).view(1)])
                q_bins = torch.cat([q_top, (1 - q_top.sum()).view(1)])
                expected[int(route[r])].append((p_bins * (p_bins / q_bins).log()).sum().item())
    results = []
    for given in (hidden @ weight.T, HeadLogits(hidden, weight)):
        if isinstance(given, HeadLogits):
            monkeypatch.setattr(HeadLogits, "materialize", lambda self: pytest.fail("materialized the student"))
        m = StageMetrics(routes=["a", "b"])
        m.update_routes(given, TopK(top.indices, top.values), mask, route)
        out = m.compute()
        for k_route, name in enumerate(("a", "b")):
            want = sum(expected[k_route]) / len(expected[k_route])
            assert out[f"teacher_kl/{name}"].item() == pytest.approx(want, rel=1e-4)
        results.append(out)
    assert results[0]["teacher_kl/a"].item() != pytest.approx(results[0]["teacher_kl/b"].item(), rel=1e-3)


def test_summary_groups_by_overrides_without_seed():
    runs = [
        {"seed": s, "overrides": [f"seed={s}", "recipe.lam=0.7"],
         "results": {"student, hinton": {"test/acc": a, "params": 10}}}
        for s, a in [(0, 0.90), (1, 0.92), (2, 0.94)]
    ]
    table = summarize(runs)
    assert "recipe.lam=0.7  [3 seeds: [0, 1, 2]]" in table
    std = statistics.stdev([90.0, 92.0, 94.0])
    assert f"92.00 ± {std:.2f}" in table


def test_summary_prints_rouge_l_like_accuracy_as_a_percentage():
    """Rouge-L is a fraction: 0.5076 and 0.5022 would both print as 0.51 / 0.50 with two
    decimals; as percentages the table keeps the 0.54-point difference."""
    runs = [{"seed": s, "overrides": [f"seed={s}"], "results": {"student, x": {"test/rouge_l": v}}}
            for s, v in [(0, 0.5076), (1, 0.5022)]]
    table = summarize(runs, metric="test/rouge_l")
    assert f"50.49 ± {statistics.stdev([50.76, 50.22]):.2f}" in table


def test_summary_reports_share_of_the_gap_closed_and_wall_time():
    runs = [
        {"seed": s, "overrides": [f"seed={s}"], "wall_time_s": w,
         "results": {"teacher": {"test/acc": 0.9}, "student, from scratch": {"test/acc": 0.5},
                     "student, hinton": {"test/acc": a}}}
        for s, a, w in [(0, 0.7, 10.0), (1, 0.8, 14.0)]
    ]
    table = summarize(runs)
    hinton = next(line for line in table.splitlines() if "student, hinton" in line)
    gaps = [50.0, 75.0]  # (0.7 - 0.5) / (0.9 - 0.5), (0.8 - 0.5) / 0.4
    assert hinton.endswith(f"{statistics.fmean(gaps):.2f} ± {statistics.stdev(gaps):.2f}")
    assert "wall time 12.00 ± 2.83 s per run" in table
    teacher = next(line for line in table.splitlines() if line.strip().startswith("teacher"))
    assert teacher.endswith(" 0")  # params last: no gap column for the reference rows


def test_summary_pairs_each_setting_with_the_baseline_by_seed(tmp_path, capsys):
    """Per-seed differences of the trained model against the baseline setting's same seed:
    ppl (12 - 20, 15 - 18) = -8, -3 (mean -5.5, std 3.54); seed 2 has no baseline run."""
    def run(setting, recipe, seed, ppl):
        return {"seed": seed, "recipe": recipe, "overrides": [setting, f"seed={seed}"],
                "results": {"teacher": {"test/ppl": 5.0}, f"student, {recipe}": {"test/ppl": ppl}}}

    runs = [run("recipe.lam=0", "hinton", 0, 20.0), run("recipe.lam=0", "hinton", 1, 18.0),
            run("divergence=jsd", "hinton", 0, 12.0), run("divergence=jsd", "hinton", 1, 15.0),
            run("divergence=jsd", "hinton", 2, 11.0)]
    table = summarize(runs, metric="test/ppl", baseline="recipe.lam=0")
    line = next(l for l in table.splitlines() if l.strip().startswith("paired"))  # noqa: E741
    assert line.strip() == "paired difference vs recipe.lam=0: -5.50 ± 3.54 (seed 0: -8.00, seed 1: -3.00)"
    assert table.count("paired difference") == 1  # not for the baseline itself
    with pytest.raises(ConfigError, match="no runs with the setting 'recipe.lam=1'; choose one of: recipe.lam=0, "
                                          "divergence=jsd"):
        summarize(runs, metric="test/ppl", baseline="recipe.lam=1")
    # overrides shared by every setting need not be repeated: a part that names one setting is enough
    common = [{**r, "overrides": ["logger=csv", *r["overrides"]]} for r in runs]
    assert "paired difference vs logger=csv recipe.lam=0: -5.50" in summarize(common, "test/ppl", "recipe.lam=0")
    with pytest.raises(ConfigError, match="several settings with the setting 'logger=csv'"):
        summarize(common, metric="test/ppl", baseline="logger=csv")
    # the console script: one sentence and exit code 2 for an unknown baseline
    from kd.cli import report_main

    for i, r in enumerate(runs):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "metrics.json").write_text(json.dumps(r))
    report_main([str(tmp_path), "--metric", "test/ppl", "--baseline", "recipe.lam=0"])
    assert "paired difference vs recipe.lam=0: -5.50" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        report_main([str(tmp_path), "--baseline", "nope"])
    assert exit_.value.code == 2 and "no runs with the setting 'nope'" in capsys.readouterr().err
