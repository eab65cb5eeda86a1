"""User-facing errors.

Raise BrushworkError for any problem the user can fix (bad input, missing file, wrong config).
The CLI prints its message as one line and exits non-zero; no traceback is shown.
"""


class BrushworkError(Exception):
    """A problem the user can fix; its message says what is wrong and, where possible, what to do."""
