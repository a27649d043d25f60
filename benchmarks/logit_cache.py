"""Training from a teacher logit cache (``regime=teacher_logits``) against the live teacher.

The same run, ``experiment=task_word_kd`` (word-level KD of the embedded task's student
from the task_llama teacher), trained ``--epochs`` epochs per seed in two variants:

* ``live``: the offline regime, the teacher runs on every training batch;
* ``cache``: ``regime=teacher_logits`` (top ``--top-k`` ids + fp16 log-probs per response
  position), the teacher never runs in a training step.

Every run is its own process (this script re-invoking itself with ``--child``), one at a
time, variants interleaved per seed. A first child trains the teacher (cached in the kd
cache, shared by all runs), so no timed run includes it. Reported per variant, mean and
sample standard deviation over the seeds:

* ``steps_s``: seconds inside training steps (Lightning's ``on_train_batch_start`` to
  ``on_train_batch_end``: the regime's batch, both forwards, backward, optimizer step);
  the speed-up target (>= 2x) is on this figure;
* ``fit_s``: the whole ``trainer.fit`` (validation with its greedy generations and the
  live teacher's KL included, identical in both variants), minus the one-time cache build;
* ``build_s``: the cache build (teacher pass over the training split), reported once;
* bytes per cached token (target <= 300 at k = 64);
* test exact match and token accuracy of the student (quality: the cache should be
  within the seed spread of the live teacher).

    python benchmarks/logit_cache.py [--epochs 5] [--seeds 0 1 2] [--top-k 64]
        [--recipe word_kd] [--cache-dir DIR] [--set data.source.train_size=2000 ...]

Absolute seconds are noisy on a shared CPU; the ratio of the two variants is the figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- one run (child process)


def _compose(overrides: list[str], output_dir: str, cache_dir: str):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from kd.cli import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = output_dir
        cfg.paths.cache_dir = cache_dir
    return cfg


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """Build, prepare and train one variant; return its timings and test metrics."""
    import lightning as L
    import torch

    from kd.build import build
    from kd.subruns import prepare

    torch.set_num_threads(spec["threads"])
    with tempfile.TemporaryDirectory() as out:
        cfg = _compose(spec["overrides"], out, spec["cache_dir"])
        run = build(cfg)
        prepare(run)  # the teacher's weights (trained once and cached by the warm-up child)
        if spec["variant"] == "teacher":
            return {"variant": "teacher"}

        class Timer(L.Callback):
            def __init__(self) -> None:
                self.steps_s, self.started, self.fit = 0.0, 0.0, [0.0, 0.0]

            def on_fit_start(self, trainer, module) -> None:
                self.fit[0] = time.perf_counter()

            def on_fit_end(self, trainer, module) -> None:
                self.fit[1] = time.perf_counter()

            def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
                self.started = time.perf_counter()

            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
                self.steps_s += time.perf_counter() - self.started

        timer = Timer()
        run.trainer.callbacks.append(timer)
        metrics = run.fit()
        regime = run.recipe.regime
        built = bool(getattr(regime, "built", False))
        build_s = float(getattr(regime, "prepare_seconds", 0.0)) if built else 0.0
        return {"variant": spec["variant"], "seed": spec["seed"], "steps_s": timer.steps_s,
                "fit_s": timer.fit[1] - timer.fit[0] - build_s, "build_s": build_s if built else None,
                "bytes_per_token": regime.bytes_per_token if hasattr(regime, "bytes_per_token") else None,
                "steps": int(run.trainer.global_step), "exact_match": metrics.get("test/exact_match"),
                "acc": metrics.get("test/acc")}


# ----------------------------------------------------------------------------- the comparison


def _spawn(spec: dict[str, Any]) -> dict[str, Any]:
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-8000:])
        raise SystemExit(f"the {spec['variant']} run (seed {spec.get('seed')}) failed")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _stat(values: list[float | None], scale: float = 1.0, digits: int = 1) -> str:
    values = [v * scale for v in values if v is not None]
    if not values:
        return "-"
    mean = statistics.fmean(values)
    spread = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
    return f"{mean:.{digits}f}{spread}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5, help="training epochs of every run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (each runs both variants)")
    parser.add_argument("--top-k", type=int, default=64, help="regime.top_k of the cached variant")
    parser.add_argument("--recipe", default="word_kd", help="a logit recipe (word_kd, hinton, gkd)")
    parser.add_argument("--cache-dir", default=os.environ.get("KD_CACHE_DIR", str(Path.home() / ".cache" / "kd")),
                        help="the kd cache (the trained teacher and the logit cache are reused from it)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads of every run")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="more overrides for every run (e.g. data.source.train_size=2000)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return

    common = ["experiment=task_word_kd", f"recipe={args.recipe}", f"trainer.max_epochs={args.epochs}",
              "logger=none", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
              "scratch_baseline=false", *args.set]
    variants = {"live": ["regime=offline"], "cache": ["regime=teacher_logits", f"regime.top_k={args.top_k}"]}

    def spec(variant: str, seed: int) -> dict[str, Any]:
        extra = variants.get(variant, [])
        return {"variant": variant, "seed": seed, "threads": args.threads, "cache_dir": args.cache_dir,
                "overrides": [*common, *extra, f"seed={seed}"]}

    print(f"overrides: {' '.join(common)}", flush=True)
    started = time.perf_counter()
    _spawn(spec("teacher", args.seeds[0]))
    print(f"teacher ready ({time.perf_counter() - started:.0f} s)", flush=True)
    results: dict[str, list[dict[str, Any]]] = {"live": [], "cache": []}
    for seed in args.seeds:
        for variant in ("live", "cache"):
            result = _spawn(spec(variant, seed))
            results[variant].append(result)
            print(f"  seed {seed} {variant:<5} steps {result['steps_s']:.1f} s, fit {result['fit_s']:.1f} s, "
                  f"exact match {result['exact_match']}", flush=True)

    rows = [("variant", "steps_s", "fit_s", "build_s", "bytes/token", "exact_match %", "token acc %")]
    for variant, runs in results.items():
        rows.append((variant, _stat([r["steps_s"] for r in runs]), _stat([r["fit_s"] for r in runs]),
                     _stat([r["build_s"] for r in runs]), _stat([r["bytes_per_token"] for r in runs]),
                     _stat([r["exact_match"] for r in runs], 100), _stat([r["acc"] for r in runs], 100)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print()
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
    live_steps = statistics.fmean(r["steps_s"] for r in results["live"])
    cache_steps = statistics.fmean(r["steps_s"] for r in results["cache"])
    live_fit = statistics.fmean(r["fit_s"] for r in results["live"])
    cache_fit = statistics.fmean(r["fit_s"] for r in results["cache"])
    bytes_per_token = results["cache"][0]["bytes_per_token"]
    print(f"\nspeed-up with the cache: training steps {live_steps / cache_steps:.2f}x (target >= 2x), whole fit "
          f"{live_fit / cache_fit:.2f}x; {bytes_per_token:.1f} bytes per token (target <= 300 at k = 64); "
          f"{len(args.seeds)} seed(s), {args.epochs} epoch(s), recipe={args.recipe}")


if __name__ == "__main__":
    main()
