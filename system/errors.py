"""The project's root of *expected* errors: bad input or a bad environment, not a bug.

Every error a user can cause and fix (a config key, a data file, a checkpoint, an offload plan, a
run folder) derives from :class:`MoesysError`, besides the builtin class its callers already catch
(``ConfigError`` is also a ``ValueError``, ``CheckpointError`` a ``RuntimeError``). Entry points
(``moesys ...`` and every training rank) report a ``MoesysError`` as one line, ``error: <message>``,
with exit code 2 (1 for ``moesys ckpt``) and no traceback; any other exception is a bug and keeps its
traceback. The message alone must say what is wrong and where: the key, the file, the numbers.
"""

from __future__ import annotations


class MoesysError(Exception):
    """An expected failure with a one-line message naming the problem (see the module docstring)."""


class DataError(MoesysError, ValueError):
    """A corpus or tokenizer cannot be used: missing, unreadable, not text, malformed (names the file)."""


class RunFolderError(MoesysError):
    """A run or checkpoint folder cannot be used as asked: held by another job, holding an earlier
    run, or not writable (names the folder and the ways out)."""
