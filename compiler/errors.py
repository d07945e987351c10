"""The one error type users see: what went wrong, and what to do about it."""

from __future__ import annotations

import json
from pathlib import Path


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


def read_json(path, default_name: str, what: str, fix: str) -> tuple[Path, object]:
    """``(file, data)`` of a JSON file a user named: ``path`` itself, or ``path / default_name`` for a directory.

    Raises:
        AttncError: "cannot read ``what`` from ..." with ``fix``, when the file is missing or no JSON.
    """
    path = Path(path).expanduser()
    file = path / default_name if path.is_dir() else path
    try:
        return file, json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise AttncError(f"cannot read {what} from {path} ({type(exc).__name__}: {exc})", fix) from None
