"""How sure is the teacher on the student's own samples? A check before on-policy distillation.

On-policy recipes (GKD with lmbda > 0, MiniLLM, DistiLLM's mixed batches) train the student
to match the teacher on sequences the student sampled. That signal is only as good as the
teacher's predictions after the student's mistakes: a teacher trained teacher-forced on
clean answers may never have seen a wrong prefix. This script builds an experiment's run
(the cached teacher and SFT, as ``kd`` would), samples the student on a few training batches
and prints the teacher's mean top-1 probability

* on the dataset's answers (its training distribution),
* on the student's samples before the first token the teacher would not have chosen,
* and after it (the prefixes on-policy distillation adds),

with the share of samples that contain such a token, for T = 1 sampling and greedy decoding.

    python benchmarks/teacher_on_student_samples.py experiment=task_long_gkd [--batches 2]

A teacher whose confidence collapses after the student's first mistake gives little to
learn from there, and on-policy rows then trail off-policy ones (docs/experiments/c.md).
"""

from __future__ import annotations

import argparse
import sys

import torch

from kd.build import build
from kd.config import compose_config
from kd.data import IGNORE_INDEX
from kd.generation import Sampling
from kd.regimes import OnPolicy
from kd.subruns import prepare


def top1(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's most likely next token and its probability at every position predicting
    a label: ``(B, L-1)`` each, aligned with ``batch["labels"][:, 1:]``."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    probs = logits.float().softmax(-1).max(-1)
    return probs.indices, probs.values


def mean(parts: list[torch.Tensor]) -> float:
    """Mean of the values in ``parts`` (NaN when there are none)."""
    values = torch.cat(parts)
    return float(values.mean()) if values.numel() else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="+", help="the experiment's Hydra overrides, e.g. experiment=task_long_gkd")
    parser.add_argument("--batches", type=int, default=2, help="training batches to sample (default 2)")
    args = parser.parse_args()

    torch.manual_seed(0)
    run = build(compose_config(*args.overrides, output_dir="outputs/diagnostics"))
    if not isinstance(run.teacher, torch.nn.Module):
        sys.exit("teacher_on_student_samples: this run has no single teacher; choose an experiment with teacher=...")
    prepare(run)
    data = run.datamodule
    data.setup("fit")
    student, teacher = run.student.eval(), run.teacher.eval()
    loader = iter(data.train_dataloader())
    batches = [next(loader) for _ in range(args.batches)]
    on_answers = []
    for batch in batches:
        _, p = top1(teacher, batch)
        on_answers.append(p[batch["labels"][:, 1:] != IGNORE_INDEX])
    for name, sampling in (("T = 1", Sampling(temperature=1.0)), ("greedy", Sampling(temperature=0.0))):
        regime = OnPolicy(sampling)
        before, after, with_mistake, rows = [], [], 0, 0
        for batch in batches:
            sampled = regime.sample(student, batch, data)
            choice, p = top1(teacher, sampled)
            labels = sampled["labels"][:, 1:]
            counted = labels != IGNORE_INDEX
            mistake = (choice != labels) & counted
            past_first = (mistake.long().cumsum(-1) - mistake.long()) > 0  # strictly after the first mistake
            before.append(p[counted & ~past_first])
            after.append(p[counted & past_first])
            with_mistake += int(mistake.any(-1).sum())
            rows += len(labels)
        print(f"{name:>7}: teacher's top-1 probability on the dataset's answers {mean(on_answers):.3f}; "
              f"on the student's samples before its first mistake {mean(before):.3f}, after it {mean(after):.3f}; "
              f"samples with a mistake {with_mistake}/{rows}")

if __name__ == "__main__":
    main()
