"""A team's MLflow tracking server: a real `mlflow server` with basic auth (mlflow[auth]),
an SQL backend (SQLite file), proxied artifacts and the model registry. `hpo search` and
`hpo promote` reach it with `--tracking-uri http://...` and credentials from MLflow's own
environment variables only; everything arrives, and the password is never printed."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import SEARCH_SPACES, hpo_env, run_hpo, stop_group, wait_until_up

pytestmark = pytest.mark.slow
ADMIN_PASSWORD = "admin-Pw-7731"
HPO_PASSWORD = "hpo-Secret-Pw-5519"
STUDY = "team"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def api(base: str, path: str, body: dict, user: str, password: str, method: str = "POST") -> dict:
    """Call the server's REST API with basic auth."""
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    data = json.dumps(body).encode() if method == "POST" else None
    request = urllib.request.Request(f"{base}{path}", data=data, method=method,
                                     headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as answer:
        return json.loads(answer.read() or b"{}")


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory: pytest.TempPathFactory):
    """`mlflow server --app-name basic-auth` on 127.0.0.1; a user `hpo` allowed to edit the
    team's experiment (made by the admin; others get no permission by default)."""
    root = tmp_path_factory.mktemp("mlflow-server")
    (root / "auth.ini").write_text(
        "[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
        f"database_uri = sqlite:///{root / 'auth.db'}\n"
        f"admin_username = admin\nadmin_password = {ADMIN_PASSWORD}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # each request checks the password (scrypt, ~0.1 s of CPU): cache successful checks,
        # as a team server should for sweeps that make hundreds of requests
        "auth_cache_ttl_seconds = 300\n")
    port = free_port()
    env = hpo_env({"MLFLOW_AUTH_CONFIG_PATH": str(root / "auth.ini"),
                   "MLFLOW_FLASK_SERVER_SECRET_KEY": "hpo-tests-fixed-secret-key",
                   "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # as docker/mlflow-entrypoint.sh sets it
    log = (root / "server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--serve-artifacts",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    try:
        # 180 s: migrations of two SQLite stores, on a busy machine
        wait_until_up(f"{base}/health", server, root / "server.log", 180, "the MLflow server", interval=0.5, timeout=5)
        print(f"\nMLflow server with auth answered after {time.monotonic() - started:.1f} s")
        api(base, "/api/2.0/mlflow/users/create", {"username": "hpo", "password": HPO_PASSWORD}, "admin", ADMIN_PASSWORD)
        experiment = api(base, "/api/2.0/mlflow/experiments/create", {"name": STUDY}, "admin", ADMIN_PASSWORD)
        api(base, "/api/3.0/mlflow/users/permissions/grant",
            {"username": "hpo", "resource_type": "experiment", "resource_id": experiment["experiment_id"],
             "permission": "EDIT"}, "admin", ADMIN_PASSWORD)
        yield {"uri": base, "root": root}
    finally:
        stop_group(server, timeout=30)
        log.close()


@pytest.fixture(scope="module")
def hpo_client(tracking_server: dict):
    os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = "hpo", HPO_PASSWORD
    try:
        yield MlflowClient(tracking_server["uri"])
    finally:
        os.environ.pop("MLFLOW_TRACKING_USERNAME", None)
        os.environ.pop("MLFLOW_TRACKING_PASSWORD", None)


def test_search_and_promote_through_the_server(tracking_server: dict, hpo_client: MlflowClient, tiny_bert: Path,
                                               tmp_path: Path) -> None:
    credentials = {"MLFLOW_TRACKING_USERNAME": "hpo", "MLFLOW_TRACKING_PASSWORD": HPO_PASSWORD}
    search = run_hpo(["search", str(SEARCH_SPACES / "lora.py"), "--study", STUDY, "--trials", "2",
                      "--tracking-uri", tracking_server["uri"], "--set", f"model={tiny_bert}",
                      "--set", "max_steps=4", "--set", "eval_every=2", "--set", "pruner=none"],
                     cwd=tmp_path, env=credentials)
    assert search.returncode == 0, search.stdout + search.stderr
    promote = run_hpo(["promote", "--study", STUDY, "--set", "max_steps=4", "--output", "final"],
                      cwd=tmp_path, env=credentials)  # the tracking URI: the one the sweep used
    assert promote.returncode == 0, promote.stdout + promote.stderr
    for output in (search.stdout, search.stderr, promote.stdout, promote.stderr):
        assert HPO_PASSWORD not in output

    experiment = hpo_client.get_experiment_by_name(STUDY)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = hpo_client.search_runs([experiment.experiment_id], max_results=50)
    by_role: dict[str, list] = {}
    for run in runs:
        by_role.setdefault(run.data.tags.get("hpo.role"), []).append(run)
    assert {role: len(found) for role, found in by_role.items()} == {"sweep": 1, "trial": 2, "promote": 1}
    sweep_run, promote_run = by_role["sweep"][0], by_role["promote"][0]
    assert all(r.data.tags["mlflow.parentRunId"] == sweep_run.info.run_id for r in by_role["trial"])
    assert all(r.info.status == "FINISHED" for r in runs)
    for run in runs:
        text = json.dumps([run.data.params, run.data.tags])
        assert HPO_PASSWORD not in text

    report = {a.path for a in hpo_client.list_artifacts(sweep_run.info.run_id, "report")}
    assert "report/report.html" in report and "report/diagnosis.json" in report
    model = {a.path for a in hpo_client.list_artifacts(promote_run.info.run_id, "model")}
    assert {"model/adapter_model.safetensors", "model/hpo_promote.json"} <= model
    stored = {p.name for p in (tracking_server["root"] / "artifacts").rglob("*") if p.is_file()}
    assert {"report.html", "adapter_model.safetensors"} <= stored, "artifacts went through the server's proxy"
    versions = hpo_client.search_model_versions(f"name = '{STUDY}'")
    assert [(v.version, v.run_id) for v in versions] == [("1", promote_run.info.run_id)]
    assert "version 1" in promote.stdout
    query = f"username=hpo&resource_type=registered_model&resource_id={STUDY}"
    owner = api(tracking_server["uri"], f"/api/3.0/mlflow/users/permissions/get?{query}", {}, "admin", ADMIN_PASSWORD,
                method="GET")
    assert owner["permission"] == "MANAGE", "hpo registered the model itself, as the hpo user"


def test_a_wrong_password_is_one_clear_line(tracking_server: dict, tmp_path: Path) -> None:
    result = run_hpo(["search", str(SEARCH_SPACES / "lora.py"), "--study", "intruder", "--trials", "1",
                      "--tracking-uri", tracking_server["uri"]], cwd=tmp_path,
                     env={"MLFLOW_TRACKING_USERNAME": "hpo", "MLFLOW_TRACKING_PASSWORD": "not-the-password"})
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    print(f"\n{lines[-1]}")
    assert len(lines) == 1 and lines[0].startswith("error: --tracking-uri http://127.0.0.1:"), result.stderr
    assert "MLFLOW_TRACKING_USERNAME" in lines[0] and "not-the-password" not in result.stdout + result.stderr
    assert not (tmp_path / "hpo.db").exists(), "refused before the study was created"
