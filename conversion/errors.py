"""The one exception the converter raises for bad input."""


class ConversionError(ValueError):
    """Bad input for the converter; its message is one line: what was expected, what was found, what to do."""


__all__ = ["ConversionError"]
