"""One exception type for mistakes a user can fix; entry points print it as a single line and exit 2."""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """Bad input (flag, source, file, credentials). The message names the culprit and what to do."""


def exit_status(entry: Callable[[], object]) -> int:
    """Run an entry point: 0 on success; a UserError becomes `error: <message>` on stderr and status 2."""
    try:
        entry()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
