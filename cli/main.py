"""Entry point of ``offload-train``. Errors users can act on print one line and exit 2."""

from __future__ import annotations

import argparse
import errno
import logging
import sys

from safetensors import SafetensorError

from offload.errors import OffloadError, first_line


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
    for name, text in (("train", "train a model from a YAML config"),
                       ("plan", "print where each tensor group will live, and write plan.json")):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("config", help="YAML file with sections model, data, train, offload")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a config key (repeatable), e.g. --set train.max_steps=10")
        p.add_argument("--profile", default=None, metavar="PROFILE.json",
                       help="plan with this hardware profile (a file from offload-train profile, or written "
                            "by hand for another machine; its RAM, VRAM and disk figures are used too)")
        if name == "train":
            p.add_argument("--plan", default=None, help="replay a saved plan.json instead of planning")
    prof = sub.add_parser("profile", help="measure SSD, PCIe, CPU Adam and matmul speed here (cached)")
    prof.add_argument("--nvme-path", default=".", help="directory on the SSD to measure (default: .)")
    prof.add_argument("--size", default="1GiB",
                      help="size of the SSD test's file (default 1GiB, at least 128MiB): written, read, and half "
                           "read while half is written, three rounds each")
    prof.add_argument("--io-backend", default="auto", choices=["auto", "posix", "kvikio", "aio"])
    prof.add_argument("--cached", action="store_true", help="print the cached profile if there is one")
    export = sub.add_parser("export", help="write a run's latest checkpoint (or the one named) in Hugging Face format")
    export.add_argument("run_dir", help="the run folder (train.output_dir), or one of its checkpoints/step-N")
    export.add_argument("out_dir", help="where to write the model")
    export.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="weights dtype (default: the model's)")
    export.add_argument("--merge", action="store_true",
                        help="a LoRA run: the base with the adapter merged in (default: the adapter folder)")
    clean = sub.add_parser("clean", help="show what a run's swap holds and give the space back (dry run "
                                         "unless --yes)")
    clean.add_argument("run_dir", help="the run folder (train.output_dir)")
    clean.add_argument("--keep-last", action="store_true",
                       help="keep the newest checkpoint resumable (its swap compacted); default: remove the "
                            "swap and every checkpoint, once final/ exists")
    clean.add_argument("--yes", action="store_true", help="act (default: only report what would be removed)")
    clean.add_argument("--nvme-path", default=None, help="the run's swap folder (default: from its config.yaml)")
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
        if args.command in ("train", "plan"):
            from cli.config import load_config

            cfg = load_config(args.config, args.overrides)
            if args.command == "train":
                from cli.train import run_train

                return run_train(cfg, args.plan, args.profile)
            from cli.train import run_plan

            return run_plan(cfg, args.profile)
        if args.command == "profile":
            from cli.config import parse_size
            from scheduler.layer_probe import clear_probe_cache
            from scheduler.profile import cache_path, load_or_measure

            profile = load_or_measure(args.nvme_path, refresh=not args.cached, size_bytes=parse_size(args.size),
                                      io_backend=args.io_backend)
            if not args.cached:
                clear_probe_cache()  # layer timings taken on the machine as it was
            print(profile.table())
            print(f"profile cached at {cache_path(args.nvme_path)}")
            return 0
        if args.command == "clean":
            from pathlib import Path

            from cli.clean import run_clean

            return run_clean(Path(args.run_dir), Path(args.nvme_path) if args.nvme_path else None,
                             args.keep_last, args.yes)
        if args.command == "export":
            from pathlib import Path

            from cli.export import export_run

            out = export_run(Path(args.run_dir), Path(args.out_dir), args.dtype, merge=args.merge)
            print(f"exported to {out}")
            return 0
    except OffloadError as err:
        print(f"offload-train: error: {err}", file=sys.stderr)
        return 2
    except MemoryError:
        print("offload-train: error: out of host memory; lower offload.cpu_memory_limit or the batch size",
              file=sys.stderr)
        return 2
    except OSError as err:
        print(f"offload-train: error: {os_error_line(err, args.command)}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        if "out of memory" not in str(err).lower():
            raise
        print("offload-train: error: out of GPU memory; lower offload.gpu_memory_limit or the batch size",
              file=sys.stderr)
        return 2
    except SafetensorError as err:  # a safetensors file it cannot read or write (full disk, truncated)
        print(f"offload-train: error: {first_line(err)}; free space if the disk is full, or copy the damaged "
              f"safetensors file again, then run {args.command} again", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("offload-train: interrupted", file=sys.stderr)
        return 130
    return 1


ERRNO_ADVICE = {
    errno.ENOTDIR: "a part of the path is a file, not a folder: give a path through folders",
    errno.EEXIST: "a file is in the way of a folder to create: move it or give another path",
    errno.EISDIR: "a folder is where a file was expected: give the file's path",
    errno.ENAMETOOLONG: "shorten the path",
    errno.ELOOP: "the path has a symbolic link loop: fix the link",
    errno.EIO: "the disk reported an I/O error: check it (dmesg) or use another disk",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n)",
    errno.ENFILE: "too many open files: raise the limit (ulimit -n)",
}


def os_error_line(err: OSError, command: str) -> str:
    """One line for any OSError: its text and file(s), and what to do."""
    names = [str(n) for n in (err.filename, err.filename2) if n]
    where = f" ({' -> '.join(names)})" if names else ""
    what = err.strerror or first_line(err)
    then = (", then resume with train.resume_from_checkpoint: auto" if command == "train" else
            f", then run {command} again")
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.ENOENT):
        return f"{what}{where}; free space or fix the path{then}"
    advice = ERRNO_ADVICE.get(err.errno, "fix the path or the disk")
    return f"{what}{where}; {advice}{then}"
