"""Errors users see. The CLI prints their message on one line and exits with `exit_code`."""


class LatheError(Exception):
    exit_code = 1


class BadInput(LatheError, ValueError):
    """Bad path, corrupt file, unknown recipe or field, NaN in weights... (exit code 2)."""

    exit_code = 2


class ValidationFailed(LatheError):
    """An export or a compressed model failed its numerical check (exit code 3)."""

    exit_code = 3
