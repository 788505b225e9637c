"""The error family that the command line reports as a message, not a traceback."""


class SearchgymError(Exception):
    """Bad input or a missing resource: the message says what is wrong and what to do about it."""
