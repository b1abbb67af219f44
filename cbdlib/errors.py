"""The package's one exception type: bad input, stated in one line."""


class CBDError(Exception):
    """A problem with the user's input or environment, with a one-line message.

    Command-line entry points catch it and print ``error: <message>`` without a
    traceback; anything else is a bug and keeps its traceback.
    """
