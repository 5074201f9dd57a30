"""The one error type users see: a single line naming the problem and the fix."""


class KvxError(Exception):
    """User-facing error. ``str(err)`` is one line; the CLI prints it and exits with code 2."""

    exit_code = 2
