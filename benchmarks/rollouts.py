"""Rollout speed: vLLM (kd.rollouts) against kd's sampler and transformers' ``generate``.

The on-policy regimes sample the student's rollouts with ``regime.engine=kd`` (kd's sampler,
:func:`kd.generation.generate`) or ``regime.engine=vllm`` (an in-process vLLM engine holding
the student's weights, :class:`kd.rollouts.VLLMEngine`). This script measures generated tokens
per second of

* ``kd``: :func:`kd.generation.generate`;
* ``hf``: transformers' ``model.generate(do_sample=True)`` (no scores, its fastest form);
* ``vllm``: :meth:`kd.rollouts.VLLMEngine.generate` after a weight sync, as a run calls it
  (the result converted to kd's batch; per-token log-probs returned);

on the same model, the same random 32-token prompts, temperature 1, no top-k/top-p, no EOS
(every row generates exactly ``--new-tokens`` tokens; tokens/s is ``batch * new_tokens /
seconds``), at each batch size of ``--batches``. Each variant runs in its own process (the
parent starts one per variant and prints the figures side by side with ratios against kd's
sampler), is warmed up with one call at batch 2, then each batch size is timed
``--repeats`` times and the median is kept. The weight sync and the engine's start are timed
apart (``sync s`` / ``start s``), not counted in tokens/s.

The model: SmolLM2-135M-Instruct converted by ``kd-pretrained smollm2-135m-instruct`` when
that cache entry exists (:func:`kd.pretrained.model_dir`), else a random-weight Llama of
SmolLM2-135M's shape (30 layers, hidden 576, 9 heads, 3 KV heads, vocabulary 49152; random
weights decode at the same speed). float32. Threads: ``--threads`` (1 by default, the shared
machines' rule; vLLM's CPU build is bound to as many cores).

    python benchmarks/rollouts.py [--batches 1 16 64] [--new-tokens 64] [--repeats 1] [--threads 1]
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

VARIANTS = ("kd", "hf", "vllm")
PROMPT = 32


def _model_dir(scratch: Path) -> tuple[Path, str]:
    """SmolLM2-135M-Instruct from kd's cache if converted there, else a random model of its shape."""
    import torch

    try:
        from kd.pretrained import model_dir

        found = model_dir("smollm2-135m-instruct")
        if (found / "config.json").exists():
            return found, "SmolLM2-135M-Instruct (kd-pretrained)"
    except Exception:  # noqa: BLE001 - no cache entry: fall back to the random model
        pass
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                         tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    path = scratch / "random-smollm2-135m"
    LlamaForCausalLM(config).save_pretrained(path)
    return path, "random-weight Llama of SmolLM2-135M's shape"


def worker(variant: str, path: str, batches: list[int], new_tokens: int, repeats: int, threads: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    from kd.generation import GenerationConfig, generate

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    config = GenerationConfig(max_new_tokens=new_tokens, temperature=1.0, pad_token_id=0)
    info: dict = {}
    if variant == "vllm":
        from kd.rollouts import VLLMEngine, VLLMSettings

        started = time.perf_counter()
        engine = VLLMEngine(model, VLLMSettings(dtype="float32"))
        info["start s"] = time.perf_counter() - started
        info["sync s"] = engine.sync(model)

    def run(batch: int) -> None:
        g = torch.Generator().manual_seed(batch)
        prompts = torch.randint(3, vocab, (batch, PROMPT), generator=g)
        if variant == "kd":
            out = generate(model, prompts, None, config, generator=g)
        elif variant == "hf":
            with torch.no_grad():
                out = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                                     max_new_tokens=new_tokens, min_new_tokens=new_tokens, top_k=0, top_p=1.0,
                                     temperature=1.0, pad_token_id=0)
            assert out.shape == (batch, PROMPT + new_tokens)
            return
        else:
            out = engine.generate(prompts, None, config, g)
        assert out.responses.shape == (batch, new_tokens), out.responses.shape

    run(2)  # warm-up
    speeds = {}
    for batch in batches:
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            run(batch)
            times.append(time.perf_counter() - started)
        speeds[str(batch)] = batch * new_tokens / statistics.median(times)
    return {"tokens_per_s": speeds, **info}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = worker(args.worker, args.model, args.batches, args.new_tokens, args.repeats, args.threads)
        print("RESULT " + json.dumps(result), flush=True)
        return
    with tempfile.TemporaryDirectory(prefix="kd-bench-rollouts-") as scratch:
        path, what = _model_dir(Path(scratch))
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
               "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND",
                                                           "0" if args.threads == 1 else f"0-{args.threads - 1}")}
        results = {}
        for variant in args.variants:
            command = [sys.executable, __file__, "--worker", variant, "--model", str(path),
                       "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats),
                       "--threads", str(args.threads), "--batches", *map(str, args.batches)]
            proc = subprocess.run(command, env=env, capture_output=True, text=True)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode or not lines:
                print(f"{variant} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                continue
            results[variant] = json.loads(lines[-1][len("RESULT "):])
    print(f"model: {what}; prompts {PROMPT} tokens, {args.new_tokens} new tokens, temperature 1, float32, "
          f"{args.threads} thread(s), median of {args.repeats}")
    header = f"{'batch':>6}" + "".join(f"{v + ' tok/s':>14}" for v in results)
    others = [v for v in results if v != "kd"]
    if "kd" in results:
        header += "".join(f"{v + '/kd':>10}" for v in others)
    print(header)
    for batch in map(str, args.batches):
        row = f"{batch:>6}" + "".join(f"{results[v]['tokens_per_s'][batch]:>14.1f}" for v in results)
        if "kd" in results:
            kd = results["kd"]["tokens_per_s"][batch]
            row += "".join(f"{results[v]['tokens_per_s'][batch] / kd:>10.2f}" for v in others)
        print(row)
    if "vllm" in results:
        print(f"vllm engine start {results['vllm']['start s']:.1f} s, weight sync {results['vllm']['sync s']:.2f} s")


if __name__ == "__main__":
    main()
