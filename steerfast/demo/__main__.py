"""`python -m steerfast.demo` (the same as `steerfast demo`)."""
import argparse
import sys

from .cli import add_arguments, run

if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="steerfast demo")
    add_arguments(p)
    sys.exit(run(p.parse_args()))
