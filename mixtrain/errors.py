"""The one exception type for mistakes a user can fix (a wrong override, a missing
file, an existing run directory). Commands print its message without a traceback."""


class UserError(Exception):
    """A problem with the user's input; the message says which key/file and what to do."""
