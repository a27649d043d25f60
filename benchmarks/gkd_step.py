"""One on-policy GKD step: kd's sampler, kd on vLLM with a served teacher, TRL; and the overlap.

What is compared
----------------
Every step is on-policy (the student samples the batch's responses, the teacher scores them,
the JSD is minimised): GKD with lmbda = 1. The same teacher/student pair, the same prompts,
batch size and GKD settings (JSD beta 0.5, sampling temperature 0.9, loss temperature 1, mean
over the response tokens, AdamW, clipping 1.0, fp32 on CPU) go through these variants, each in
its own process:

* ``kd``: kd's run (``recipe=gkd regime=on_policy``, as :mod:`gkd_vs_trl` builds it: Hydra
  ``compose``, :func:`kd.build.build`, :func:`kd.subruns.prepare`, ``Run.fit``) with kd's own
  sampler (``regime.engine=kd``) and the teacher in the training process (``teacher=hf``);
* ``kd-vllm``: the same with vLLM rollouts (``regime.engine=vllm``, :mod:`kd.rollouts`) and
  the in-process teacher (not run by default: it separates the two changes below);
* ``kd-vllm-served``: vLLM rollouts and the teacher behind vLLM's server, launched by kd
  (``teacher=served teacher.launch=<teacher dir>``, :mod:`kd.served`);
* ``kd-vllm-served-overlap``: the same with ``regime.overlap=true`` (one step off policy: the
  next batch is sampled in a background thread while this one trains; :class:`kd.regimes.OnPolicy`);
* ``trl``: TRL's ``DistillationTrainer`` with vLLM (``use_vllm=True``, colocated) when TRL has
  it and vLLM imports beside TRL, else TRL's ``GKDTrainer`` (``lmbda=1``, transformers'
  ``generate``), the same settings as in :mod:`gkd_vs_trl`; the report names which ran.

TRL is never a dependency of kd: give the Python of a separate environment that has TRL with
``--trl-python`` (the kd variants run under this script's Python, which needs kd and, for
the vLLM variants, vLLM).

The pair: a Llama teacher (``--hidden`` x ``--layers``, random weights, seed 0, the embedded
task's byte-level BPE tokenizer, as :mod:`gkd_vs_trl` builds them) and its depth-pruned
student (``--student-layers``, every other layer of the teacher, its embeddings and head:
:func:`kd.models.shallower_copy` + :func:`kd.models.init_from_teacher`), both saved with
``save_pretrained``. With ``--pretrained smollm2-135m-instruct`` (after ``kd-pretrained
smollm2-135m-instruct``) the teacher is SmolLM2-135M-Instruct and the student its pruned copy;
the data are the task's prompts in its tokenizer.

Reported per variant and batch size: on-policy optimizer steps per second (the median step
interval over the ``--steps`` timed steps after ``--warmup``; wall-clock rate beside it) and
peak memory: the training process's peak RSS and, for a served teacher, the server's
processes' peak RSS added (``VmHWM`` of each process in the server's process group, summed:
an upper bound of their joint peak). With ``--device cuda``: ``torch.cuda.max_memory_allocated``
of the training process (vLLM's own pools and the server's GPU memory are not in it: see
``nvidia-smi``). Ratios are against TRL, and the overlap's gain is overlap/no-overlap.

    python benchmarks/gkd_step.py --trl-python /path/to/trl-env/bin/python [--batches 8 32]
    python benchmarks/gkd_step.py --variants kd kd-vllm-served kd-vllm-served-overlap   # no TRL

On a GPU (docs/rollouts.md, "One on-policy GKD step"):

    kd-pretrained smollm2-135m-instruct
    python benchmarks/gkd_step.py --pretrained smollm2-135m-instruct --student-layers 15 --device cuda \\
        --bf16 --batches 32 128 --max-new-tokens 128 --steps 20 --trl-python <trl env>/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gkd_vs_trl as base  # noqa: E402  (the shared setup and the step clock)

RESULT = "GKD_STEP_RESULT "
KD_VARIANTS = ("kd", "kd-vllm", "kd-vllm-served", "kd-vllm-served-overlap")
VARIANTS = (*KD_VARIANTS, "trl")
DEFAULT = ("kd", "kd-vllm-served", "kd-vllm-served-overlap", "trl")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(DEFAULT))
    p.add_argument("--batches", type=int, nargs="+", default=[8, 32], help="batch sizes (a process each)")
    p.add_argument("--steps", type=int, default=10, help="timed on-policy optimizer steps (after the warm-up)")
    p.add_argument("--warmup", type=int, default=2, help="optimizer steps before timing starts")
    p.add_argument("--max-new-tokens", type=int, default=16, help="response tokens sampled per step (at most)")
    p.add_argument("--max-length", type=int, default=64, help="longest prompt + response of the data, in tokens")
    p.add_argument("--hidden", type=int, default=256, help="hidden size of the teacher and its pruned student")
    p.add_argument("--layers", type=int, default=4, help="teacher layers")
    p.add_argument("--student-layers", type=int, default=2, help="student layers (the teacher depth-pruned)")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--vocab", type=int, default=512, help="largest vocabulary of the task tokenizer")
    p.add_argument("--train-size", type=int, default=2000, help="training examples of the task")
    p.add_argument("--pretrained", default=None, help="a kd-pretrained entry as the teacher (e.g. smollm2-135m-instruct)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each variant (vLLM's CPU build too)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 (mixed precision in training, the engines in bf16)")
    p.add_argument("--trl-python", default=None, help="the Python of an environment with TRL (default: this one)")
    p.add_argument("--trl-vllm", choices=["auto", "on", "off"], default="auto",
                   help="TRL's DistillationTrainer with vLLM: when it imports (auto), required (on), never (off)")
    p.add_argument("--trl-vllm-path", default=None,
                   help="a site-packages directory with vLLM, appended to the TRL side's import path (after TRL's "
                        "own packages): vLLM from another environment")
    p.add_argument("--kv-cache-gib", type=float, default=1.0, help="the vLLM CPU build's KV cache per engine")
    p.add_argument("--workdir", default=None, help="keep the models and data here (default: a temp dir)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--variant", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if min(args.steps, args.max_new_tokens, args.student_layers, *args.batches) < 1 or args.warmup < 1:
        p.error("--steps, --max-new-tokens, --student-layers, --batches and --warmup must be >= 1")
    # what gkd_vs_trl's setup and TRL side read
    args.teacher_hidden, args.teacher_layers, args.min_frequency = args.hidden, args.layers, max(2, args.train_size // 50)
    args.lmbda, args.beta, args.temperature, args.seq_kd, args.lr, args.seed = 1.0, 0.5, 0.9, False, 1e-4, 0
    return args


# ----------------------------------------------------------------------------- the pair


def prepare(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """The task data and tokenizer, the teacher and its depth-pruned student, in ``workdir``."""
    import torch
    from transformers import AutoModelForCausalLM

    from kd.models import init_from_teacher, shallower_copy

    if args.pretrained:
        from kd.pretrained import model_dir

        source = model_dir(args.pretrained)
        if not (source / "config.json").is_file():
            sys.exit(f"--pretrained {args.pretrained} is not converted yet; run kd-pretrained {args.pretrained}")
        teacher = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        setup = _pretrained_data(args, workdir, source)
        teacher.save_pretrained(workdir / "teacher")
    else:
        setup = base.prepare(args, workdir)  # tokenizer, teacher (and a student we replace), TRL's data
        teacher = AutoModelForCausalLM.from_pretrained(workdir / "teacher", dtype=torch.float32)
    torch.manual_seed(0)
    student = shallower_copy(teacher, args.student_layers)
    init_from_teacher(student, teacher, "even")
    student.save_pretrained(workdir / "student")
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(workdir / "teacher").save_pretrained(workdir / "student")
    setup["params"] = {"teacher": sum(p.numel() for p in teacher.parameters()),
                       "student": sum(p.numel() for p in student.parameters())}
    return setup


def _pretrained_data(args: argparse.Namespace, workdir: Path, source: Path) -> dict[str, Any]:
    """The task's examples as TRL's chat lines, the pretrained model's tokenizer beside the teacher."""
    from transformers import AutoTokenizer

    from kd.data.sources import TaskSource

    tok = AutoTokenizer.from_pretrained(source)
    tok.save_pretrained(workdir / "teacher")
    train = TaskSource(train_size=args.train_size, val_size=8, test_size=8, seed=0, skills=base.SKILLS).load()["train"]
    with open(workdir / "messages.jsonl", "w") as f:
        for ex in train:
            messages = [{"role": "user", "content": ex.prompt}, {"role": "assistant", "content": ex.response}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return {"vocab": len(tok), "examples": len(train)}


# ----------------------------------------------------------------------------- the kd variants


def _group_peak_rss_mb(pgid: int) -> float:
    """Sum of the peak RSS (VmHWM) of the processes in process group ``pgid``, in MB."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) / 1024
        except (OSError, ValueError, IndexError):
            continue
    return total


def run_kd(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    import lightning as L
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from kd.build import build
    from kd.config import CONF_DIR
    from kd.served import live_servers, stop_servers
    from kd.subruns import prepare as prepare_run

    cuda, variant, batch = args.device == "cuda", args.variant, args.batch_size
    vllm, served = variant != "kd", "served" in variant
    dtype = "bfloat16" if args.bf16 else "float32"
    teacher = (["teacher=served", f"teacher.launch='{workdir / 'teacher'}'", "teacher.top_k=20",
                f"teacher.server.dtype={dtype}", f"teacher.server.kv_cache_gib={max(1, round(args.kv_cache_gib))}",
                "teacher.server.memory=0.3"] if served
               else ["teacher=hf", f"teacher.name_or_path='{workdir / 'teacher'}'"])
    overrides = [
        "recipe=gkd", "regime=on_policy", "divergence=jsd", "data=task", "student=hf", *teacher,
        "logger=none", "callbacks=none", f"student.name_or_path='{workdir / 'student'}'",
        f"data.tokenizer='{workdir / 'student'}'",
        f"data.source.train_size={args.train_size}", "data.source.val_size=8", "data.source.test_size=8",
        "data.source.seed=0", f"data.source.skills=[{','.join(base.SKILLS)}]",
        f"data.batch_size={batch}", f"data.max_length={args.max_length}",
        f"data.max_new_tokens={args.max_new_tokens}", "data.generation_eval_size=0", "data.num_workers=0",
        f"regime.engine={'vllm' if vllm else 'kd'}", f"regime.overlap={str('overlap' in variant).lower()}",
        f"regime.vllm.cpu_kv_cache_gib={args.kv_cache_gib}", "regime.vllm.memory=0.3",
        *(["regime.vllm.dtype=bfloat16"] if args.bf16 else []),
        f"regime.sampling.temperature={args.temperature}", "regime.sampling.top_k=0", "regime.sampling.top_p=1.0",
        f"regime.sampling.max_new_tokens={args.max_new_tokens}",
        f"divergence.beta={args.beta}", "divergence.reduction=mean", "recipe.temperature=1.0",
        "recipe.student_dropout=false",
        f"optimizer.lr={args.lr}", "optimizer.weight_decay=0.0", "scheduler=null",
        f"seed={args.seed}", "scratch_baseline=false",
        f"trainer.max_steps={args.warmup + args.steps}", "trainer.max_epochs=-1",
        "trainer.limit_val_batches=0", "trainer.limit_test_batches=0", "trainer.num_sanity_val_steps=0",
        "trainer.gradient_clip_val=1.0", "trainer.accumulate_grad_batches=1",
        "trainer.enable_progress_bar=false", "+trainer.enable_checkpointing=false",
        f"trainer.accelerator={'gpu' if cuda else 'cpu'}",
        f"trainer.precision={'bf16-mixed' if args.bf16 else '32-true'}",
        f"paths.output_dir='{workdir / ('kd_run_' + variant)}'", f"paths.cache_dir='{workdir / 'kd_cache'}'",
    ]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)

    before = live_servers()
    bind = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    try:
        if served and not cuda and args.threads == 1:  # the server (started by build) on core 1, the engine on 0
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "1"
        run = build(cfg)
        if bind is not None:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind
        prepare_run(run)
        clock, memory = base.StepClock(args.warmup, cuda), base.Memory(cuda)

        class Timer(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                clock.start()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                clock.end(True, float(pl_module._num_targets))

        run.trainer.callbacks.append(Timer())
        if cuda:
            run.recipe.to("cuda")
        memory.start()
        run.fit()
        result = {"optimizer_steps": int(run.trainer.global_step), "threads": torch.get_num_threads(),
                  **clock.summary(1.0), **memory.result()}
        servers = live_servers() - before
        result["server_peak_rss_mb"] = sum(_group_peak_rss_mb(s.process.pid) for s in servers if s.process)
        result["peak_with_server_mb"] = result["peak_rss_mb" if cuda else "peak_mb"] + result["server_peak_rss_mb"]
        return result
    finally:
        stop_servers(keep=before)


# ----------------------------------------------------------------------------- TRL


def run_trl(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """TRL's DistillationTrainer with vLLM when it runs here (``--trl-vllm``), else its GKDTrainer."""
    args.batch_size = args.batch_size or args.batches[0]
    reason = None
    if args.trl_vllm != "off":
        try:
            return run_trl_distillation(args, workdir)
        except _Unavailable as e:
            if args.trl_vllm == "on":
                raise
            reason = str(e)
    result = base.run_trl(args, workdir)
    result["trl_trainer"] = "GKDTrainer (transformers generate)"
    result["trl_note"] = reason
    return result


class _Unavailable(RuntimeError):
    pass


def run_trl_distillation(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    import importlib.util

    import torch
    import trl

    try:
        from trl import DistillationConfig, DistillationTrainer
    except ImportError:
        try:
            from trl.experimental.distillation import DistillationConfig, DistillationTrainer
        except ImportError:
            raise _Unavailable(f"TRL {trl.__version__} has no DistillationTrainer") from None
    if importlib.util.find_spec("vllm") is None:
        raise _Unavailable(f"TRL {trl.__version__}'s DistillationTrainer is there but vLLM is not installed beside it")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    cuda = args.device == "cuda"
    tok = AutoTokenizer.from_pretrained(workdir / "student")
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    student = AutoModelForCausalLM.from_pretrained(workdir / "student", dtype=dtype)
    teacher = AutoModelForCausalLM.from_pretrained(workdir / "teacher", dtype=dtype)
    with open(workdir / "messages.jsonl") as f:
        data = Dataset.from_list([{"prompt": json.loads(line)["messages"][:1]} for line in f])
    fields = set(DistillationConfig.__dataclass_fields__)
    settings = dict(
        output_dir=str(workdir / "trl_run"), lmbda=1.0, beta=args.beta, temperature=args.temperature,
        max_new_tokens=args.max_new_tokens, max_completion_length=args.max_new_tokens, max_length=args.max_length,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
        max_steps=args.warmup + args.steps, learning_rate=args.lr, weight_decay=0.0, optim="adamw_torch",
        lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, gradient_checkpointing=False,
        bf16=args.bf16, fp16=False, use_cpu=not cuda, seed=args.seed, data_seed=args.seed,
        dataloader_num_workers=0, report_to="none", save_strategy="no", eval_strategy="no",
        logging_strategy="no", disable_tqdm=True, use_vllm=True, vllm_mode="colocate",
        vllm_gpu_memory_utilization=0.3, disable_dropout=True, top_k=0, top_p=1.0,
    )
    config = DistillationConfig(**{k: v for k, v in settings.items() if k in fields})
    clock, memory = base.StepClock(args.warmup, cuda), base.Memory(cuda)

    class Timer(TrainerCallback):
        def on_step_begin(self, targs, state, control, **kwargs):
            clock.start()

        def on_step_end(self, targs, state, control, **kwargs):
            clock.end(True, 0.0)

    try:
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config, train_dataset=data,
                                      processing_class=tok, callbacks=[Timer()])
    except Exception as e:  # noqa: BLE001 - vLLM beside TRL on this machine: record why not
        raise _Unavailable(f"TRL {trl.__version__}'s DistillationTrainer with vLLM did not start: "
                           f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:200] if str(e).strip() else ''}") from e
    memory.start()
    try:
        trainer.train()
    except Exception as e:  # noqa: BLE001 - e.g. its first weight sync into an engine of another vLLM version
        if clock.done:
            raise
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        raise _Unavailable(f"TRL {trl.__version__}'s DistillationTrainer with vLLM failed before its first step: "
                           f"{type(e).__name__}: {(lines or [''])[-1][:200]}") from e
    return {"optimizer_steps": int(trainer.state.global_step), "threads": torch.get_num_threads(),
            "trl_version": trl.__version__, "trl_trainer": "DistillationTrainer (vLLM colocate)",
            **clock.summary(1.0), **memory.result()}


def child(args: argparse.Namespace) -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    started = time.perf_counter()
    import torch

    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    if args.variant == "trl":
        if args.trl_vllm_path:  # and for vLLM's own subprocesses (its model inspection)
            sys.path.append(args.trl_vllm_path)
            os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"),
                                                                  args.trl_vllm_path) if p)
        result = run_trl(args, workdir)
    else:
        result = run_kd(args, workdir)
    result["process_s"] = time.perf_counter() - started
    result["load_avg_1min"] = os.getloadavg()[0]
    print(RESULT + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- the parent


def run_child(args: argparse.Namespace, variant: str, batch: int, workdir: Path) -> dict[str, Any] | None:
    python = args.trl_python if variant == "trl" and args.trl_python else sys.executable
    repo = str(Path(__file__).resolve().parent.parent)
    cmd = [python, str(Path(__file__).resolve()), *sys.argv[1:], "--variant", variant, "--batch-size", str(batch),
           "--workdir", str(workdir)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "VLLM_CPU_OMP_THREADS_BIND": os.environ.get(
        "VLLM_CPU_OMP_THREADS_BIND", "0" if args.threads == 1 else f"0-{args.threads - 1}")}
    if variant != "trl":
        env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH")) if p)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    found = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode != 0 or not found:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        print(f"{variant} at batch {batch} failed (exit code {proc.returncode}):\n{tail}", file=sys.stderr)
        return {"failed": tail.splitlines()[-1] if tail else f"exit code {proc.returncode}"}
    return json.loads(found[-1][len(RESULT):])


def _rate(r: dict[str, Any]) -> float | None:
    return r.get("steps_per_s_at_lmbda") or r.get("steps_per_s")


def _mem(r: dict[str, Any]) -> float | None:
    return r.get("peak_with_server_mb") or r.get("peak_mb")


def report(args: argparse.Namespace, setup: dict[str, Any], results: dict[str, dict[int, dict[str, Any]]]) -> str:
    mem = "CUDA allocated" if args.device == "cuda" else "RSS"
    lines = [f"{'variant':<24}{'batch':>6}{'steps/s':>9}{'wall st/s':>10}{'on-pol ms':>10}"
             f"{'peak ' + mem + ' MB':>17}{'+server MB':>11}{'steps/s vs TRL':>15}{'memory vs TRL':>14}"]
    for variant, by_batch in results.items():
        for batch, r in by_batch.items():
            if "failed" in r:
                lines.append(f"{variant:<24}{batch:>6}  failed: {r['failed'][:120]}")
                continue
            trl = results.get("trl", {}).get(batch, {})
            rate, wall, ms = _rate(r), r.get("steps_per_s"), r.get("on_policy_step_ms")
            peak, total = r.get("peak_mb"), _mem(r)
            vs = base._ratio(rate, _rate(trl)) if variant != "trl" else ""
            mvs = base._ratio(total, _mem(trl)) if variant != "trl" else ""
            server = r.get("server_peak_rss_mb")
            lines.append(f"{variant:<24}{batch:>6}{base._fmt(rate):>9}{base._fmt(wall):>10}{base._fmt(ms, 0):>10}"
                         f"{base._fmt(peak, 0):>17}{(base._fmt(server, 0) if server else '-'):>11}{vs:>15}{mvs:>14}")
    plain, overlap = results.get("kd-vllm-served", {}), results.get("kd-vllm-served-overlap", {})
    for batch in args.batches:
        a, b = _rate(plain.get(batch, {})), _rate(overlap.get(batch, {}))
        if a and b:
            lines.append(f"overlap (one step off policy) at batch {batch}: {b:.2f} vs {a:.2f} steps/s, "
                         f"{b / a:.2f}x")
    trl = next((r for r in results.get("trl", {}).values() if "failed" not in r), {})
    lines += ["", f"TRL: {trl.get('trl_trainer', 'n/a')} {trl.get('trl_version', '')}"
              + (f" ({trl['trl_note']})" if trl.get("trl_note") else ""),
              f"settings: device={args.device} {'bf16' if args.bf16 else 'fp32'} lmbda=1 (every step on-policy) "
              f"beta={args.beta} sampling T={args.temperature} max_new_tokens={args.max_new_tokens} "
              f"max_length={args.max_length} threads={args.threads} warm-up {args.warmup} + {args.steps} timed steps; "
              "steps/s = 1 / median step interval",
              f"pair: teacher {setup['params']['teacher'] / 1e6:.2f}M params "
              f"({args.pretrained or f'random Llama hidden {args.hidden} x {args.layers} layers'}), student "
              f"{setup['params']['student'] / 1e6:.2f}M ({args.student_layers} layers, depth-pruned from the "
              f"teacher), vocab {setup['vocab']}; load (1-min) at the ends: "
              + ", ".join(f"{v}/{b} {r.get('load_avg_1min', 0):.1f}" for v, rs in results.items()
                          for b, r in rs.items() if "failed" not in r)]
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    if args.variant:
        child(args)
        return
    tmp = None
    if args.workdir:
        workdir = Path(args.workdir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="gkd_step-")
        workdir = Path(tmp.name)
    try:
        print(f"building the pair and the data in {workdir} ...", flush=True)
        args.batch_size = args.batches[0]
        setup = prepare(args, workdir)
        results: dict[str, dict[int, dict[str, Any]]] = {}
        for batch in args.batches:
            for variant in args.variants:
                print(f"running {variant} at batch {batch} ...", flush=True)
                results.setdefault(variant, {})[batch] = run_child(args, variant, batch, workdir)
        print()
        print(report(args, setup, results))
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "setup": setup, "results": results}, indent=2))
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
