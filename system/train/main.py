"""Entry point of one training rank: ``python -m system.train.main --config FILE [--section.key value ...]``.

Launched by torchrun (``moesys train`` builds the command). Exit code 2 on a configuration error.
"""

from __future__ import annotations

import argparse
import logging
import sys

from system.config.loader import ConfigError, load_config
from system.train.log import init_logging

logger = logging.getLogger("system.train")


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, train, clean up; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="system.train.main", description=__doc__)
    parser.add_argument("--config", default=None, help="TOML job file (defaults when omitted)")
    args, overrides = parser.parse_known_args(argv)
    init_logging()
    try:
        cfg = load_config(args.config, overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from system.distributed.init import shutdown_distributed
    from system.train.trainer import Trainer

    Trainer(cfg).run()  # on an exception torchrun tears the other ranks down; no collective teardown here
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
