"""User-facing errors.

Every mistake a user can make (unknown model, bad layer, empty prompt set, wrong vector width,
non-finite values, ...) is raised as a :class:`WorkbenchError` with a message that says what was
wrong and what is valid. The CLI prints these messages without a traceback.
"""

from __future__ import annotations


class WorkbenchError(ValueError):
    """A clear, user-facing error (bad input, missing model, offline hub access, ...)."""
