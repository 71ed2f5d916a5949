#!/usr/bin/env python3
"""The MLflow user that sweeps log as: `hpo` (MLFLOW_HPO_USERNAME), not an admin, with the
password in MLFLOW_HPO_PASSWORD.

    mlflow-users.py           wait for the server, then, as the admin, create the user or
                              reset its password to MLFLOW_HPO_PASSWORD (run by
                              mlflow-entrypoint.sh in the background on every start)
    mlflow-users.py --check   exit 0 when that user can log in (the compose health check)

It talks to the server on 127.0.0.1:MLFLOW_PORT through MLflow's REST API (users/create,
users/update-password), with the standard library only: importing mlflow costs seconds of
CPU. Passwords come from the environment and are never printed.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import time
import urllib.error
import urllib.request

HOST = os.environ.get("MLFLOW_HOST", "127.0.0.1")
BASE = f"http://{'127.0.0.1' if HOST in ('', '0.0.0.0', '::') else HOST}:{os.environ.get('MLFLOW_PORT', '5000')}"
USERNAME = os.environ.get("MLFLOW_HPO_USERNAME", "hpo")


def call(method: str, path: str, user: str, password: str, body: dict | None = None) -> tuple[int, dict]:
    """One REST call with basic auth: (HTTP status, JSON body or {})."""
    request = urllib.request.Request(BASE + path, method=method, data=json.dumps(body).encode() if body else None)
    request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as error:
        try:
            return error.code, json.loads(error.read() or b"{}")
        except ValueError:
            return error.code, {}


def wait_for_server(seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(BASE + "/health", timeout=10):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if time.monotonic() > deadline:
                raise SystemExit(f"mlflow-users: no MLflow server on {BASE} after {seconds:.0f} s") from None
            time.sleep(1)


def ensure_user() -> str:
    """Create the user, or set its password when it exists; says which."""
    admin = os.environ.get("MLFLOW_AUTH_ADMIN_USERNAME", "admin")
    admin_password = os.environ["MLFLOW_AUTH_ADMIN_PASSWORD"]
    password = os.environ["MLFLOW_HPO_PASSWORD"]
    status, body = call("POST", "/api/2.0/mlflow/users/create", admin, admin_password,
                        {"username": USERNAME, "password": password})
    if status == 200:
        return "created"
    if body.get("error_code") == "RESOURCE_ALREADY_EXISTS":
        status, body = call("PATCH", "/api/2.0/mlflow/users/update-password", admin, admin_password,
                            {"username": USERNAME, "password": password})
        if status == 200:
            return "password set"
    raise SystemExit(f"mlflow-users: user {USERNAME!r} not ready: HTTP {status} {body.get('error_code', '')}".rstrip())


def main() -> None:
    if "--check" in sys.argv[1:]:
        status, _ = call("GET", f"/api/2.0/mlflow/users/get?username={USERNAME}", USERNAME,
                         os.environ["MLFLOW_HPO_PASSWORD"])
        raise SystemExit(0 if status == 200 else 1)
    wait_for_server(float(os.environ.get("MLFLOW_USERS_WAIT_SECONDS", "600")))
    print(f"mlflow-users: user {USERNAME!r} {ensure_user()} (not an admin)", flush=True)


if __name__ == "__main__":
    main()
