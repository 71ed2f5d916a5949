"""The one exception type the command line turns into a one-line message."""

from __future__ import annotations


class HpoError(Exception):
    """A problem the user can fix: the message names the file/field and what to do.

    The CLI prints ``error: <message>`` on one line and exits with status 2, with no
    traceback unless ``--debug`` is given. Raise it before anything is written.
    """
