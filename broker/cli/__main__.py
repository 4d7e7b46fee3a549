"""``python -m broker.cli``."""

from __future__ import annotations

import sys

from broker.cli.app import main

sys.exit(main())
