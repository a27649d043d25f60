"""GKD training speed and memory: kd's GKD recipe vs TRL's ``GKDTrainer`` on the same setup.

What is compared
----------------
The same teacher/student pair, the same prompts and responses, the same batch size and
the same GKD settings go through

* **kd**: the ``kd`` composition root, exactly as the ``kd`` command builds a run
  (Hydra ``compose("train", overrides=[...])``, :func:`kd.build.build`,
  :func:`kd.subruns.prepare`, :meth:`kd.build.Run.fit`) with ``experiment=gkd_trl``
  (TRL's GKD defaults written as kd config), ``teacher=hf`` and ``student=hf`` loading the
  saved models below, ``data=task`` reading the saved tokenizer;
* **TRL**: ``trl.experimental.gkd.GKDTrainer`` (``trl.GKDTrainer`` in older releases) with
  a ``GKDConfig``, the same models passed in, the same examples as chat ``messages``.

Each side trains ``--warmup`` + ``--steps`` optimizer steps; the report is over the last
``--steps``: optimizer steps per second of wall-clock time (from the end of the last
warm-up step to the end of the last step: everything a training loop does between two
steps counts, data loading and collation included), and peak memory.

Because GKD flips a coin per batch (on-policy with probability lmbda) and an on-policy
step costs a generation, a short run of one side can draw more on-policy steps than the
other. Each side therefore also reports its median step time (the interval between two
step ends) over on-policy and over off-policy steps, and the rate expected at exactly
lmbda, ``1 / (lmbda * median_on + (1 - lmbda) * median_off)`` (at lmbda 0 or 1: the
median step's rate); medians, because on a shared machine a few steps are hit by other
work. The verdict's ratio kd/TRL uses that expected rate when both sides have it (both
kinds of step seen when 0 < lmbda < 1), else the wall-clock rate.
With ``--repeats R`` the sides run R times, alternating (kd, TRL, kd, TRL, ...), and each
side's fastest run (by that rate) is reported: the least disturbed one.

The setup (built once, in a temporary directory, ``--workdir`` to keep it)
---------------------------------------------------------------------------
* the embedded task (:class:`kd.data.sources.TaskSource`: skills upper, reverse, sort, count;
  ``--train-size`` training examples, seed 0) and its byte-level BPE tokenizer, trained
  with kd's own code (``--vocab`` tokens at most) and saved with ``save_pretrained``: its
  chat template renders a user turn as ``"Q: {prompt}\\nA: "`` and an assistant turn as
  ``"{response}<eos>"``, so kd (prompt and response tokenized separately) and TRL's
  ``DataCollatorForChatML`` (the whole conversation, cut at the prompt) get the same ids;
* a Llama teacher (``--teacher-hidden``, ``--teacher-layers``) and a Llama student
  (``--hidden``, ``--layers``), ``--heads`` heads each, random weights
  (:func:`kd.models.tiny_causal_lm`, seed 0; speed does not depend on what they know), both
  with the tokenizer's exact vocabulary (TRL refuses different teacher/student vocabulary
  sizes) and its pad/bos/eos ids, saved with ``save_pretrained`` beside the tokenizer;
* the training examples kd keeps (prompt + response within ``--max-length`` tokens) as
  ``{"messages": [user prompt, assistant response]}`` lines for TRL.

Settings and how each side gets them
------------------------------------
=====================  ==========================================  ==========================================
setting                kd (Hydra overrides)                        TRL (``GKDConfig``)
=====================  ==========================================  ==========================================
student-data fraction  ``regime.lmbda=--lmbda`` (0.5)              ``lmbda``
JSD beta               ``divergence.beta=--beta`` (0.5)            ``beta``
sampling temperature   ``regime.sampling.temperature`` (0.9)       ``temperature`` (sampling only)
loss temperature       ``recipe.temperature=1.0``                  1 (``compute_loss`` never passes one)
top-k / top-p          ``regime.sampling.top_k=0 .top_p=1.0``      ``top_k=0, top_p=1.0`` (fixed by TRL)
max new tokens         ``regime.sampling.max_new_tokens``          ``max_new_tokens``
seq_kd                 ``regime.seq_kd`` (``--seq-kd``)            ``seq_kd``
loss reduction         ``divergence.reduction=mean`` (tokens)      mean over the batch's completion tokens
batch size             ``data.batch_size=--batch-size``            ``per_device_train_batch_size``, no accumulation
max length             ``data.max_length=--max-length``            ``max_length``
optimizer              ``torch.optim.AdamW``, ``--lr``, wd 0       ``optim="adamw_torch"``, ``learning_rate``, wd 0
LR schedule            none (``scheduler=null``)                   ``lr_scheduler_type="constant"``, no warm-up
gradient clipping      ``trainer.gradient_clip_val=1.0``           ``max_grad_norm=1.0`` (TRL's default)
gradient checkpointing none                                        ``gradient_checkpointing=False``
precision              ``trainer.precision=32-true`` / bf16-mixed  fp32 / ``bf16=True`` with ``--bf16``
device                 ``trainer.accelerator=cpu`` / ``gpu``       ``use_cpu=True`` on CPU
dropout                off (``recipe.student_dropout=false``)      off (``disable_dropout=True``)
seed                   ``seed=--seed``                             ``seed``
data loading           ``data.num_workers=0``                      ``dataloader_num_workers=0``
evaluation, saving     none: ``trainer.limit_val_batches=0``,      ``eval_strategy="no"``, ``save_strategy="no"``,
and logging            ``limit_test_batches=0``, ``logger=none``,  ``logging_strategy="no"``, ``report_to="none"``,
                       ``callbacks=none``, no progress bar         ``disable_tqdm=True``
=====================  ==========================================  ==========================================

Two of those differ from TRL's own defaults on purpose: ``SFTConfig`` (which ``GKDConfig``
extends) turns on gradient checkpointing, which also turns off the KV cache when TRL's
student samples, and bf16; and transformers picks the fused AdamW. Both sides here
compute the same thing (no checkpointing, fp32 unless ``--bf16``, plain AdamW).

What still differs, by design of each library (the "loss tokens" rows show that both
sides' losses cover the same number of tokens):

* TRL's ``DataCollatorForChatML`` renders and tokenizes every example's chat at every
  batch; kd tokenizes the data once, before training (outside the timed steps);
* TRL samples with transformers' ``generate``; kd with its own KV-cached loop
  (:func:`kd.generation.generate`);
* the coin: TRL draws ``random.random() <= lmbda``, kd a seeded torch generator, and each
  shuffles the data its own way (same seed), so the runs see different draws and batches;
* TRL 1.16 divides an on-policy step's summed divergence by the response tokens of the
  dataset batch (counted before the batch is replaced by samples), kd by the tokens the
  loss covers: a different loss scale on those steps, the same computation;
* with ``--seq-kd``, kd generates the teacher's responses for the whole training split
  once, when ``fit`` starts (outside the timed steps, inside the process time and the
  training memory), TRL at every off-policy step.

How memory is measured
----------------------
Each side runs in its own process (this script re-invokes itself with ``--variant kd`` or
``--variant trl`` and reads one JSON line back), so neither sees the other's imports or
allocations. On CPU: the process's peak resident set size
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) at the end, absolute and minus the
resident size just before training starts (after imports, the data, both models and the
trainer object are built); the training part is what the recipe's own design costs
(optimizer state, activations, generation) and is what the verdict compares. With
``--device cuda`` (the models moved to the GPU before the baseline on both sides):
``torch.cuda.max_memory_allocated`` over training (peak statistics reset just before it),
minus ``torch.cuda.memory_allocated`` at that point, and absolute.

Run
---
::

    pip install -e ".[bench]"          # TRL, a benchmark-only dependency (kd never imports it)
    python benchmarks/gkd_vs_trl.py                          # CPU, fp32, defaults in --help
    python benchmarks/gkd_vs_trl.py --steps 10 --batch-size 8 --max-new-tokens 8   # quick
    python benchmarks/gkd_vs_trl.py --device cuda --bf16 --batch-size 64 --hidden 512 \\
        --layers 4 --teacher-hidden 1024 --teacher-layers 8 --max-new-tokens 64

Timings are wall-clock on whatever else runs on the machine; compare runs made together.
The target (issue 14): kd at least 1.5x TRL's steps/s at no more than its memory.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

#: the line prefix a --variant child prints its result after
RESULT = "GKD_BENCH_RESULT "
#: the embedded task's skills kd's data=task trains on
SKILLS = ["upper", "reverse", "sort", "count"]
INSTALL_HINT = ('TRL is not installed; install the benchmark extra with pip install -e ".[bench]" '
                "(TRL is a benchmark-only dependency that kd never imports).")


# ----------------------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps (after the warm-up)")
    p.add_argument("--warmup", type=int, default=3, help="optimizer steps before timing starts")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per optimizer step")
    p.add_argument("--max-new-tokens", type=int, default=16, help="generation budget of an on-policy step")
    p.add_argument("--lmbda", type=float, default=0.5, help="probability that a step trains on student samples")
    p.add_argument("--beta", type=float, default=0.5, help="generalized JSD beta (0: forward KL, 1: reverse KL)")
    p.add_argument("--temperature", type=float, default=0.9, help="sampling temperature of the student")
    p.add_argument("--seq-kd", action="store_true",
                   help="off-policy steps train on teacher samples (kd generates them once before training, "
                        "outside the timed steps; TRL at every off-policy step)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    p.add_argument("--max-length", type=int, default=64, help="longest prompt + response of the data, in tokens")
    p.add_argument("--hidden", type=int, default=96, help="student hidden size (kd's task student: 96)")
    p.add_argument("--layers", type=int, default=2, help="student layers")
    p.add_argument("--teacher-hidden", type=int, default=256, help="teacher hidden size (kd's task teacher: 256)")
    p.add_argument("--teacher-layers", type=int, default=4, help="teacher layers")
    p.add_argument("--heads", type=int, default=4, help="attention heads of both models")
    p.add_argument("--vocab", type=int, default=512, help="largest vocabulary of the trained task tokenizer")
    p.add_argument("--min-frequency", type=int, default=None,
                   help="occurrences a pair needs to become a merge (default: 2%% of --train-size, as data=task)")
    p.add_argument("--train-size", type=int, default=2000, help="training examples of the task")
    p.add_argument("--seed", type=int, default=0, help="seed of both trainers")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads of both sides (default: torch's)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision on both sides (meant for --device cuda)")
    p.add_argument("--only", choices=["kd", "trl"], default=None, help="run one side only")
    p.add_argument("--repeats", type=int, default=1,
                   help="run each side this many times, alternating, and report each side's fastest run")
    p.add_argument("--workdir", default=None, help="keep the models, tokenizer and data here (default: a temp dir)")
    p.add_argument("--json", default=None, help="also write both results to this JSON file")
    p.add_argument("--variant", choices=["kd", "trl"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if min(args.steps, args.batch_size, args.max_new_tokens, args.repeats) < 1 or args.warmup < 0:
        p.error("--steps, --batch-size, --max-new-tokens and --repeats must be >= 1 and --warmup >= 0")
    if not (0.0 <= args.lmbda <= 1.0 and 0.0 <= args.beta <= 1.0 and args.temperature > 0):
        p.error("--lmbda and --beta must lie in [0, 1] and --temperature be > 0")
    if args.min_frequency is None:
        args.min_frequency = max(2, args.train_size // 50)
    return args


# ----------------------------------------------------------------------------- the shared setup


def prepare(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Tokenizer, teacher, student and TRL's chat data, written once to ``workdir``."""
    import torch
    from transformers.utils import logging as hf_logging

    from kd.data.lm import LMDataModule
    from kd.data.sources import TaskSource
    from kd.models import tiny_causal_lm

    hf_logging.disable_progress_bar()
    torch.manual_seed(args.seed)
    dm = LMDataModule(TaskSource(train_size=args.train_size, val_size=8, test_size=8, seed=0, skills=SKILLS),
                      vocab_size=args.vocab, min_frequency=args.min_frequency, batch_size=args.batch_size,
                      max_length=args.max_length, cache_dir=None)
    dm.setup()
    tok = dm.tokenizer
    ids = {"pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    positions = max(256, args.max_length + args.max_new_tokens)
    pair = {"teacher": (args.teacher_hidden, args.teacher_layers), "student": (args.hidden, args.layers)}
    params = {}
    for name, (hidden, layers) in pair.items():
        model = tiny_causal_lm(arch="llama", vocab_size=len(tok), hidden_size=hidden, num_layers=layers,
                               num_heads=args.heads, max_position_embeddings=positions, **ids)
        params[name] = sum(p.numel() for p in model.parameters())
        model.save_pretrained(workdir / name)
        tok.save_pretrained(workdir / name)
    with open(workdir / "messages.jsonl", "w") as f:
        for ex in dm.splits["train"].examples:
            messages = [{"role": "user", "content": ex.prompt}, {"role": "assistant", "content": ex.response}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return {"vocab": len(tok), "examples": len(dm.splits["train"]), "params": params}


# ----------------------------------------------------------------------------- measuring


class StepClock:
    """Wall-clock of optimizer steps: ``start()`` when a step begins, ``end(on_policy)`` when
    its optimizer update is done. Steps after the first ``warmup`` are recorded with the
    time since the previous step ended (the interval: what a step costs the loop)."""

    def __init__(self, warmup: int, cuda: bool) -> None:
        self.warmup, self.cuda = warmup, cuda
        self.done = 0
        self.begun: float | None = None
        self.last_end: float | None = None
        self.timed: list[tuple[float, float, bool, float]] = []  # (interval, in-step time, on-policy, tokens)
        self.kinds: set[bool] = set()  # the kinds of step (on-policy or not) seen so far
        self.first_of_kind: list[float] = []  # intervals of timed steps that were their kind's first

    def _now(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    def start(self) -> None:
        self.begun = self._now()

    def end(self, on_policy: bool, tokens: float) -> None:
        """``tokens``: the response tokens the step's loss covered (a check that both sides
        do the same work)."""
        now = self._now()
        self.done += 1
        if self.done > self.warmup and self.last_end is not None:
            self.timed.append((now - self.last_end, now - (self.begun or now), on_policy, float(tokens)))
            if on_policy not in self.kinds:  # a first generation (or first plain step) in the timed window
                self.first_of_kind.append(now - self.last_end)
        self.kinds.add(on_policy)
        self.last_end = now

    def summary(self, lmbda: float) -> dict[str, Any]:
        intervals = [t[0] for t in self.timed]
        on = [t[0] for t in self.timed if t[2]]
        off = [t[0] for t in self.timed if not t[2]]
        wall = sum(intervals)

        def mean(xs: list[float]) -> float:
            return sum(xs) / len(xs)

        def median(xs: list[float]) -> float:
            xs = sorted(xs)
            return (xs[(len(xs) - 1) // 2] + xs[len(xs) // 2]) / 2

        expected = None
        if on and off:
            expected = 1.0 / (lmbda * median(on) + (1 - lmbda) * median(off))
        elif intervals and ((lmbda == 1.0 and not off) or (lmbda == 0.0 and not on)):
            expected = 1.0 / median(intervals)
        return {
            "timed_steps": len(intervals),
            "on_policy_steps": len(on),
            "wall_s": wall,
            "steps_per_s": len(intervals) / wall if wall > 0 else None,
            "steps_per_s_at_lmbda": expected,
            "on_policy_step_ms": 1000 * median(on) if on else None,
            "off_policy_step_ms": 1000 * median(off) if off else None,
            "in_step_share": sum(t[1] for t in self.timed) / wall if wall > 0 else None,
            # the warm-up drew one kind of step only: the other kind's first step (its warm-up) is timed
            "first_of_kind_timed_s": sum(self.first_of_kind),
            "on_policy_loss_tokens": mean([t[3] for t in self.timed if t[2]]) if on else None,
            "off_policy_loss_tokens": mean([t[3] for t in self.timed if not t[2]]) if off else None,
        }


class Memory:
    """Peak memory of training: RSS on CPU, allocated CUDA memory on GPU (MB)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.baseline = 0.0

    @staticmethod
    def rss_mb() -> float:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except OSError:
            return Memory.peak_rss_mb()

    @staticmethod
    def peak_rss_mb() -> float:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KB on Linux

    def start(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated() / 2**20
        else:
            self.baseline = self.rss_mb()
        self.setup_peak = self.peak_rss_mb()

    def result(self) -> dict[str, Any]:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2**20
            return {"memory": "cuda max_memory_allocated", "baseline_mb": self.baseline, "peak_mb": peak,
                    "train_peak_mb": peak - self.baseline, "peak_rss_mb": self.peak_rss_mb()}
        peak = self.peak_rss_mb()
        return {"memory": "peak RSS", "baseline_mb": self.baseline, "peak_mb": peak,
                "train_peak_mb": max(0.0, peak - self.baseline),
                # the peak was reached while setting up, not while training: the training part is an upper bound
                "peak_before_training": peak <= self.setup_peak}


# ----------------------------------------------------------------------------- the two sides


def kd_config(args: argparse.Namespace, workdir: Path) -> Any:
    """The composed kd config of this comparison (Hydra's config set as under the kd command)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from kd.config import CONF_DIR

    cuda = args.device == "cuda"
    overrides = [
        "experiment=gkd_trl", "data=task", "teacher=hf", "student=hf", "logger=none", "callbacks=none",
        f"teacher.name_or_path='{workdir / 'teacher'}'", f"student.name_or_path='{workdir / 'student'}'",
        f"data.tokenizer='{workdir / 'student'}'",
        f"data.source.train_size={args.train_size}", "data.source.val_size=8", "data.source.test_size=8",
        "data.source.seed=0", f"data.source.skills=[{','.join(SKILLS)}]",
        f"data.batch_size={args.batch_size}", f"data.max_length={args.max_length}",
        f"data.max_new_tokens={args.max_new_tokens}", "data.generation_eval_size=0", "data.num_workers=0",
        f"regime.lmbda={args.lmbda}", f"regime.seq_kd={str(args.seq_kd).lower()}",
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
        f"paths.output_dir='{workdir / 'kd_run'}'", f"paths.cache_dir='{workdir / 'kd_cache'}'",
    ]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)  # as under the kd command (choice() reads the chosen groups)
    return cfg


def run_kd(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    import lightning as L
    import torch

    from kd.build import build
    from kd.subruns import prepare

    cuda = args.device == "cuda"
    run = build(kd_config(args, workdir))
    prepare(run)
    clock, memory = StepClock(args.warmup, cuda), Memory(cuda)
    regime = run.recipe.regime

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.before = regime.on_policy_batches
            clock.start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            # the response tokens of the batch the loss saw (set by DistillationRecipe.outputs)
            clock.end(regime.on_policy_batches > self.before, float(pl_module._num_targets))

    run.trainer.callbacks.append(Timer())
    if cuda:  # weights on the GPU before the baseline, as TRL's trainer has them when built
        run.recipe.to("cuda")
    memory.start()
    run.fit()
    steps = int(run.trainer.global_step)
    return {"optimizer_steps": steps, "threads": torch.get_num_threads(), **clock.summary(args.lmbda),
            **memory.result()}


def _trl_gkd():
    try:
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError:  # TRL before GKD moved to trl.experimental
        from trl import GKDConfig, GKDTrainer
    return GKDConfig, GKDTrainer


def run_trl(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    import random

    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    GKDConfig, GKDTrainer = _trl_gkd()
    cuda = args.device == "cuda"
    random.seed(args.seed)
    tok = AutoTokenizer.from_pretrained(workdir / "student")
    student = AutoModelForCausalLM.from_pretrained(workdir / "student", dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(workdir / "teacher", dtype=torch.float32)
    with open(workdir / "messages.jsonl") as f:
        data = Dataset.from_list([json.loads(line) for line in f])

    config = GKDConfig(
        output_dir=str(workdir / "trl_run"),
        lmbda=args.lmbda, beta=args.beta, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
        seq_kd=args.seq_kd, disable_dropout=True, max_length=args.max_length,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
        max_steps=args.warmup + args.steps, learning_rate=args.lr, weight_decay=0.0, optim="adamw_torch",
        lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, gradient_checkpointing=False,
        bf16=args.bf16, fp16=False, use_cpu=not cuda, seed=args.seed, data_seed=args.seed,
        dataloader_num_workers=0, report_to="none", save_strategy="no", eval_strategy="no",
        logging_strategy="no", disable_tqdm=True,
    )
    clock, memory = StepClock(args.warmup, cuda), Memory(cuda)

    class CountingGKDTrainer(GKDTrainer):
        """GKDTrainer that notes whether a step sampled from the student (nothing else changes)."""

        student_samples = 0
        loss_tokens = 0.0

        def generate_on_policy_outputs(self, model, inputs, generation_config):
            if model is not self.teacher_model and model is not self.accelerator.unwrap_model(self.teacher_model):
                self.student_samples += 1
            return GKDTrainer.generate_on_policy_outputs(model, inputs, generation_config)

        def compute_loss(self, model, inputs, *rest, **kwargs):
            self.loss_tokens = float((inputs["labels"][:, 1:] != -100).sum())
            return super().compute_loss(model, inputs, *rest, **kwargs)

    class Timer(TrainerCallback):
        def on_step_begin(self, targs, state, control, **kwargs):
            self.before = trainer.student_samples
            clock.start()

        def on_step_end(self, targs, state, control, **kwargs):
            clock.end(trainer.student_samples > self.before, trainer.loss_tokens)

    trainer = CountingGKDTrainer(model=student, teacher_model=teacher, args=config, train_dataset=data,
                                 processing_class=tok, callbacks=[Timer()])
    memory.start()
    trainer.train()
    return {"optimizer_steps": int(trainer.state.global_step), "threads": torch.get_num_threads(),
            "trl_version": trl.__version__, **clock.summary(args.lmbda), **memory.result()}


def child(args: argparse.Namespace) -> None:
    """``--variant``: one side in this process; its result as one JSON line on stdout."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    started = time.perf_counter()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    result = run_kd(args, workdir) if args.variant == "kd" else run_trl(args, workdir)
    result["process_s"] = time.perf_counter() - started
    result["load_avg_1min"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(RESULT + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- report


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def _ratio(a: Any, b: Any) -> str:
    return f"{a / b:.2f}x" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else "n/a"


def report(args: argparse.Namespace, setup: dict[str, Any], results: dict[str, dict[str, Any]]) -> str:
    kd, trl = results.get("kd") or {}, results.get("trl") or {}
    mem = "CUDA allocated" if args.device == "cuda" else "RSS"
    rows = [
        ("optimizer steps timed", "timed_steps", 0), ("on-policy steps (timed)", "on_policy_steps", 0),
        ("steps/s (wall-clock)", "steps_per_s", 2), ("steps/s (expected at lmbda)", "steps_per_s_at_lmbda", 2),
        ("on-policy step, median (ms)", "on_policy_step_ms", 1),
        ("off-policy step, median (ms)", "off_policy_step_ms", 1),
        ("first step of a kind, timed (s)", "first_of_kind_timed_s", 2),
        ("loss tokens, on-policy step", "on_policy_loss_tokens", 1),
        ("loss tokens, off-policy step", "off_policy_loss_tokens", 1),
        (f"peak {mem} of training (MB)", "train_peak_mb", 1), (f"peak {mem}, absolute (MB)", "peak_mb", 1),
        (f"{mem} before training (MB)", "baseline_mb", 1), ("process time incl. setup (s)", "process_s", 1),
        ("torch threads", "threads", 0), ("machine load (1-min average) at end", "load_avg_1min", 2),
    ]
    width = max(len(r[0]) for r in rows) + 2
    lines = [f"{'':<{width}}{'kd':>12}{'TRL':>12}{'kd/TRL':>10}"]
    for label, key, digits in rows:
        a, b = kd.get(key), trl.get(key)
        ratio = _ratio(a, b) if key in ("steps_per_s", "steps_per_s_at_lmbda", "train_peak_mb", "peak_mb",
                                        "on_policy_step_ms", "off_policy_step_ms") else ""
        lines.append(f"{label:<{width}}{_fmt(a, digits):>12}{_fmt(b, digits):>12}{ratio:>10}")
    def both(k: str) -> bool:
        return bool(kd.get(k)) and bool(trl.get(k))

    key = "steps_per_s_at_lmbda" if both("steps_per_s_at_lmbda") else "steps_per_s"
    speed = kd[key] / trl[key] if both(key) else None
    memory = kd["train_peak_mb"] / trl["train_peak_mb"] if both("train_peak_mb") else None
    lines.append("")
    if speed is not None and memory is not None:
        verdict = "met" if speed >= 1.5 and memory <= 1.0 else "not met"
        lines.append(f"kd/TRL: {speed:.2f}x the steps/s ({key}) at {memory:.2f}x the training memory; "
                     f"target (>= 1.5x at <= 1.0x) {verdict}")
    for side, r in (("kd", kd), ("TRL", trl)):
        if (r.get("load_avg_1min") or 0) > (os.cpu_count() or 1) + 0.5:  # more than this run itself
            lines.append(f"note: the machine was busy while {side} ran (load {r['load_avg_1min']:.1f} on "
                         f"{os.cpu_count()} cores): its timings are disturbed; rerun when it is quiet")
        if r.get("peak_before_training"):
            lines.append(f"note: {side}'s peak RSS was reached before training; its training figure is an upper bound")
    lines.append("")
    lines.append(
        f"settings: device={args.device} precision={'bf16-mixed' if args.bf16 else 'fp32'} batch={args.batch_size} "
        f"lmbda={args.lmbda} beta={args.beta} sampling T={args.temperature} loss T=1.0 top_k=0 top_p=1.0 "
        f"max_new_tokens={args.max_new_tokens} seq_kd={args.seq_kd} max_length={args.max_length} "
        f"AdamW lr={args.lr} wd=0 constant LR clip=1.0 no grad checkpointing, seed={args.seed}, "
        f"warm-up {args.warmup} + timed {args.steps} steps")
    lines.append(
        f"models: teacher Llama hidden {args.teacher_hidden} x {args.teacher_layers} layers "
        f"({setup['params']['teacher'] / 1e6:.2f}M params), student Llama hidden {args.hidden} x {args.layers} "
        f"layers ({setup['params']['student'] / 1e6:.2f}M), {args.heads} heads, vocab {setup['vocab']}, random "
        f"weights; data: {setup['examples']} task examples")
    lines.append(f"versions: TRL {trl.get('trl_version', 'n/a')}, {_versions()}")
    return "\n".join(lines)


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in ("torch", "transformers", "lightning", "accelerate"):
        try:
            out.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            pass
    return ", ".join(out)


def run_child(variant: str, workdir: Path) -> dict[str, Any] | None:
    """One side in a fresh process (this script with ``--variant``); its result, or None
    after printing why it failed."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--variant", variant,
           "--workdir", str(workdir)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode != 0 or not found:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        print(f"{variant} failed (exit code {proc.returncode}):\n{tail}", file=sys.stderr)
        return None
    return json.loads(found[-1][len(RESULT):])


def _rate(result: dict[str, Any]) -> float:
    return result.get("steps_per_s_at_lmbda") or result.get("steps_per_s") or 0.0


def _terminated(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main() -> None:
    args = parse_args()
    if args.variant:
        child(args)
        return
    if importlib.util.find_spec("trl") is None and args.only != "kd":
        print(INSTALL_HINT, file=sys.stderr)
        sys.exit(2)
    # a terminated benchmark (e.g. under `timeout`) takes its running side down with it and
    # removes its temporary directory: subprocess.run kills the child on any exception
    signal.signal(signal.SIGTERM, _terminated)
    tmp = None
    if args.workdir:
        workdir = Path(args.workdir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="gkd_vs_trl-")
        workdir = Path(tmp.name)
    try:
        print(f"building the task, tokenizer and models in {workdir} ...", flush=True)
        setup = prepare(args, workdir)
        runs: dict[str, list[dict[str, Any]]] = {}
        failed = False
        variants = [v for v in ("kd", "trl") if args.only in (None, v)]
        for repeat in range(args.repeats):
            for variant in variants:
                if variant in runs and runs[variant] is None:
                    continue  # failed before
                print(f"running {variant} ({repeat + 1}/{args.repeats}): {args.warmup} warm-up + {args.steps} "
                      "timed steps ...", flush=True)
                result = run_child(variant, workdir)
                if result is None:
                    failed, runs[variant] = True, None
                    continue
                runs.setdefault(variant, []).append(result)
        results = {v: max(rs, key=_rate) for v, rs in runs.items() if rs}
        print()
        print(report(args, setup, results))
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "setup": setup, "results": results,
                                                   "all_runs": runs}, indent=2))
        if failed:
            sys.exit(1)
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
