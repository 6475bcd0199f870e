"""User-facing errors.

`XTIError` carries a one-line message that names the file or field at fault and what to do. The CLI
prints it as ``error: <message>`` and exits non-zero; library callers can catch it.
"""


class XTIError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""
