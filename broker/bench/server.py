"""``python -m broker.bench.server --config FILE``: a real broker process with the no-op backend.

Exactly ``broker server --config FILE``, except that the bench's no-op
backend is registered first, so the bench can measure a real server process
(its start-up, its peak RSS, a SIGKILL) without a database behind the mounts.
"""

from __future__ import annotations

import argparse
import sys

from broker.bench.noop import register
from broker.server import run_server

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m broker.bench.server",
                                     description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--config", required=True, metavar="FILE")
    args = parser.parse_args(argv)
    register()
    return run_server(args.config, dev=False, dev_root_token_id=None, listen=None)


if __name__ == "__main__":
    sys.exit(main())
