"""Staged post-training with cross-stage distillation (GLM-5 style): ``kd pipeline=<name>``.

A pipeline (``conf/pipeline/``) is a list of stages, each with its own skills (the data's
``train_skills``), objective and epochs. Stage ``i`` trains the student that stage ``i-1``
ended with (``student_init``) with the recipe named by ``pipeline.recipe`` (by default
``recipes.cross_stage.CrossStage``):

* its own skills' rows get the stage objective (``sft`` or ``grpo``);
* with ``lam > 0``, the prompts of every earlier stage's skills (those that are not the
  stage's own) are replayed, each routed (``data.routes``) to that stage's final checkpoint
  as a frozen teacher (``teachers:``), and distilled on the student's own samples.

Every stage's final weights are a cache entry (``stages/``, keyed like every cached run by
:func:`kd.subruns.run_key`: everything that shapes them, the previous stage's entry
included), so reruns and sweeps reuse them. With ``pipeline.compare`` the same stages also
run without cross-stage distillation (``lam = 0``: each stage trains on its own skills
only); with ``pipeline.control`` they also run with the replayed prompts trained by SFT
on the dataset answers instead (``recipe.replay=sft``: the same extra rows, no teacher),
which separates distillation from the extra steps. The run prints each skill's exact match
after each stage for every variant and, for stages that sample (GRPO, self-distillation),
the stage's mean reward over its first and its last ``reward_window`` batches; it writes
these and each stage's last validation metrics (``val/teacher_kl/<teacher>`` included) to
``pipeline.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from kd import ConfigError
from kd.build import build
from kd.cache import Cache
from kd.config import student_factory, sub_config
from kd.subruns import cached_run, run_key

#: the variants a comparing pipeline runs
WITH, WITHOUT = "with cross-stage distillation", "without (stages in sequence)"
CONTROL = "replay with SFT (control)"


def _stage_config(cfg: DictConfig, stage: DictConfig, earlier: list[tuple[DictConfig, Path]], start: Path | None,
                  lam: float, root: Path, replay_with: str = "distill") -> DictConfig:
    """The run config of one stage: its skills (plus, with ``lam``, every earlier stage's
    other skills, routed to that stage's checkpoint; ``replay_with``: the recipe's
    ``replay``), its objective and epochs, the previous weights."""
    p = cfg.pipeline
    model = OmegaConf.to_container(student_factory(cfg)[0], resolve=True)
    own = [str(k) for k in stage.skills]
    routes: dict[str, str] = {}
    for s, _ in earlier if lam > 0 else []:  # a skill replays to the last earlier stage that trained it
        routes.update({str(k): str(s.name) for k in s.skills if str(k) not in own})
    replay = [(s, entry) for s, entry in earlier if str(s.name) in routes.values()]
    skills = own + [k for k in dict.fromkeys(routes)]
    recipe = {**OmegaConf.to_container(p.recipe, resolve=True), "stage_objective": stage.get("objective", "sft"),
              "lam": lam if replay else 0.0}
    if replay:
        recipe["replay"] = replay_with
    else:  # nothing replayed: the same run (and cache entry) whatever the variant
        recipe.pop("replay", None)
    teachers = {str(s.name): {"model": model, "checkpoint": str(entry), "fit": None, "tokenizer": None}
                for s, entry in replay}
    sub = sub_config(cfg, recipe=recipe, teacher=None, teachers=teachers or None, pipeline=None, divergence=None,
                     regime=None, scratch_baseline=False, ckpt_path=None, student_sft=None,
                     student_init=str(start) if start is not None else None, logger={},
                     **{"trainer.max_epochs": int(stage.get("epochs", p.get("epochs", 1)))})
    with open_dict(sub):
        sub.data.train_skills = skills
        sub.data.routes = routes or None
        sub.paths.output_dir = str(root)
    return sub


def run_stage(cache: Cache, sub: DictConfig, name: str) -> tuple[Path, dict[str, Any]]:
    """Train one stage once (cached under ``stages/``); its weights and test metrics."""
    entry = cached_run(cache, "stages", f"{name}-{run_key(sub)}", sub, what=f"stage {name}")
    return entry, cache.meta("stages", entry.name)


def _skills(cfg: DictConfig) -> list[str]:
    return list(dict.fromkeys(str(k) for stage in cfg.pipeline.stages for k in stage.skills))


def run_pipeline(cfg: DictConfig) -> dict[str, Any]:
    """Run every stage of ``cfg.pipeline`` in order (and without distillation too, with
    ``compare``); print and return each skill's exact match after each stage."""
    p = cfg.pipeline
    stages = list(p.stages or [])
    if not stages:
        raise ConfigError("pipeline.stages is empty; give at least one stage with a name and skills")
    names = [str(s.name) for s in stages]
    if len(set(names)) != len(names):
        raise ConfigError(f"pipeline stage names must differ (got {names}); they name the teachers of later stages")
    started = time.perf_counter()
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache = Cache(cfg.paths.cache_dir)
    replay = str(p.recipe.get("replay", "distill"))
    variants = [(WITH, float(p.lam), replay)]
    if p.lam > 0 and p.get("compare", True):
        variants.append((WITHOUT, 0.0, replay))
    if p.lam > 0 and p.get("control", False) and replay != "sft":
        variants.append((CONTROL, float(p.lam), "sft"))
    for variant, lam, replay_with in variants:  # every stage's settings are checked before the first one trains
        placeholders: list[tuple[DictConfig, Path]] = []
        for stage in stages:
            build(_stage_config(cfg, stage, placeholders, None, lam, out / "stages" / str(stage.name), replay_with),
                  setup=False)
            placeholders.append((stage, out))  # any existing path: nothing is loaded at build time
    table: dict[str, dict[str, dict[str, float]]] = {}
    validation: dict[str, dict[str, dict[str, float]]] = {}
    for variant, lam, replay_with in variants:
        earlier: list[tuple[DictConfig, Path]] = []
        start: Path | None = None
        table[variant], validation[variant] = {}, {}
        for stage in stages:
            sub = _stage_config(cfg, stage, earlier, start, lam, out / "stages" / str(stage.name), replay_with)
            entry, meta = run_stage(cache, sub, str(stage.name))
            scores = {k.split("/")[-1]: v for k, v in meta["metrics"].items() if k.startswith("test/exact_match/")}
            table[variant][str(stage.name)] = scores
            validation[variant][str(stage.name)] = {k: float(v) for k, v in (meta.get("validation") or {}).items()}
            earlier.append((stage, entry))
            start = entry
    summary = {"pipeline": OmegaConf.to_container(p, resolve=True), "seed": int(cfg.seed), "table": table,
               "validation": validation, "output_dir": str(out),
               "wall_time_s": round(time.perf_counter() - started, 2)}
    (out / "pipeline.json").write_text(json.dumps(summary, indent=2))
    rewards = format_rewards(validation)
    print("\n" + format_table(table, _skills(cfg)) + (f"\n\n{rewards}" if rewards else "") + f"\n\noutputs: {out}\n",
          flush=True)
    return summary


def format_rewards(validation: dict[str, dict[str, dict[str, float]]]) -> str:
    """The mean reward of each sampling stage at its start and end (``val/stage_reward_start``,
    ``val/stage_reward``) and each routed teacher's KL on its rows, one line per stage."""
    lines = []
    for variant, stages in validation.items():
        for stage, metrics in stages.items():
            parts = []
            if "val/stage_reward" in metrics:
                parts.append(f"reward {metrics['val/stage_reward_start']:.3f} -> {metrics['val/stage_reward']:.3f}")
            parts += [f"KL({k.split('/')[-1]} || student) {v:.3f}" for k, v in metrics.items()
                      if k.startswith("val/teacher_kl/")]
            if parts:
                lines.append(f"{variant}, {stage}: " + ", ".join(parts))
    return "\n".join(lines)


def format_table(table: dict[str, dict[str, dict[str, float]]], skills: list[str]) -> str:
    """Each skill's exact match (%) after each stage, one block per variant."""
    lines = []
    for variant, stages in table.items():
        lines.append(variant)
        lines.append("  " + f"{'after stage':<14}" + "".join(f"{k:>10}" for k in skills))
        for stage, scores in stages.items():
            cells = "".join(f"{100 * scores[k]:>10.1f}" if k in scores else f"{'-':>10}" for k in skills)
            lines.append(f"  {stage:<14}{cells}")
        lines.append("")
    return "\n".join(lines).rstrip()


def load_pipelines(paths: list[str | Path], skipped: list[str] | None = None) -> list[dict[str, Any]]:
    """Every ``pipeline.json`` at or below the given paths, parsed. One that cannot be read
    (bad JSON, no ``table`` of stages: e.g. a run killed while writing it) is left out and
    named in ``skipped`` (``"<path> (<why>)"``), as :func:`kd.evaluation.load_runs` does."""
    found = []
    for p in map(Path, paths):
        for f in [p] if p.is_file() and p.name == "pipeline.json" else sorted(p.rglob("pipeline.json")):
            try:
                summary = json.loads(f.read_text(encoding="utf-8"))
                table = summary.get("table") if isinstance(summary, dict) else None
                ok = isinstance(table, dict) and all(isinstance(v, dict) and all(isinstance(sc, dict) for sc in v.values())
                                                     for v in table.values())
                why = None if ok else "no table of stages and skills"
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                why = f"{type(e).__name__}: {e}"
            if why is None:
                found.append(summary)
            elif skipped is not None:
                skipped.append(f"{f} ({why})")
    return found


def summarize_pipelines(summaries: list[dict[str, Any]]) -> str:
    """Each skill's exact match (%) after each stage, mean ± std over the runs (seeds)."""
    import statistics

    if not summaries:
        return "no pipeline runs found (no pipeline.json under the given paths)"
    seeds = sorted(s.get("seed") for s in summaries)
    skills = list(dict.fromkeys(k for s in summaries for v in s["table"].values() for sc in v.values() for k in sc))
    lines = [f"pipeline summary over {len(summaries)} run(s), seeds {seeds} (exact match %, mean ± std)"]
    for variant, stages in summaries[0]["table"].items():
        lines.append(variant)
        lines.append("  " + f"{'after stage':<14}" + "".join(f"{k:>16}" for k in skills))
        for stage in stages:
            cells = []
            for k in skills:
                values = [100 * s["table"][variant][stage][k] for s in summaries
                          if k in s["table"].get(variant, {}).get(stage, {})]
                spread = f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else ""
                cells.append(f"{statistics.fmean(values):.1f}{spread}" if values else "-")
            lines.append(f"  {stage:<14}" + "".join(f"{c:>16}" for c in cells))
        lines.append("")
    return "\n".join(lines).rstrip()


__all__ = ["run_pipeline", "run_stage", "format_table", "format_rewards", "load_pipelines", "summarize_pipelines",
           "WITH", "WITHOUT", "CONTROL"]
