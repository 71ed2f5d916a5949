"""The one exception type the command line turns into a one-line message, and how to tell an
out-of-memory error. Hiding secrets in messages: :mod:`hpo.secrets`."""

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
    # cuBLAS failing to allocate its workspace is an out-of-memory error too (a new handle on a full GPU)
    return isinstance(error, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message
                                                or "cublas_status_alloc_failed" in message)
