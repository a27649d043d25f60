"""Privileged-context self-distillation on the embedded task (docs/self_distillation.md):
collect the runs of the sweeps below into benchmarks/results/privileged_context.json and
print the table (mean +- sample std over seeds, per-seed values, per-seed paired
differences against the SFT start point of the same seed, same test prompts).

    kd -m experiment=task_self_distill teacher.context=rule,reference teacher.mode=frozen,ema,live seed=0 \
        hydra.sweep.dir=<select>                                   # the mode, chosen on validation
    kd -m experiment=task_self_distill teacher.context=rule,reference,null teacher.mode=frozen seed=0,1,2 \
        hydra.sweep.dir=<main>
    kd -m experiment=task_self_distill teacher.context=rule teacher.mode=frozen \
        '+student_sft.data={privileged_train:{context:rule,share:0.5}}' seed=0,1,2 hydra.sweep.dir=<hinted_rule>
    (and the same with reference: an SFT that read the privileged prompt on half its examples)
    python benchmarks/privileged_context.py <select> <main> [<hinted_rule> <hinted_reference>]
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

OUT = Path(__file__).parent / "results" / "privileged_context.json"
STUDENT, SFT, TEACHER = "student, gkd", "student, SFT (start point)", "teacher"


def _setting(overrides: list[str], key: str) -> str:
    return next((o.split("=", 1)[1] for o in overrides if o.startswith(f"{key}=")), "")


def collect(sweeps: list[Path]) -> list[dict]:
    runs = []
    for sweep in sweeps:
        for path in sorted(sweep.glob("*/metrics.json"), key=lambda p: int(p.parent.name)):
            m = json.loads(path.read_text())
            res = m["results"]
            runs.append({
                "sweep": sweep.name,
                "overrides": m["overrides"],
                "context": _setting(m["overrides"], "teacher.context"),
                "mode": _setting(m["overrides"], "teacher.mode"),
                "seed": m["seed"],
                "student": {k: v for k, v in res[STUDENT].items() if k.startswith("test/") and "teacher" not in k},
                "teacher_with_context": {k: v for k, v in res[TEACHER].items() if k.startswith("test/")},
                "sft": {k: v for k, v in res[SFT].items() if k.startswith("test/")},
                "validation": {k: v for k, v in m["validation"].items() if "exact_match" in k or k == "val/loss"},
                "wall_time_s": m["wall_time_s"],
            })
    return runs


def _cell(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {spread:.2f} ({' / '.join(f'{v:.1f}' for v in values)})"


def _diff(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    sign = lambda v: f"{v:+.1f}".replace("-", "−")  # noqa: E731
    return f"{sign(statistics.mean(values))} ± {spread:.1f} ({' / '.join(sign(v) for v in values)})"


def table(runs: list[dict], sweeps: list[str]) -> str:
    """One row per (sweep, context): the SFT it started from, the distilled student, the
    paired difference (student minus its own SFT, per seed) and the teacher with its context."""
    em = "test/exact_match"
    lines = ["| sweep | context | SFT start (%) | exact match (%) | paired difference vs SFT (points) | "
             "the teacher with its context (%) |", "|---|---|---|---|---|---|"]
    for sweep in sweeps:
        for context in ("rule", "reference", "null"):
            chosen = sorted((r for r in runs if r["sweep"] == sweep and r["context"] == context),
                            key=lambda r: r["seed"])
            if not chosen:
                continue
            sft = [100 * r["sft"][em] for r in chosen]
            student = [100 * r["student"][em] for r in chosen]
            teacher = [100 * r["teacher_with_context"][em] for r in chosen]
            diffs = [a - b for a, b in zip(student, sft)]
            lines.append(f"| {sweep} | {context} ({chosen[0]['mode']}) | {_cell(sft)} | {_cell(student)} | "
                         f"{_diff(diffs)} | {_cell(teacher)} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    sweeps = [Path(a) for a in argv]
    runs = collect(sweeps)
    OUT.write_text(json.dumps({"runs": runs}, indent=1) + "\n")
    for r in runs:
        if r["sweep"] == sweeps[0].name:
            print(r["context"], r["mode"], r["seed"], "val/exact_match", round(r["validation"]["val/exact_match"], 4))
    print(table(runs, [s.name for s in sweeps[1:]]))


if __name__ == "__main__":
    main(sys.argv[1:])
