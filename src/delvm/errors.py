"""The one exception type for problems a user can fix (bad input, wrong config, missing file).

The CLI turns it into a one-line message and a non-zero exit; everything else is a bug and
keeps its traceback.
"""


class DelvmError(Exception):
    """A user-facing error: the message names the file or setting and says how to fix it."""
