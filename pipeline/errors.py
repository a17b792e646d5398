"""The one exception type for user errors: the CLI prints its message on one line and exits 2."""


class UserError(Exception):
    """A problem with the user's input (path, file, option), not a bug: reported without a traceback."""


class Interrupted(Exception):
    """The user stopped a run (Ctrl-C); the message says how to resume. The CLI exits 130."""
