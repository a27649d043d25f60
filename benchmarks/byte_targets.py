"""Byte-head targets from one teacher pass vs the exact recursion with extra passes.

BLD needs the teacher's next-byte distribution at every offset where the student's tokens
start, often inside one of the teacher's tokens. :func:`kd.bytes.marginal_byte_targets`
computes it from the single teacher pass over its own tokens (optionally one more batched
pass for the detours through a shorter token, :func:`kd.bytes.detours`) and reports the
probability mass it could not place (the leak); :class:`kd.bytes.ByteOracle` evaluates docs/spec.md
section 7's recursion exactly, calling the teacher again on every history it needs. This
script runs both on the same batch of the embedded task (teacher tokens merge letter
pairs, student tokens are single letters, so most student offsets fall inside teacher
tokens) and prints time per batch, the ratio, the mean total-variation distance between
the two and the mean leak (the distance is at most the leak, position by position).

    python benchmarks/byte_targets.py [--rows 8] [--train-epochs 1]

The teacher is a small Llama trained for ``--train-epochs`` epochs on the task (0: random
weights, high entropy, large leak); timings are CPU wall-clock on whatever else runs.
"""

from __future__ import annotations

import argparse
import time

import torch

from kd.bytes import ByteOracle, ByteVocab, detours, marginal_byte_targets
from kd.data.lm import LMDataModule
from kd.data.sources import TaskSource
from kd.models import tiny_causal_lm


def _train(model: torch.nn.Module, dm: LMDataModule, epochs: int) -> None:
    from kd.evaluation import cross_entropy

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for batch in dm.train_dataloader():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            loss = cross_entropy(logits, batch["labels"][:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8, help="sequences in the batch")
    parser.add_argument("--train-epochs", type=int, default=1, help="teacher training epochs on the task")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)

    source = TaskSource(train_size=3000, val_size=50, test_size=50)
    teacher_dm = LMDataModule(source, vocab_size=1024, min_frequency=24, batch_size=32)
    teacher_dm.setup()
    student_dm = LMDataModule(source, vocab_size=512, min_frequency=240, teacher_tokenizer=teacher_dm.tokenizer)
    student_dm.setup()
    teacher = tiny_causal_lm(vocab_size=len(teacher_dm.tokenizer), hidden_size=128, num_layers=2, num_heads=4)
    _train(teacher, teacher_dm, args.train_epochs)
    teacher.eval()
    student_bytes, teacher_bytes = ByteVocab(student_dm.tokenizer), ByteVocab(teacher_dm.tokenizer)
    batch = next(iter(student_dm._train_like("val", shuffle=False)))

    rows = []
    for r in range(min(args.rows, len(batch["labels"]))):
        labels = batch["labels"][r]
        symbols, starts = student_bytes.spell(labels[labels >= 0].tolist())
        prompt = batch["teacher_prompt_ids"][r][batch["teacher_prompt_mask"][r].bool()].tolist()
        rows.append((prompt, symbols, starts, teacher_bytes.encode(symbols)))

    # ours: one teacher pass per sequence (+ the batched detour pass), then the targets
    def ours_targets(with_detours: bool) -> list:
        out = []
        with torch.no_grad():
            for prompt, _, starts, t_ids in rows:
                seq = torch.tensor([prompt + t_ids])
                logits = teacher(input_ids=seq).logits[0, len(prompt) - 1: len(prompt) + len(t_ids) - 1]
                probs = torch.softmax(logits[:, : len(teacher_bytes)], -1)
                extra = {}
                wanted = detours(t_ids, teacher_bytes.index, starts) if with_detours else []
                if wanted:
                    histories = [prompt + t_ids[:i] + [v] for _, i, v in wanted]
                    width = max(map(len, histories))
                    ids = torch.tensor([h + [0] * (width - len(h)) for h in histories])
                    last = teacher(input_ids=ids).logits[torch.arange(len(ids)), torch.tensor([len(h) - 1 for h in histories])]
                    for (o, _, v), p in zip(wanted, torch.softmax(last[:, : len(teacher_bytes)], -1)):
                        extra[(o, v)] = p
                out.append(marginal_byte_targets(probs, t_ids, teacher_bytes.index, starts, num_heads=1,
                                                 detour_probs=extra))
        return out

    timings, results = {}, {}
    for with_detours in (False, True):
        started = time.perf_counter()
        results[with_detours] = ours_targets(with_detours)
        timings[with_detours] = time.perf_counter() - started

    # exact: the recursion, one teacher call per history it needs (memoised per sequence)
    started = time.perf_counter()
    exact, calls = [], 0
    with torch.no_grad():
        for prompt, symbols, starts, t_ids in rows:
            def lm(history: tuple[int, ...], prompt: list[int] = prompt) -> torch.Tensor:
                out = teacher(input_ids=torch.tensor([prompt + list(history)])).logits[0, -1, : len(teacher_bytes)]
                return torch.softmax(out, -1)

            oracle = ByteOracle(lm, teacher_bytes.symbols)
            _, t_starts = teacher_bytes.spell(t_ids)
            dists = []
            for o in starts:
                i = max(j for j, s in enumerate(t_starts) if s <= o)
                dists.append(oracle.next_byte(t_ids[:i], symbols[t_starts[i]: o]))
            exact.append(torch.stack(dists))
            calls += oracle.calls
    exact_s = time.perf_counter() - started

    inside = torch.tensor([o not in set(teacher_bytes.spell(t)[1]) for _, _, s, t in rows for o in s])
    print(f"{len(inside)} student offsets ({int(inside.sum())} inside a teacher token), teacher trained "
          f"{args.train_epochs} epoch(s)")
    print(f"{'method':<40}{'s / batch':>10}{'vs exact':>10}")
    print(f"{'exact recursion (ByteOracle)':<40}{exact_s:>10.3f}{1.0:>9.1f}x    ({calls} teacher calls)")
    for with_detours, name in ((False, "one pass + targets"), (True, "one pass + detour pass + targets")):
        ours = results[with_detours]
        tv = torch.cat([0.5 * (t[:, 0].double() - e).abs().sum(-1) for (t, _, _), e in zip(ours, exact)])
        leak = torch.cat([lk[:, 0] for _, _, lk in ours]).double()
        print(f"{name:<40}{timings[with_detours]:>10.3f}{exact_s / timings[with_detours]:>9.1f}x    "
              f"TV <= leak at every offset: {bool((tv <= leak + 1e-6).all())}")
        for where_name, where in (("at teacher token boundaries", ~inside), ("inside teacher tokens", inside)):
            if where.any():
                print(f"    {where_name:<28} mean TV to exact {tv[where].mean():.4f} (max {tv[where].max():.4f}), "
                      f"mean leak {leak[where].mean():.4f}")

if __name__ == "__main__":
    main()
