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
    # cuBLAS failing to allocate its workspace is an out-of-memory error too (a new handle on a full GPU)
    return isinstance(error, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message
                                                or "cublas_status_alloc_failed" in message)


HIDDEN = "***"
# Query-string keys whose values are secrets (``?password=...``, ``?sslpassword=...``, tokens).
_SECRET_KEYS = ("pass", "pwd", "secret", "token", "key", "auth", "cred")


def redact_url(url: str) -> str:
    """The URL as it may be shown: password and secret query values replaced by ``***``.

    The one way storage URLs and tracking URIs appear in output, errors, MLflow tags and
    study attrs. Parsed with SQLAlchemy's URL parser (as the storage itself parses it), so
    ``postgresql://hpo:ab/cd@db/optuna`` and ``?password=...`` are hidden too; a URL that
    does not parse shows ``***`` wherever a secret might be (user info, query string).
    """
    if "://" not in url:
        return url
    try:
        from sqlalchemy.engine import make_url

        if url.split("://", 1)[1].split("?", 1)[0].count("@") > 1:
            raise ValueError("ambiguous user info")  # an unencoded '@' in the password
        parsed = make_url(url)
        query = {k: HIDDEN if _is_secret_key(k) else v for k, v in parsed.query.items()}
        shown = parsed.set(query=query).render_as_string(hide_password=True)
        return shown.replace("%2A%2A%2A", HIDDEN)
    except Exception:  # noqa: BLE001 - anything unparseable: hide all that could be a secret
        scheme, rest = url.split("://", 1)
        address = rest.split("?", 1)[0]
        if "@" in address:
            address = f"{HIDDEN}@{address.rsplit('@', 1)[1]}"
        return f"{scheme}://{address}" + (f"?{HIDDEN}" if "?" in rest else "")


def check_url(url: str, flag: str) -> None:
    """Refuse a URL whose user info is ambiguous (an unencoded ``@`` in the password) or
    that SQLAlchemy cannot parse, before anything connects: a driver's error would quote a
    piece of the password. The message shows ``***`` and says how to encode it."""
    if "://" not in url:
        return
    try:
        from sqlalchemy.engine import make_url

        make_url(url)
        parsed = url.split("://", 1)[1].split("?", 1)[0].count("@") <= 1
    except Exception:  # noqa: BLE001
        parsed = False
    if not parsed:
        raise HpoError(f"{flag} {redact_url(url)}: not a valid URL; percent-encode special characters in the "
                       "user name and password ('@' as %40, ':' as %3A, '/' as %2F, '%' as %25)")


def url_secrets(url: str | None) -> list[str]:
    """The secret parts of ``url`` (password as written and decoded, secret query values,
    or the whole user info and query of a URL that does not parse), longest first."""
    if not url or "://" not in url:
        return []
    from urllib.parse import unquote

    found: set[str] = set()
    rest = url.split("://", 1)[1]
    try:
        from sqlalchemy.engine import make_url

        if rest.split("?", 1)[0].count("@") > 1:
            raise ValueError("ambiguous user info")  # SQLAlchemy would take a piece of it as the password
        parsed = make_url(url)
        if parsed.password:
            found.add(str(parsed.password))
        for key, value in parsed.query.items():
            if _is_secret_key(key):
                found.update([value] if isinstance(value, str) else value)
    except Exception:  # noqa: BLE001
        pass
    address = rest.split("?", 1)[0]
    if "@" in address:  # the user info as written (also when SQLAlchemy cannot parse it)
        userinfo = address.rsplit("@", 1)[0]
        if ":" in userinfo:
            found.add(userinfo.split(":", 1)[1])
    if "?" in rest:
        for pair in rest.split("?", 1)[1].split("&"):
            key, _, value = pair.partition("=")
            if _is_secret_key(key):
                found.add(value)
    found |= {unquote(s) for s in found}
    return sorted((s for s in found if s), key=len, reverse=True)


def scrub(text: str, *urls: str | None) -> str:
    """``text`` with each URL shown redacted and every secret of those URLs replaced by
    ``***``: for error messages of drivers and servers, which may quote either."""
    for url in urls:
        if not url:
            continue
        text = text.replace(url, redact_url(url))
        for secret in url_secrets(url):
            text = text.replace(secret, HIDDEN)
    return text


def _is_secret_key(key: str) -> bool:
    return any(word in key.lower() for word in _SECRET_KEYS)
