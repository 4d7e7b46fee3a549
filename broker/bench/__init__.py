"""``broker bench``: measure the broker against its speed and scale targets.

Each scenario starts what it needs (real broker processes on loopback ports,
fresh stores, PostgreSQL databases), measures the broker side by side with a
baseline from the same run, and stops by itself. See docs/performance.md.

Importing this package is cheap; the scenarios load when ``main`` runs.
"""

from __future__ import annotations

import argparse

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from broker.bench.runner import add_arguments as add

    add(parser)


def main(args: argparse.Namespace) -> int:
    from broker.bench.runner import main as run

    return run(args)
