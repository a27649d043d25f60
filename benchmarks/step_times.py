"""Per-step wall time of a short kd GKD run: where the slow steps come from (issue 27 item 5).

On an H200, kd's GKD rate expected at lmbda (from the median on- and off-policy steps) was
1.05x TRL's, but its wall-clock rate 0.41x: a few steps took seconds. This script runs kd's
side of ``benchmarks/gkd_vs_trl.py`` (the same saved Llama pair, task data and settings,
built through kd's composition root; the same options) and records, for every optimizer
step including the first ones:

* the interval since the previous step ended (what the step costs the loop) and the time
  inside the step (batch start to batch end);
* whether it was on-policy, the decode steps the sampler ran and the tokens it generated,
  and the time spent in generation;
* the loss tokens and the batch's sequence length (shapes that change step to step);
* Python's garbage-collector time inside the step (``gc.callbacks``);
* dynamo graphs compiled during the step (``torch._dynamo.utils.counters``: the fused loss's
  compiled path), and on CUDA the allocator's deltas (``torch.cuda.memory_stats``: device
  mallocs, allocation retries, which flush the cache and synchronise).

It prints one line per step and the distribution of the intervals (median, p90, max, the
share of the run's time in its slowest 5% of steps) over all steps and split by on- and
off-policy steps, with and without the first ``--warmup`` steps.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/step_times.py --threads 1 --steps 60 --warmup 3
    python benchmarks/step_times.py --device cuda --bf16 --batch-size 64 --hidden 512 --layers 4 \\
        --teacher-hidden 1024 --teacher-layers 8 --max-new-tokens 64 --steps 100 --warmup 3
"""

from __future__ import annotations

import gc
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gkd_vs_trl as G  # noqa: E402  (the comparison's options, setup and kd config)


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def distribution(intervals: list[float]) -> dict[str, Any]:
    """Median, p90, max (ms) and the share of the total time in the slowest 5% of the steps."""
    if not intervals:
        return {"steps": 0}
    worst = sorted(intervals, reverse=True)[:max(1, round(0.05 * len(intervals)))]
    return {"steps": len(intervals), "median_ms": 1000 * _quantile(intervals, 0.5),
            "p90_ms": 1000 * _quantile(intervals, 0.9), "max_ms": 1000 * max(intervals),
            "total_s": sum(intervals), "slowest_5pct_share": sum(worst) / sum(intervals)}


def record(args: Any, workdir: Path) -> list[dict[str, Any]]:
    import lightning as L
    import torch
    import torch._dynamo.utils as dynamo_utils

    from kd.build import build
    from kd.subruns import prepare

    cuda = args.device == "cuda"
    run = build(G.kd_config(args, workdir))
    prepare(run)
    regime = run.recipe.regime
    steps: list[dict[str, Any]] = []
    gen = {"s": 0.0, "decode_steps": 0, "tokens": 0}
    gc_time = {"s": 0.0, "start": 0.0}

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            gc_time["start"] = time.perf_counter()
        else:
            gc_time["s"] += time.perf_counter() - gc_time["start"]

    gc.callbacks.append(on_gc)
    rollouts = getattr(regime, "rollouts", None)
    if rollouts is not None:
        generate = rollouts.generate

        def timed_generate(*a: Any, **kw: Any) -> Any:
            start = time.perf_counter()
            out = generate(*a, **kw)
            if cuda:
                torch.cuda.synchronize()
            gen["s"] += time.perf_counter() - start
            gen["decode_steps"] += int(out.response_mask.shape[1])
            gen["tokens"] += int(out.response_mask.sum())
            return out

        rollouts.generate = timed_generate

    def now() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def alloc() -> dict[str, int]:
        if not cuda:
            return {}
        stats = torch.cuda.memory_stats()
        return {k: int(stats.get(k, 0)) for k in ("num_device_alloc", "num_device_free", "num_alloc_retries")}

    class Clock(L.Callback):
        last_end: float | None = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.before = (regime.on_policy_batches, dict(gen), gc_time["s"],
                           dynamo_utils.counters["stats"]["unique_graphs"], alloc())
            self.begun = now()
            if self.last_end is None:
                self.last_end = self.begun

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            end = now()
            on_before, gen_before, gc_before, graphs_before, alloc_before = self.before
            after = alloc()
            steps.append({
                "step": len(steps) + 1, "interval_s": end - self.last_end, "in_step_s": end - self.begun,
                "on_policy": regime.on_policy_batches > on_before,
                "decode_steps": gen["decode_steps"] - gen_before["decode_steps"],
                "generated_tokens": gen["tokens"] - gen_before["tokens"], "generation_s": gen["s"] - gen_before["s"],
                "loss_tokens": int(pl_module._num_targets), "gc_s": gc_time["s"] - gc_before,
                "graphs_compiled": dynamo_utils.counters["stats"]["unique_graphs"] - graphs_before,
                **{k: after[k] - alloc_before.get(k, 0) for k in after},
            })
            self.last_end = end

    run.trainer.callbacks.append(Clock())
    if cuda:
        run.recipe.to("cuda")
    run.fit()
    gc.callbacks.remove(on_gc)
    return steps


def report(steps: list[dict[str, Any]], warmup: int) -> str:
    lines = [f"{'step':>4} {'policy':>6} {'interval ms':>12} {'in-step ms':>11} {'gen ms':>8} {'decode':>6} "
             f"{'gen tok':>7} {'loss tok':>8} {'gc ms':>6} {'graphs':>6} {'mallocs':>7} {'retries':>7}"]
    for s in steps:
        lines.append(f"{s['step']:>4} {'on' if s['on_policy'] else 'off':>6} {1000 * s['interval_s']:>12.1f} "
                     f"{1000 * s['in_step_s']:>11.1f} {1000 * s['generation_s']:>8.1f} {s['decode_steps']:>6} "
                     f"{s['generated_tokens']:>7} {s['loss_tokens']:>8} {1000 * s['gc_s']:>6.1f} "
                     f"{s['graphs_compiled']:>6} {s.get('num_device_alloc', '-'):>7} "
                     f"{s.get('num_alloc_retries', '-'):>7}")
    lines.append("")
    lines.append(f"{'steps':<28}{'n':>4}{'median ms':>11}{'p90 ms':>9}{'max ms':>9}{'total s':>9}"
                 f"{'slowest 5% share':>18}")
    for label, chosen in (("all", steps), (f"after {warmup} warm-up", steps[warmup:])):
        for kind, keep in (("", lambda s: True), (" on-policy", lambda s: s["on_policy"]),
                           (" off-policy", lambda s: not s["on_policy"])):
            d = distribution([s["interval_s"] for s in chosen if keep(s)])
            if d["steps"]:
                lines.append(f"{label + kind:<28}{d['steps']:>4}{d['median_ms']:>11.1f}{d['p90_ms']:>9.1f}"
                             f"{d['max_ms']:>9.1f}{d['total_s']:>9.2f}{d['slowest_5pct_share']:>18.3f}")
    on = [s for s in steps[warmup:] if s["on_policy"]]
    if on:
        gen = sum(s["generation_s"] for s in on) / sum(s["interval_s"] for s in on)
        full = sum(s["decode_steps"] == max(x["decode_steps"] for x in on) for s in on)
        lines.append(f"\non-policy steps after the warm-up: {gen:.0%} of their time in generation; "
                     f"{full}/{len(on)} ran the longest decode ({max(s['decode_steps'] for s in on)} steps)")
    return "\n".join(lines)


def main() -> None:
    args = G.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="step_times-") as tmp:
        workdir = Path(args.workdir).resolve() if args.workdir else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        print(f"building the task, tokenizer and models in {workdir} ...", flush=True)
        G.prepare(args, workdir)
        # every step is recorded: run warmup + steps in all, the first --warmup shown apart
        steps = record(args, workdir)
    print(report(steps, args.warmup))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "steps": steps}, indent=1))


if __name__ == "__main__":
    main()
