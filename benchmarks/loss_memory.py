"""Peak memory and time of one divergence forward + backward from hidden states: the plain
way (full logits), kd's fused path (whole rows and vocabulary tiles), TRL's chunked kernel
and Liger's fused linear JSD.

Each measurement runs in its own process (the script re-invokes itself with ``--worker``),
so peak memory is that variant's alone: on CPU the growth of the process's peak resident
set (``ru_maxrss``) over its value once the inputs exist, on CUDA
``torch.cuda.max_memory_allocated`` over the memory the inputs hold. Time is the median of
``--repeats`` forward + backward passes after one warm-up pass (``--repeats 0``: the time of
that first pass, for runs too long to repeat).

Variants, for student hidden states ``(N, H)`` with head ``(V, H)`` and a teacher with
its own ``(N, H)`` and ``(V, H)``:

* ``plain``: ``logits = h @ W.T`` for both models (the teacher's under no_grad) and the
  plain divergence of :mod:`kd.divergences` on them;
* ``chunked``: kd's fused path, :func:`kd.divergences.chunked_divergence` (default block
  and tile sizes: whole rows at these sizes), closed-form block gradients;
* ``compiled``: the fused path with its compiled block function (``compile=true``,
  :mod:`kd.compiled`: inductor fuses each block's elementwise work); the first pass, which
  compiles, runs before the measurement and the peak memory is reset after it (Linux
  ``/proc/self/clear_refs``), so the figures are the compiled steady state;
* ``tiled``: the same with vocabulary tiles of ``--tile-size`` entries (two or three passes
  over the tiles per block);
* ``trl``: ``trl.kernels.chunked_divergence.ChunkedDivergenceFunction`` (forward KL,
  reverse KL and JSD only: its ``beta`` selects among them), mean over tokens; run by
  ``--trl-python`` (a virtual environment with trl, e.g. ``python -m venv`` plus
  ``pip install --no-deps trl==1.16.*`` and a ``.pth`` file naming this one's site-packages);
* ``liger``: ``liger_kernel``'s ``LigerFusedLinearJSD`` (Triton, so CUDA only; JSD and
  its two ends).

    python benchmarks/loss_memory.py                       # V = 49,152 and 262,144, N = 2,048, H = 576
    python benchmarks/loss_memory.py --vocab 49152 --divergences jsd forward_kl
    python benchmarks/loss_memory.py --device cuda --dtype bfloat16 --tokens 8192 --vocab 262144 \
        --divergences forward_kl reverse_kl jsd
    python benchmarks/loss_memory.py --trl-python /tmp/trl-venv/bin/python --max-gb 16 --repeats 0
    python benchmarks/loss_memory.py --vocab 49152 --variants chunked compiled --divergences jsd forward_kl

The table gives, per vocabulary and divergence, each variant's peak MB and seconds and the
ratios of kd's fused path to the plain way and to TRL (the targets, issue 27: on CPU fused
time <= 0.8x plain and <= 0.5x TRL's, peak <= 1/10 of plain; on an H200 time and peak at most
TRL's Triton kernel's). A variant that fails (out of memory, not installed, not supported)
shows why instead of a number; ``--max-gb`` caps each worker's address space so a plain
variant that would not fit fails with an out-of-memory error instead of starving the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]
BETA = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": 0.5}  # TRL's and Liger's beta for the divergences they have
VARIANTS = ["plain", "chunked", "compiled", "tiled", "trl", "liger"]


def _rss_mb() -> float:
    """The process's peak resident set (VmHWM, which :func:`_reset_peak` resets; else ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _reset_peak() -> None:
    """Reset the peak resident set to the current one (Linux; elsewhere nothing happens)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def worker(args: argparse.Namespace) -> dict:
    import torch

    if args.max_gb:
        limit = int(args.max_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    n, h, v = args.tokens, args.hidden, args.vocab
    hs = (torch.randn(n, h, device=device, dtype=dtype) * 0.5).requires_grad_()
    ws = (torch.randn(v, h, device=device, dtype=dtype) * 0.05).requires_grad_()
    ht = torch.randn(n, h, device=device, dtype=dtype) * 0.5
    wt = torch.randn(v, h, device=device, dtype=dtype) * 0.05
    step = _step(args.variant, args.divergence, hs, ws, ht, wt, args.temperature, args.select, args.keep,
                 args.chunk_size, args.tile_size)

    def run() -> float:
        hs.grad = ws.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = step()
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    if args.variant == "compiled":  # compile first, outside the measurement
        import torch._inductor.config as inductor_config

        import kd.chunked

        inductor_config.compile_threads = 1  # no worker pool (and its memory) for one graph
        run()
        if kd.chunked._COMPILED_ROWS.failed:
            raise NotImplementedError(f"compile failed: {kd.chunked._COMPILED_ROWS.failed}")
        hs.grad = ws.grad = None
        _reset_peak()
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        base = _rss_mb()
        first = run()
        peak = _rss_mb() - base
    if device.type == "cuda":
        first = 0.0
    times = [run() for _ in range(args.repeats)] or [first]
    return {"peak_mb": peak, "time_s": statistics.median(times)}


def _step(variant: str, divergence: str, hs, ws, ht, wt, temperature: float, select: str = "all",
          keep: float = 1.0, chunk_size: int | None = None, tile_size: int = 16384):
    import torch

    import kd.divergences as D

    if variant == "plain":
        module = D.DIVERGENCES[divergence](chunked=False, select=select, keep=keep)

        def step():
            with torch.no_grad():
                teacher = ht @ wt.T
            return module(hs @ ws.T, teacher, temperature=temperature)

        return step
    if variant in ("chunked", "tiled", "compiled"):
        module = D.DIVERGENCES[divergence](select=select, keep=keep, chunk_size=chunk_size or None,
                                           tile_size=tile_size if variant == "tiled" else None,
                                           compile=variant == "compiled")
        return lambda: D.chunked_divergence(hs, ws, ht, wt, module, temperature=temperature)
    if divergence not in BETA:
        raise NotImplementedError(f"{variant} has no {divergence}")
    beta = BETA[divergence]
    if variant == "trl":
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

        def step():
            per_token, _ = ChunkedDivergenceFunction.apply(hs, ws, None, ht, wt, None, beta, temperature)
            return per_token.mean()

        return step
    if variant == "liger":
        from liger_kernel.transformers import LigerFusedLinearJSD

        if hs.device.type != "cuda":
            raise NotImplementedError("Liger's kernels are Triton, CUDA only")
        loss = LigerFusedLinearJSD(jsd_beta=beta, temperature=temperature)
        return lambda: loss(hs, ws, ht, wt, None)
    raise ValueError(f"unknown variant {variant}")


def measure(args: argparse.Namespace, variant: str, divergence: str, vocab: int, select: str = "all",
            keep: float = 1.0) -> dict:
    """One variant's ``{"peak_mb", "time_s"}`` (or ``{"error"}``), measured in a process of its own."""
    python = args.trl_python if variant == "trl" and getattr(args, "trl_python", None) else sys.executable
    cmd = [python, os.path.abspath(__file__), "--worker", "--variant", variant, "--divergence", divergence,
           "--vocab", str(vocab), "--tokens", str(args.tokens), "--hidden", str(args.hidden), "--device", args.device,
           "--dtype", args.dtype, "--repeats", str(args.repeats), "--temperature", str(args.temperature),
           "--threads", str(args.threads), "--select", select, "--keep", str(keep), "--chunk-size", str(args.chunk_size),
           "--tile-size", str(args.tile_size), "--max-gb", str(args.max_gb)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("{"):
            return json.loads(line)
    tail = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
    if proc.returncode in (-9, 137) or "memory" in tail.lower():
        tail = "out of memory"
    return {"error": tail[:60]}


def common_parser(description: str = __doc__.split("\n\n")[0]) -> argparse.ArgumentParser:
    """The options of this script (token_selection.py shares them)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--vocab", type=int, nargs="+", default=[49152, 262144])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--divergences", nargs="+", default=DIVERGENCES, choices=DIVERGENCES)
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--chunk-size", dest="chunk_size", type=int, default=0,
                        help="positions per block of the chunked path (0: kd's default, kd.chunked.default_chunk_size)")
    parser.add_argument("--tile-size", dest="tile_size", type=int, default=16384,
                        help="vocabulary entries per tile of the tiled variant")
    parser.add_argument("--trl-python", dest="trl_python", default=None,
                        help="the Python interpreter (a venv with trl) that runs the trl variant")
    parser.add_argument("--max-gb", dest="max_gb", type=float, default=0,
                        help="cap each worker's address space at this many GiB (0: none)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--divergence", help=argparse.SUPPRESS)
    parser.add_argument("--select", default="all", help=argparse.SUPPRESS)
    parser.add_argument("--keep", type=float, default=1.0, help=argparse.SUPPRESS)
    return parser


def main() -> None:
    args = common_parser().parse_args()
    if args.worker:
        args.vocab = args.vocab[0]
        try:
            print(json.dumps(worker(args)))
        except (ImportError, NotImplementedError) as e:
            print(json.dumps({"error": str(e).splitlines()[0][:60]}))
        return

    print(f"# N = {args.tokens} positions, H = {args.hidden}, {args.dtype} on {args.device}; forward + backward, "
          f"{'median of ' + str(args.repeats) if args.repeats else 'first pass'}; peak = memory above the inputs'")
    results = []
    for vocab in args.vocab:
        print(f"\nV = {vocab:,}")
        head = f"{'divergence':<16}" + "".join(f"{v + ' MB':>14}{v + ' s':>10}" for v in args.variants)
        print(head + f"{'fused/plain mem':>17}{'time':>7}{'fused/trl mem':>15}{'time':>7}"
              f"{'compiled/fused mem':>20}{'time':>7}{'compiled/plain time':>21}{'compiled/trl time':>19}")
        for divergence in args.divergences:
            row = {v: measure(args, v, divergence, vocab) for v in args.variants}
            results.append({"vocab": vocab, "divergence": divergence, **row})
            cells = ""
            for v in args.variants:
                r = row[v]
                cells += (f"{r['peak_mb']:>14,.0f}{r['time_s']:>10.2f}" if "error" not in r
                          else f"{r['error'][:22]:>24}")

            def ratio(a: str, b: str, key: str) -> str:
                ra, rb = row.get(a, {}), row.get(b, {})
                if key in ra and key in rb and rb[key] > 0:
                    return f"{ra[key] / rb[key]:.3f}"
                return "-"

            print(f"{divergence:<16}{cells}{ratio('chunked', 'plain', 'peak_mb'):>17}"
                  f"{ratio('chunked', 'plain', 'time_s'):>7}{ratio('chunked', 'trl', 'peak_mb'):>15}"
                  f"{ratio('chunked', 'trl', 'time_s'):>7}{ratio('compiled', 'chunked', 'peak_mb'):>20}"
                  f"{ratio('compiled', 'chunked', 'time_s'):>7}{ratio('compiled', 'plain', 'time_s'):>21}"
                  f"{ratio('compiled', 'trl', 'time_s'):>19}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
