"""Benchmarks: ``python -m bench.io_bench --path DIR`` (SwapStore storage I/O against fio)."""
