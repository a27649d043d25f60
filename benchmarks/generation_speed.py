"""Decoding speed of :func:`kd.generation.generate` against transformers' ``model.generate``.

The on-policy regimes (GKD, MiniLLM, cross-stage self-distillation) sample their training
data with our own loop, :func:`kd.generation.generate`. This script measures, on the same
randomly initialised Llama (built from a config, no download), the same random prompts
and the same settings, the generated tokens per second of

* ``ours``: :func:`kd.generation.generate` without a mixer (``mix=None``);
* ``hf``: transformers' ``model.generate(do_sample=..., max_new_tokens=...)`` (no scores,
  its fastest form);
* ``hf+scores``: the same with ``output_scores=True, return_dict_in_generate=True``, the
  output needed to recover per-token log-probs;
* ``ours+mix``: :func:`kd.generation.generate` with ``TeacherMix(teacher, alpha=0.2)``
  against a teacher of the same size (MiniLLM; two models run, for reference only);

for batch 1 and batch 16, sampling (temperature 1, top_k 0, top_p 1) and greedy. There is
no EOS, so every variant generates exactly ``--new-tokens`` tokens per row; tokens/s is
``batch * new_tokens / seconds``. Each variant is warmed up once, then the variants run in
turn ``--repeats`` times (interleaved, so a load change on the machine hits them all) and
the median time is kept. Absolute figures are noisy on a shared CPU; the ratio ours / HF
is what matters.

    python benchmarks/generation_speed.py [--batches 1 16] [--new-tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from kd.generation import GenerationConfig, TeacherMix, generate
from kd.models import tiny_causal_lm


def _timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="batch sizes")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per row")
    parser.add_argument("--prompt-length", type=int, default=32, help="prompt tokens per row")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant (median kept)")
    parser.add_argument("--vocab", type=int, default=16384, help="vocabulary size")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--no-mix", action="store_true", help="skip the TeacherMix variant")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    def build() -> torch.nn.Module:
        return tiny_causal_lm(
            vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=4,
            max_position_embeddings=args.prompt_length + args.new_tokens, pad_token_id=0,
        ).eval()

    student, teacher = build(), build()
    n = args.new_tokens
    print(f"Llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; prompt {args.prompt_length} "
          f"tokens, {n} new tokens, {args.threads} threads, median of {args.repeats}")
    header = f"{'batch':>5} {'mode':<7} {'variant':<10} {'tokens/s':>10} {'ours/hf':>8}"
    print(header)
    print("-" * len(header))
    for batch in args.batches:
        prompts = torch.randint(1, args.vocab, (batch, args.prompt_length))
        mask = torch.ones_like(prompts)
        for mode, temperature in (("sample", 1.0), ("greedy", 0.0)):
            config = GenerationConfig(max_new_tokens=n, temperature=temperature, top_k=0, top_p=1.0,
                                      eos_token_id=None, pad_token_id=0)
            hf_kwargs = dict(
                input_ids=prompts, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                do_sample=temperature > 0, pad_token_id=0, eos_token_id=None,
            )
            if temperature > 0:
                hf_kwargs.update(temperature=temperature, top_k=0, top_p=1.0)
            variants: dict[str, Callable[[], object]] = {
                "ours": lambda: generate(student, prompts, mask, config, generator=torch.Generator().manual_seed(0)),
                "hf": lambda: student.generate(**hf_kwargs),
                "hf+scores": lambda: student.generate(**hf_kwargs, output_scores=True, return_dict_in_generate=True),
            }
            if not args.no_mix:
                variants["ours+mix"] = lambda: generate(
                    student, prompts, mask, config, generator=torch.Generator().manual_seed(0),
                    mix=TeacherMix(teacher, alpha=0.2),
                )
            # same number of tokens from every variant
            lengths = {name: _generated(fn(), args.prompt_length) for name, fn in variants.items()}  # warm-up
            assert set(lengths.values()) == {n}, lengths
            times: dict[str, list[float]] = {name: [] for name in variants}
            for _ in range(args.repeats):
                for name, fn in variants.items():
                    times[name].append(_timed(fn))
            hf_rate = batch * n / statistics.median(times["hf"])
            for name in variants:
                rate = batch * n / statistics.median(times[name])
                print(f"{batch:>5} {mode:<7} {name:<10} {rate:>10.0f} {rate / hf_rate:>8.2f}")


def _generated(out: object, prompt_length: int) -> int:
    """Number of generated columns in any variant's output."""
    sequences = getattr(out, "sequences", out)
    assert isinstance(sequences, torch.Tensor)
    return sequences.shape[1] - prompt_length


if __name__ == "__main__":
    main()
