"""The first line of an error: what every one-line message for users is made of."""


def first_line(exc: BaseException) -> str:
    """The first line of `exc`'s message, or its type's name when the message is empty."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
