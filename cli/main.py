"""Entry point of ``offload-train``. Errors users can act on print one line and exit 2."""

from __future__ import annotations

import argparse
import logging
import sys

from offload.errors import OffloadError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="offload-train",
        description="Out-of-core fine-tuning: stream a causal LM through GPU, CPU RAM and NVMe.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a small model through NVMe on shipped text (no download)")
    demo.add_argument("--steps", type=int, default=60, help="optimizer steps (default 60)")
    demo.add_argument("--nvme-path", default=None, help="swap directory (default: a new temp dir)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from offload.hostmem import tune_malloc

    tune_malloc()  # large freed blocks go back to the OS: resident memory tracks the budgets
    try:
        if args.command == "demo":
            from cli.demo import run_demo

            return run_demo(args.steps, args.nvme_path)
    except OffloadError as err:
        print(f"offload-train: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("offload-train: interrupted", file=sys.stderr)
        return 130
    return 1
