"""Peak memory and time of a divergence with token selection (TIP) keeping 100, 50 and 10%
of the tokens, in the plain path (full logits; the divergence is computed on the kept rows
only) and the chunked path (the kept rows' logits are the only ones built with a graph).

Each measurement runs in its own process (``benchmarks/loss_memory.py``'s worker, same
memory and timing method), forward + backward from hidden states.

    python benchmarks/token_selection.py                     # V = 49,152, N = 2,048, H = 576, JSD
    python benchmarks/token_selection.py --select overconfident --keeps 1 0.5 0.1 --vocab 262144
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from loss_memory import common_parser, measure  # noqa: E402


def main() -> None:
    parser = common_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--keeps", type=float, nargs="+", default=[1.0, 0.5, 0.1])
    parser.add_argument("--select-by", dest="select_by", default="entropy",
                        choices=["entropy", "overconfident", "both"])
    parser.set_defaults(vocab=[49152], divergences=["jsd"], variants=["plain", "chunked"])
    args = parser.parse_args()
    print(f"# N = {args.tokens}, H = {args.hidden}, {args.dtype} on {args.device}; select={args.select_by}; "
          f"forward + backward, median of {args.repeats}; peak = memory above the inputs'")
    for vocab in args.vocab:
        for divergence in args.divergences:
            print(f"\nV = {vocab:,}, {divergence}")
            print(f"{'kept':>6}" + "".join(f"{v + ' MB':>14}{v + ' s':>10}" for v in args.variants)
                  + "".join(f"{v + ' MB vs 100%':>20}" for v in args.variants))
            full: dict[str, dict] = {}
            for keep in args.keeps:
                select = "all" if keep >= 1.0 else args.select_by
                row = {v: measure(args, v, divergence, vocab, select, keep) for v in args.variants}
                if keep >= 1.0:
                    full = row
                cells = "".join(f"{r['peak_mb']:>14,.0f}{r['time_s']:>10.2f}" if "error" not in r
                                else f"{r['error'][:22]:>24}" for r in row.values())
                ratios = "".join(
                    f"{row[v]['peak_mb'] / full[v]['peak_mb']:>20.3f}"
                    if "peak_mb" in row[v] and full.get(v, {}).get("peak_mb") else f"{'-':>20}"
                    for v in args.variants)
                print(f"{keep:>6.0%}{cells}{ratios}", flush=True)


if __name__ == "__main__":
    main()
