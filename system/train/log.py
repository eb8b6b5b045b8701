"""Logging set-up: INFO on rank 0, WARNING elsewhere, one format for every module."""

from __future__ import annotations

import logging
import os


def init_logging(rank: int | None = None, level: int = logging.INFO) -> None:
    """Configure the root logger once; ranks other than 0 only show warnings and errors."""
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=level if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
