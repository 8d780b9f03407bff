"""One exception type for mistakes a user can fix; entry points print it as a single line and exit 2."""


class UserError(Exception):
    """Bad input (flag, source, file, credentials). The message names the culprit and what to do."""
