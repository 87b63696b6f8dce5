"""The ``rlkern`` command: ``rlkern bench`` (benchmarks), ``rlkern aot-report`` (GPU code
compiled ahead of time: registers, spills, shared memory), ``rlkern demo`` (a GRPO loop on
CPU that learns a toy task) and ``rlkern gpu-check`` (tests and timings on a CUDA machine in
one run; ``--dry-run`` on CPU)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlkern", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    from rlkern.aot import add_arguments as add_aot_arguments
    from rlkern.bench import cli as bench_cli
    from rlkern.bench.cli import add_arguments as add_bench_arguments
    from rlkern.demo import add_arguments as add_demo_arguments

    add_bench_arguments(sub.add_parser(
        "bench", help="time rlkern against its peers", description=bench_cli.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter))
    add_aot_arguments(sub.add_parser("aot-report", help="compile GPU kernels ahead of time "
                                                       "and report their resource usage"))
    add_demo_arguments(sub.add_parser("demo", help="train a tiny model with GRPO on a toy task "
                                                   "(CPU, a few minutes); plot its reward"))
    from rlkern import gpu_check

    gpu_check.add_arguments(sub.add_parser(
        "gpu-check", help="validate on a CUDA machine: tests on CUDA tensors, timings against "
        "peers and the bandwidth floor, one JSON + Markdown report (--dry-run: on CPU)",
        description=gpu_check.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
