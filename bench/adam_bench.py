"""CPU AdamW implementations on this machine: speed, and how much a concurrent Python thread runs.

    python -m bench.adam_bench [--numel 50000000]

Prints one JSON line per implementation and the choice ``optimizer_impl: auto`` makes here.
"""

from __future__ import annotations

import argparse
import json
import logging

from offload.optim import choose_impl, measure_impl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--numel", type=int, default=50_000_000, help="fp32 parameters per step")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    for impl in ("torch", "deepspeed"):
        m = measure_impl(impl, numel=args.numel, repeats=args.repeats)
        print(json.dumps({"impl": impl, "numel": args.numel, "s_per_step": round(args.numel / m.params_per_s, 4),
                          "params_per_s": round(m.params_per_s), "thread_share": round(m.thread_share, 3)}))
    chosen, _ = choose_impl("auto")
    print(json.dumps({"auto_choice": chosen}))


if __name__ == "__main__":
    main()
