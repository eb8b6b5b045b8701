"""``[comm]`` section: collective timeouts (TorchTitan's keys), the hang detector of a training job."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CommConfig:
    """How long a collective may wait for a peer before the job fails (and torchrun or Ray restarts it).

    A rank that hangs (a stopped process, a dead node that still holds its sockets, a deadlock) leaves
    its peers blocked in their next collective; the timeout turns that into an error on every peer,
    so the launcher can restart the job from its newest checkpoint instead of waiting forever.
    """

    init_timeout_seconds: int = field(
        default=600,
        metadata={"help": "Collective timeout (s) from start-up through the first step (rendezvous, model "
                  "build, checkpoint load, first compile) and for the final evaluation and export."},
    )
    train_timeout_seconds: int = field(
        default=300,
        metadata={"help": "Collective timeout (s) of the training and mesh groups after the first step: a "
                  "peer that stops answering for this long fails the job (hang detection)."},
    )

    def validate(self) -> None:
        """Raise ``ValueError`` naming the key when a value is out of range."""
        for key in ("init_timeout_seconds", "train_timeout_seconds"):
            if getattr(self, key) < 1:
                raise ValueError(f"comm.{key} must be >= 1 second, got {getattr(self, key)}")
