"""The one exception type for user errors.

Anything a user can cause by what they pass in (a missing file, a corrupt
shard, a tensor of the wrong shape, an unknown architecture, a bad flag value)
raises :class:`MtijaxError` with one line that says what and where. The CLI
prints that line and exits non-zero without a traceback; every other exception
is a bug in mtijax and keeps its traceback.
"""


class MtijaxError(Exception):
    """A user error: the message is one line that names what is wrong and where."""
