"""The package's one exception type: bad input, stated in one line."""


class CBDError(Exception):
    """A problem with the user's input or environment, with a one-line message.

    Command-line entry points catch it and print ``error: <message>`` without a
    traceback; anything else is a bug and keeps its traceback.
    """


def one_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's message for a one-line error: its first non-empty line, at most ``limit``
    characters (the exception's type when it has no message)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
