"""The one exception type the command line turns into a one-line message."""

from __future__ import annotations


class HpoError(Exception):
    """A problem the user can fix: the message names the file/field and what to do.

    The CLI prints ``error: <message>`` on one line and exits with status 2, with no
    traceback unless ``--debug`` is given. Raise it before anything is written.
    """


def is_out_of_memory(error: BaseException) -> bool:
    """An allocation failure: ``torch.OutOfMemoryError`` (GPU, and some CPU paths), a CPU
    allocator's RuntimeError, or Python's MemoryError. No torch import needed."""
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return True
    message = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message)


def redact_url(url: str) -> str:
    """The URL with its password (``scheme://user:password@host/...``) replaced by ``***``:
    the one way storage URLs and tracking URIs are shown in output, errors, tags and params."""
    if "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    netloc, slash, path = rest.partition("/")
    if "@" not in netloc:
        return url
    credentials, host = netloc.rsplit("@", 1)
    user = credentials.split(":", 1)[0]
    hidden = f"{user}:***" if ":" in credentials else user
    return f"{scheme}://{hidden}@{host}{slash}{path}"
