"""The one exception type for mistakes a user can make; the CLI prints it as a single line."""


class UserError(Exception):
    """Bad input from a user (config, path, argument): reported in one line, never as a traceback."""
