"""The checked-in nightly schedule: the Kubernetes manifests against the Kubernetes JSON
schemas (kubernetes-validate, offline), the KubeRay RayJob's fields and Secret references,
the cron line for a plain host, and deploy/nightly_sweep.py on a real study."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from tests.conftest import REPO, hpo_env

K8S = REPO / "deploy" / "k8s"
NIGHTLY = REPO / "deploy" / "nightly_sweep.py"
# RayJob fields of KubeRay's ray.io/v1 CRD (v1.7.0, config/crd/bases/ray.io_rayjobs.yaml)
RAYJOB_SPEC = {"activeDeadlineSeconds", "backoffLimit", "clusterSelector", "deletionStrategy", "entrypoint",
               "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "jobId", "managedBy", "metadata",
               "preRunningDeadlineSeconds", "rayClusterSpec", "runtimeEnvYAML", "shutdownAfterJobFinishes",
               "submissionMode", "submitterConfig", "submitterPodTemplate", "suspend", "ttlSecondsAfterFinished"}
RAY_CLUSTER_SPEC = {"authOptions", "autoscalerOptions", "enableInTreeAutoscaling", "gcsFaultToleranceOptions",
                    "headGroupSpec", "headServiceAnnotations", "historyServerOptions", "managedBy", "networkPolicy",
                    "rayVersion", "suspend", "tlsOptions", "upgradeStrategy", "workerGroupSpecs"}
HEAD_GROUP = {"enableIngress", "headService", "ingressOptions", "labels", "rayStartParams", "resources",
              "serviceType", "template"}
WORKER_GROUP = {"groupName", "idleTimeoutSeconds", "labels", "maxReplicas", "minReplicas", "numOfHosts", "priority",
                "rayStartParams", "replicas", "resources", "scaleStrategy", "suspend", "template"}
SECRET_ENV = re.compile(r"PASSWORD|TOKEN|SECRET|STORAGE|_URI$")


def documents(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def validate_as(definition: str, data: dict) -> None:
    """Validate against one of kubernetes-validate's bundled strict schemas (no network)."""
    import jsonschema
    from kubernetes_validate import utils
    from referencing import Registry, Resource

    version = utils.latest_version()
    folder = f"kubernetes-json-schema/v{version}-local-strict"
    schema = utils.schema_contents(f"{folder}/{definition}.json", version)
    registry = Resource.from_contents(utils.schema_contents(f"{folder}/_definitions.json", version)) @ (
        Resource.from_contents(schema) @ Registry())
    jsonschema.Draft202012Validator(schema, registry=registry).validate(data)


def secret_keys() -> dict[str, set[str]]:
    return {d["metadata"]["name"]: set(d["stringData"]) for d in documents("secrets.example.yaml")}


def test_kubernetes_manifests_pass_the_schemas() -> None:
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version

    kinds = []
    for name in ("cronjob.yaml", "rbac.yaml", "secrets.example.yaml"):
        for document in documents(name):
            kubernetes_validate.validate(document, latest_version(), strict=True)
            kinds.append(document["kind"])
    assert sorted(kinds) == ["CronJob", "Role", "RoleBinding", "Secret", "Secret", "ServiceAccount"]

    rayjob = documents("rayjob.yaml")[0]
    cluster = rayjob["spec"]["rayClusterSpec"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        validate_as("podtemplatespec-v1", group["template"])  # the pods KubeRay makes from them

    import jsonschema

    broken = documents("cronjob.yaml")[0]
    broken["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(jsonschema.ValidationError):  # strict: a misspelt field is an error
        kubernetes_validate.validate(broken, latest_version(), strict=True)


def container_env(template: dict) -> list[dict]:
    return [env for container in template["spec"]["containers"] for env in container.get("env", [])]


def test_rayjob_runs_a_timed_night_with_secrets_from_kubernetes() -> None:
    (rayjob,) = documents("rayjob.yaml")
    assert (rayjob["apiVersion"], rayjob["kind"]) == ("ray.io/v1", "RayJob")
    assert rayjob["metadata"]["generateName"], "a new name every night"
    spec = rayjob["spec"]
    assert set(spec) <= RAYJOB_SPEC and {"entrypoint", "rayClusterSpec"} <= set(spec)
    cluster = spec["rayClusterSpec"]
    assert set(cluster) <= RAY_CLUSTER_SPEC and set(cluster["headGroupSpec"]) <= HEAD_GROUP
    assert "template" in cluster["headGroupSpec"] and cluster["workerGroupSpecs"], "a head and worker groups"
    for group in cluster["workerGroupSpecs"]:
        assert set(group) <= WORKER_GROUP and {"groupName", "minReplicas", "maxReplicas", "template"} <= set(group)

    entrypoint = spec["entrypoint"].split()
    assert entrypoint[0] == "hpo-nightly", "the image installs deploy/nightly_sweep.py as hpo-nightly"
    options = dict(zip(entrypoint[2::2], entrypoint[3::2], strict=True))
    assert set(options) == {"--study", "--more", "--timeout"}
    assert "://" not in spec["entrypoint"] and "@" not in spec["entrypoint"], "no URL, no secret inline"
    timeout = float(options["--timeout"])
    assert timeout < spec["activeDeadlineSeconds"] < 24 * 3600, "the deadline leaves the last trials time, before the next night"
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0

    keys = secret_keys()
    assert cluster["authOptions"] == {"mode": "token", "secretName": "hpo-ray-token"}
    assert "auth_token" in keys["hpo-ray-token"], "the key KubeRay reads"
    head = container_env(cluster["headGroupSpec"]["template"])
    by_name = {env["name"]: env for env in head}
    assert {"HPO_STORAGE", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_URI"} <= set(by_name)
    for env in head:
        if SECRET_ENV.search(env["name"]) and env["name"] != "MLFLOW_TRACKING_URI":
            ref = env["valueFrom"]["secretKeyRef"]
            assert "value" not in env and ref["key"] in keys[ref["name"]], env
    assert "@" not in by_name["MLFLOW_TRACKING_URI"]["value"]
    for group in cluster["workerGroupSpecs"]:
        assert not container_env(group["template"]), "trials need no database or MLflow credentials"


def test_cronjob_submits_the_rayjob_every_night() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert all((K8S / name).is_file() for name in kustomization["resources"])
    (generator,) = kustomization["configMapGenerator"]
    assert generator["files"] == ["rayjob.yaml"] and kustomization["generatorOptions"]["disableNameSuffixHash"]

    (cronjob,) = documents("cronjob.yaml")
    spec = cronjob["spec"]
    assert len(spec["schedule"].split()) == 5 and spec["concurrencyPolicy"] == "Forbid"
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    assert container["command"][:3] == ["kubectl", "create", "-f"], "create: the RayJob's generateName needs it"
    manifest = Path(container["command"][3])
    assert mounts[str(manifest.parent)]["configMap"]["name"] == generator["name"] and manifest.name == "rayjob.yaml"

    rbac = {d["kind"]: d for d in documents("rbac.yaml")}
    assert pod["serviceAccountName"] == rbac["ServiceAccount"]["metadata"]["name"]
    assert rbac["RoleBinding"]["roleRef"]["name"] == rbac["Role"]["metadata"]["name"]
    (rule,) = rbac["Role"]["rules"]
    assert rule["apiGroups"] == ["ray.io"] and rule["resources"] == ["rayjobs"] and "create" in rule["verbs"]


def test_cron_line_for_a_plain_host() -> None:
    lines = [line for line in (REPO / "deploy" / "cron" / "hpo-nightly.cron").read_text().splitlines()
             if line and not line.startswith("#")]
    assert lines[0] == "CRON_TZ=UTC"
    fields = lines[1].split(None, 6)
    minute, hour, day, month, weekday, user, command = fields
    assert minute.isdigit() and hour.isdigit() and (day, month, weekday) == ("*", "*", "*") and user == "hpo"
    assert "deploy/nightly_sweep.py" in command and "flock -n" in command
    home = command.split("cd ", 1)[1].split()[0]
    lock = command.split("flock -n ", 1)[1].split()[0]
    assert lock.startswith(home + "/"), f"the lock {lock} lies in the service's own folder {home}, not /tmp"
    for option in ("--more", "--timeout", "--env-file", "--study"):
        assert option in command
    assert "://" not in command and "PASSWORD" not in command, "secrets stay in the env file"


def load_nightly():
    spec = importlib.util.spec_from_file_location("nightly_sweep", NIGHTLY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_study(path: Path, name: str) -> None:
    """Trials of every kind: 3 COMPLETE, 1 PRUNED, 1 FAIL error (these 5 count towards
    --trials), 1 FAIL interrupted and 1 RUNNING (they don't)."""
    study = optuna.create_study(study_name=name, storage=f"sqlite:///{path}")
    for state, reason in [(TrialState.COMPLETE, None)] * 3 + [(TrialState.PRUNED, None), (TrialState.FAIL, "error"),
                                                                (TrialState.FAIL, "interrupted"), (TrialState.RUNNING, None)]:
        trial = study.ask()
        if reason:
            trial.set_user_attr("reason", reason)
        if state == TrialState.COMPLETE:
            study.tell(trial, 0.5)
        elif state != TrialState.RUNNING:
            study.tell(trial, state=state)


def test_nightly_asks_for_k_more_finished_trials_of_the_same_study(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nightly = load_nightly()
    make_study(tmp_path / "hpo.db", "nightly-lora")
    storage = f"sqlite:///{tmp_path / 'hpo.db'}"
    assert nightly.finished_trials(storage, "nightly-lora") == 5, "hpo's own rule: interrupted and running don't count"
    assert nightly.finished_trials(storage, "first-night") == 0

    monkeypatch.setenv("HPO_STORAGE", storage)
    argv = ["search_spaces/lora.py", "--study", "nightly-lora", "--more", "4", "--timeout", "3600", "--set", "max_steps=30"]
    command = nightly.command(argv)
    assert command[command.index("search") + 1:][:5] == ["search_spaces/lora.py", "--study", "nightly-lora", "--timeout", "3600"]
    if nightly.has_more_option():  # hpo search counts itself, under its study lock
        assert command[-4:] == ["--more", "4", "--set", "max_steps=30"]
    else:
        assert command[-4:] == ["--trials", "9", "--set", "max_steps=30"]
    assert storage not in " ".join(command), "the storage URL stays in the environment"


@pytest.mark.parametrize(("argv", "message"), [
    (["m.py", "--more", "4", "--timeout", "60", "--storage", "postgresql://u:pw@db/x"], "--storage: pass the storage URL in HPO_STORAGE"),
    (["m.py", "--more", "4", "--timeout", "60", "--trials", "9"], "--trials: give --more K instead"),
    (["m.py", "--more", "0", "--timeout", "60"], "--more 0: must be at least 1"),
    (["m.py", "--more", "4", "--timeout", "60", "--warm-start", "old@postgresql://u:pw@db/x"], "--warm-start: its storage URL holds a password"),
    (["m.py", "--more", "4", "--timeout", "60", "--warm-start=old@postgresql://u:pw@db/x"], "--warm-start: its storage URL holds a password"),
])
def test_nightly_refuses_bad_input_in_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        load_nightly().main(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: {message}") and error.count("\n") == 1 and "pw@" not in error


def test_nightly_refuses_the_examples_placeholder_secrets(monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    (secret,) = [d for d in documents("secrets.example.yaml") if d["metadata"]["name"] == "hpo-nightly"]
    monkeypatch.setenv("HPO_STORAGE", secret["stringData"]["storage-url"])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", secret["stringData"]["mlflow-password"])
    with pytest.raises(SystemExit) as exit_info:
        load_nightly().main(["m.py", "--more", "4", "--timeout", "60"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.count("\n") == 1
    assert error.startswith("error: HPO_STORAGE, MLFLOW_TRACKING_PASSWORD: still the example's 'change-me' placeholder")
    assert "postgresql" not in error


def test_nightly_reads_an_owner_only_env_file_and_hands_over_to_hpo_search(tmp_path: Path) -> None:
    assert "HPO_STORAGE" not in hpo_env(), "the study below can only be found through the env file"
    make_study(tmp_path / "night.db", "nightly-lora")
    env_file = tmp_path / "nightly.env"
    env_file.write_text(f"# the night's secrets\nexport HPO_STORAGE='sqlite:///{tmp_path / 'night.db'}'\n")
    args = [sys.executable, str(NIGHTLY), str(tmp_path / "missing.py"), "--study", "nightly-lora", "--more", "2",
            "--timeout", "60", "--env-file", str(env_file)]
    env_file.chmod(0o644)
    open_file = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=120, env=hpo_env())
    assert open_file.returncode == 2 and "chmod 600" in open_file.stderr and "sqlite" not in open_file.stderr

    env_file.chmod(0o600)
    result = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=120, env=hpo_env())
    said = result.stdout + result.stderr
    assert "hpo-nightly: study 'nightly-lora'" in said, said
    assert "--trials 7" in said or "2 more finished trials tonight" in said, said
    # the same process is now `hpo search`, which refuses the missing module with its own error
    assert result.returncode == 2 and "missing.py" in result.stderr and "Traceback" not in said
