"""Secrets: the passwords in storage URLs and tracking URIs, and MLflow's credentials.

Where each one may go, and where it never goes:

* **Shown**: never. A URL appears in output, errors, MLflow tags and study attrs only as
  :func:`redact_url` shows it; an error text from a driver or a server, which may quote a URL
  or a piece of its password, goes through :func:`scrub` first (:func:`scrub_known_secrets`
  at the command line's last line of defence). :func:`check_url` refuses, before anything
  connects, a URL whose password a driver would quote a piece of.
* **Command lines**: never (``ps`` shows them to every user; Ray records the job's entry
  point). :func:`secrets_off_the_command_line` runs ``hpo`` again with a password-bearing
  ``--storage``, ``--tracking-uri`` or ``--warm-start`` moved into its environment variable.
* **Child processes**: only the driver writes the study and MLflow, so a local Ray and its
  workers start without the credentials (:func:`without_credentials`).
* **MLflow**: the user info of an ``http(s)://user:pass@host`` tracking URI becomes
  ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` (:func:`use_credentials`), the way
  MLflow documents basic auth; the health check sends them to the tracking server only, never
  to a host it redirects to (:func:`open_with_credentials`).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

from hpo.errors import HpoError

HIDDEN = "***"
# Query-string keys whose values are secrets (``?password=...``, ``?sslpassword=...``, tokens).
_SECRET_KEYS = ("pass", "pwd", "secret", "token", "key", "auth", "cred")
CREDENTIAL_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
# Other variables that hold a secret as a whole: MLflow's bearer token, the passwords
# libpq and the MySQL client read. Only the driver uses them.
SECRET_VARS = ("MLFLOW_TRACKING_TOKEN", "PGPASSWORD", "MYSQL_PWD")
# Options whose URL may hold a password, and the environment variable each also reads.
SECRET_OPTIONS = {"--storage": "HPO_STORAGE", "--tracking-uri": "MLFLOW_TRACKING_URI", "--warm-start": "HPO_WARM_START"}


# Shown: never -------------------------------------------------------------------------
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


def scrub_credentials(text: str, *urls: str | None) -> str:
    """:func:`scrub`, and this process's MLflow password (:func:`use_credentials`) hidden too."""
    text = scrub(text, *urls)
    password = os.environ.get(CREDENTIAL_VARS[1])
    return text.replace(password, HIDDEN) if password else text


def scrub_known_secrets(text: str) -> str:
    """``text`` without the secrets of the storage URL and tracking URI this process uses:
    those of :data:`SECRET_OPTIONS`' variables, of any URL on the command line, and the
    MLflow password."""
    urls = [url_in(os.environ.get(name), name) for name in SECRET_OPTIONS.values()]
    urls += [part for a in sys.argv if "://" in a for part in (a, a.partition("@")[2])]  # STUDY@URL too
    return scrub_credentials(text, *urls)


def _is_secret_key(key: str) -> bool:
    return any(word in key.lower() for word in _SECRET_KEYS)


# Command lines: never -----------------------------------------------------------------
def url_in(value: str | None, name: str) -> str | None:
    """The URL an option's (or its variable's) value holds: ``STUDY@URL`` of --warm-start
    after the first ``@``."""
    if value and name in ("--warm-start", "HPO_WARM_START"):
        return value.partition("@")[2] or None
    return value


def secrets_off_the_command_line() -> None:
    """Run again (same pid, via exec) with any password-bearing ``--storage`` or
    ``--tracking-uri`` moved into its environment variable: a sweep's command line is
    visible to every user in ``ps`` and is recorded by Ray as the job's entry point."""
    args, moved, index = sys.argv[1:], {}, 0
    kept: list[str] = []
    while index < len(args):
        flag, _, inline = args[index].partition("=")
        value = inline if inline else (args[index + 1] if index + 1 < len(args) else "")
        if flag in SECRET_OPTIONS and url_secrets(url_in(value, flag)):
            moved[SECRET_OPTIONS[flag]] = value
            index += 1 if inline else 2
            continue
        kept.append(args[index])
        index += 1
    if moved:
        sys.stdout.flush()
        # -P: `-m` would put the current folder first on sys.path, so an hpo.py there
        # would run instead, with the password in its environment
        env = {**os.environ, **moved}
        home = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        if home == os.getcwd():  # `python -m hpo` in a checkout: the same hpo again, not an installed one
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [home, os.environ.get("PYTHONPATH")]))
        os.execve(sys.executable, [sys.executable, "-P", "-m", "hpo", *kept], env)


# Child processes: none ----------------------------------------------------------------
@contextlib.contextmanager
def without_credentials() -> Iterator[None]:
    """The MLflow credentials (and a storage URL or tracking URI with a password) out of this
    process's environment for the block: processes it starts (a local Ray and its workers) do
    not inherit them; only the driver writes Optuna and MLflow."""
    urls = {"HPO_STORAGE": os.environ.get("HPO_STORAGE"), "MLFLOW_TRACKING_URI": os.environ.get("MLFLOW_TRACKING_URI"),
            "HPO_WARM_START": os.environ.get("HPO_WARM_START", "").partition("@")[2]}  # STUDY@URL
    names = [*CREDENTIAL_VARS, *SECRET_VARS, *(name for name, url in urls.items() if url_secrets(url))]
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


# MLflow: basic auth, to the tracking server only --------------------------------------
def use_credentials(uri: str) -> str:
    """An HTTP(S) tracking URI without its user info, which becomes this process's
    ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` (the way MLflow documents
    basic auth). Call it before any HTTP request: urllib and MLflow quote a URI with user
    info in their errors (``https://bob:pw@host`` without a port: "nonnumeric port: 'pw@host'").
    The credentials never go into MLflow params or tags; Ray workers do not get them
    (:func:`without_credentials`). Other URIs come back unchanged.
    """
    from urllib.parse import unquote, urlsplit, urlunsplit

    scheme, _, rest = uri.partition("://")
    before_query = rest.split("?", 1)[0]
    if not uri.startswith(("http://", "https://")) or "@" not in before_query:
        return uri
    at = before_query.rindex("@")  # the user info ends at the last '@' (a password may hold an unencoded '/')
    userinfo, host_and_path = rest[:at], rest[at + 1 :]
    user, _, password = userinfo.partition(":")
    os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(user)
    if password:
        os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(password)
    stripped = f"{scheme}://{host_and_path}"
    try:
        return urlunsplit(urlsplit(stripped))  # normal form, as MLflow will see it
    except ValueError as error:
        raise HpoError(f"--tracking-uri {redact_url(uri)}: not a valid URL ({scrub(str(error), uri)})") from None


def open_with_credentials(url: str, timeout: float) -> Any:
    """GET ``url`` with this process's Basic auth credentials (:data:`CREDENTIAL_VARS`, when
    both are set), never sent on to another origin on a redirect; returns urllib's response
    (a context manager). Raises what urllib raises (URLError, HTTPError, timeouts)."""
    import base64
    import urllib.request

    request = urllib.request.Request(url)
    user, password = os.environ.get(CREDENTIAL_VARS[0]), os.environ.get(CREDENTIAL_VARS[1])
    if user and password:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    return urllib.request.build_opener(_same_origin_redirects()).open(request, timeout=timeout)


def _same_origin_redirects() -> Any:
    """A urllib handler that follows a redirect as urllib does, but drops the ``Authorization``
    header when it leads to another origin (scheme, host or port): the password goes to the
    tracking server only, never to wherever it redirects (requests, which MLflow's own client
    uses, does the same). Made on first use, so that ``hpo --help`` never imports urllib.request."""
    import urllib.request

    class SameOriginRedirects(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001, ANN201 - urllib's signature
            new = super().redirect_request(req, fp, code, msg, headers, newurl)
            if new is not None and _origin(new.full_url) != _origin(req.full_url):
                for name in [n for n in new.headers if n.lower() == "authorization"]:
                    del new.headers[name]
                new.unredirected_hdrs.pop("Authorization", None)
            return new

    return SameOriginRedirects


def _origin(url: str) -> tuple[str, str, int | None]:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    default = {"http": 80, "https": 443}.get(parts.scheme.lower())
    return parts.scheme.lower(), (parts.hostname or "").lower(), parts.port or default
