"""The one error type users see: what went wrong, and what to do about it."""

from __future__ import annotations


class AttncError(Exception):
    """A user-facing error: ``problem`` says what is wrong, ``fix`` what to do.

    The CLI prints ``error: <problem> (<fix>)`` on one line and exits with code 2;
    library callers can catch it and read both parts.
    """

    exit_code = 2

    def __init__(self, problem: str, fix: str = "") -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} ({fix})" if fix else problem)


class ValidationFailed(AttncError):
    """Outputs of a compiled artefact differ from PyTorch beyond tolerance (exit code 1)."""

    exit_code = 1
