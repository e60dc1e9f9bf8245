"""The errors ``vit`` reports as one line: bad input (exit status 2) and runtime faults (exit status 1).

Raise a subclass with a message that names the problem and where it is (file, key, shape or field); the
command's error boundary prints ``vit: error: <message>`` and exits with the class's ``exit_code``.
"""

from __future__ import annotations

__all__ = ["BadInputError", "RunFaultError", "VitError"]


class VitError(Exception):
    """A failure ``vit`` reports in one line, without a traceback (``--debug`` or ``VIT_DEBUG=1`` shows it)."""

    exit_code = 1


class BadInputError(VitError, ValueError):
    """Input the run cannot start or go on with (a config value, a file, an image, a checkpoint): exit status 2."""

    exit_code = 2


class RunFaultError(VitError, RuntimeError):
    """A fault while running on valid input (a full disk, an unwritable output, a lost worker): exit status 1."""

    exit_code = 1
