"""The one error type users see: a single line that says what to fix."""


class CollmError(ValueError):
    """Bad input or a broken setup. The CLI prints the message alone, without a traceback."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
