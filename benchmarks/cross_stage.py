"""Cross-stage distillation against the replay-with-SFT control: collect the
``pipeline.json`` of ``kd pipeline=task_stages_rl seed=<s>`` runs into one JSON file and
print, per skill after the RL stage, each variant's exact match (mean ± sample std, per
seed) and the per-seed paired differences (with distillation minus the control, and
minus the plain stages), plus the RL stage's reward at its start and end and stage 1's
teacher KL on the replayed rows.

    python benchmarks/cross_stage.py RUN_DIR [RUN_DIR ...] --json benchmarks/results/cross_stage.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kd.pipeline import CONTROL, WITH, WITHOUT, load_pipelines  # noqa: E402


def _cell(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    v = [scale * x for x in values]
    spread = f" ± {statistics.stdev(v):.{digits}f}" if len(v) > 1 else ""
    return f"{statistics.fmean(v):.{digits}f}{spread} ({' / '.join(f'{x:.{digits}f}' for x in v)})"


def _diff(a: list[float], b: list[float]) -> str:
    d = [100 * (x - y) for x, y in zip(a, b)]
    spread = f" ± {statistics.stdev(d):.1f}" if len(d) > 1 else ""
    text = f"{statistics.fmean(d):+.1f}{spread} ({' / '.join(f'{x:+.1f}' for x in d)})"
    return text.replace("-", "−")


def report(runs: list[dict]) -> str:
    runs = sorted(runs, key=lambda r: r["seed"])
    first, last = list(runs[0]["table"][WITH])
    skills = list(runs[0]["table"][WITH][last])
    lines = [f"seeds {[r['seed'] for r in runs]}; exact match (%) on the test prompts, mean ± std (per seed)", "",
             "| after | " + " | ".join(skills) + " |", "|---|" + "---|" * len(skills)]

    def row(name: str, variant: str, stage: str) -> None:
        lines.append(f"| {name} | " + " | ".join(_cell([r["table"][variant][stage][k] for r in runs])
                                               for k in skills) + " |")

    row(f"stage 1 ({first})", WITH, first)
    for name, variant in (("stages in sequence", WITHOUT), ("replay with SFT (control)", CONTROL),
                          ("cross-stage distillation", WITH)):
        if variant in runs[0]["table"]:
            row(f"stage 2 ({last}), {name}", variant, last)
    for name, other in (("distillation − control", CONTROL), ("distillation − in sequence", WITHOUT),
                        ("control − in sequence", None)):
        a, b = (WITH, other) if other else (CONTROL, WITHOUT)
        if a in runs[0]["table"] and b in runs[0]["table"]:
            lines.append(f"| {name} (points) | " + " | ".join(
                _diff([r["table"][a][last][k] for r in runs], [r["table"][b][last][k] for r in runs])
                for k in skills) + " |")
    lines += ["", "| stage 2 variant | reward, first batches | reward, last batches | val KL(stage 1 teacher ‖ student) on replayed rows |",
              "|---|---|---|---|"]
    for variant in (WITHOUT, CONTROL, WITH):
        if variant not in runs[0]["table"]:
            continue
        val = [r["validation"][variant][last] for r in runs]
        kl = [v.get(f"val/teacher_kl/{first}") for v in val]
        lines.append(f"| {variant} | {_cell([v['val/stage_reward_start'] for v in val], 1, 3)} | "
                     f"{_cell([v['val/stage_reward'] for v in val], 1, 3)} | "
                     f"{_cell(kl, 1, 3) if None not in kl else '-'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    runs = load_pipelines(args.runs)
    if not runs:
        raise SystemExit(f"no pipeline.json under {args.runs}; run kd pipeline=task_stages_rl seed=<s> first")
    if args.json:
        args.json.write_text(json.dumps({"runs": sorted(runs, key=lambda r: r["seed"])}, indent=2))
    print(report(runs))


if __name__ == "__main__":
    main()
