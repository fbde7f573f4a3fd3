"""steerfast benchmarks, run from the repository root. Results go to bench/out/<name>.json.

On a GPU machine, after the install, start with `python -m bench check`.
"""
# A subcommand is bench/<name>.py with a module docstring, add_arguments(parser) and run(args) -> int,
# listed in SUBCOMMANDS.
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "check": "after a GPU install: GPU tests, memcheck and short benches, one pass/fail table (~5 min)",
    "decode": "decode throughput and latency: steerfast vs HF transformers vs the bandwidth floor",
    "kernels": "SAE encode / controller kernels per backend vs cuBLAS+topk and copy bandwidth; steering overhead",
    "hybrid": "sf.Hybrid (base + thinking model, SAE-gated steering) vs a naive transformers hybrid and the paper's loop",
    "count": "kernels and bytes of a decode step and a hybrid step at real shapes, counted on the CPU (no GPU)",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="SUBCOMMAND")
    for name, help_ in SUBCOMMANDS.items():
        mod = importlib.import_module(f"bench.{name}")
        sp = sub.add_parser(name, help=help_, description=mod.__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(sp)
        sp.set_defaults(fn=mod.run)
    args = p.parse_args(argv)
    args.argv = argv  # recorded in the JSON as the exact command line
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
