"""``python -m bench run --suite quick|full``: offload-train against in-memory PyTorch and
DeepSpeed ZeRO-Infinity on the same model, data and batches, against this machine's limits.

``python -m bench worker ...`` runs one engine (the harness starts one process per engine).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.suite import SUITES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a suite: every engine, fio, matmul; report and plots")
    run.add_argument("--suite", choices=sorted(SUITES), default="quick",
                     help="quick: 187M parameters, 4-7 minutes on 2 CPU cores; small: 134M, 512 tokens per "
                          "step, 32k vocabulary; full: 374M; "
                          "tiny: seconds, to try the harness (default quick)")
    run.add_argument("--path", type=Path, default=Path("runs/bench"),
                     help="directory on the SSD under test: swap files and fio's file (default runs/bench)")
    run.add_argument("--out", type=Path, default=None, help="report directory (default <path>/report-<suite>)")
    run.add_argument("--engines", default=None,
                     help="comma-separated subset of offload-train, offload-train-sync, pytorch, "
                          "zero-infinity (default: all; offload-train-sync only without a GPU)")
    run.add_argument("--no-plots", action="store_true", help="skip the PNG plots (no matplotlib needed)")
    worker = sub.add_parser("worker", help=argparse.SUPPRESS)
    worker.add_argument("--engine", required=True)
    worker.add_argument("--suite", choices=sorted(SUITES), required=True)
    worker.add_argument("--swap", type=Path, required=True)
    worker.add_argument("--out", type=Path, required=True)
    worker.add_argument("--trace", type=Path, default=None)
    worker.add_argument("--plan", type=Path, default=None, help="plan.json for offload-train engines")
    args = parser.parse_args(argv)
    if args.command == "worker":
        from bench.workers import run_engine

        run_engine(args.engine, SUITES[args.suite], args.swap, args.out, args.trace, args.plan)
        return 0
    from bench.harness import default_engines, run_suite

    engines = [e for e in args.engines.split(",") if e] if args.engines else default_engines()
    out = args.out or args.path / f"report-{args.suite}"
    return run_suite(SUITES[args.suite], args.path, out, engines, plots=not args.no_plots)


if __name__ == "__main__":
    sys.exit(main())
