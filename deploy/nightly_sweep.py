#!/usr/bin/env python3
"""One night of a long-lived sweep: K more finished trials, new trials stop after --timeout.

    nightly_sweep.py MODULE --study NAME --more K --timeout SECONDS [--env-file FILE] [hpo search options]

A nightly study keeps growing: `hpo search --trials N` means "N finished trials in the
study", so running the same command every night would do nothing once the study holds N.
This wrapper turns "K more tonight" into `--trials` (the study's finished trials now, counted
by hpo's own rule, plus K), or passes `--more K` through when `hpo search` has that option,
and then *becomes* `hpo search` (exec): its exit status, output and signals are the sweep's.
`--timeout` ends the night cleanly (no new trial after it; running ones finish); trials cut
off by a harder limit (the RayJob's activeDeadlineSeconds, a kill) are re-run on the next
night, which resumes the same study.

Secrets never travel on a command line: the storage URL comes from HPO_STORAGE (an earlier
study to warm-start from, on a storage with a password, from HPO_WARM_START), the MLflow
server and its credentials from MLFLOW_TRACKING_URI / MLFLOW_TRACKING_USERNAME /
MLFLOW_TRACKING_PASSWORD, as Kubernetes Secrets set them, or from `--env-file` (KEY=VALUE
lines; refused when other users may read it) for a cron job on a plain host.

It runs wherever `hpo` is installed: the RayJob's entrypoint (deploy/k8s/rayjob.yaml), the
cron line (deploy/cron/hpo-nightly.cron), or by hand.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
from pathlib import Path

SECRET_VARIABLES = ("HPO_STORAGE", "HPO_WARM_START", "MLFLOW_TRACKING_PASSWORD", "RAY_AUTH_TOKEN")


class NightlyError(Exception):
    """Bad input: printed as one line, exit status 2."""


def load_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (blank lines and # comments skipped, one pair of quotes stripped).
    The file holds passwords, so it must be readable by its owner only, like an SSH key."""
    try:
        mode = path.stat().st_mode
        text = path.read_text()
    except OSError as error:
        raise NightlyError(f"--env-file {path}: cannot read it ({error.strerror})") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise NightlyError(f"--env-file {path}: other users may read it (mode {stat.S_IMODE(mode):o}); chmod 600 {path}")
    values = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.removeprefix("export ").partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise NightlyError(f"--env-file {path}, line {number}: expected KEY=VALUE")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = value
    return values


def has_more_option() -> bool:
    """Whether this hpo's `search` command takes `--more K` (then hpo counts, under its lock)."""
    import typer

    from hpo.cli import app

    search = typer.main.get_command(app).commands["search"]  # type: ignore[attr-defined]
    return any("--more" in param.opts for param in search.params)


def finished_trials(storage_url: str | None, study_name: str) -> int:
    """Trials that count towards `--trials` in the study now (0 for a new study)."""
    import optuna

    from hpo.record import study as studies
    from hpo.record.ledger import counts_towards_target

    storage = studies.open_storage(storage_url)
    if study_name not in optuna.study.get_all_study_names(storage):
        return 0
    study = optuna.load_study(study_name=study_name, storage=storage)
    return sum(1 for trial in study.get_trials(deepcopy=False) if counts_towards_target(trial))


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="nightly_sweep.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("module", help="the search-space module, e.g. search_spaces/lora.py")
    parser.add_argument("--study", help="the study that grows night after night (default: the module's file name)")
    parser.add_argument("--more", type=int, required=True, help="finished trials to add tonight")
    parser.add_argument("--timeout", type=float, required=True, help="seconds after which no new trial starts")
    parser.add_argument("--env-file", type=Path, help="KEY=VALUE file with HPO_STORAGE, MLFLOW_* (mode 600)")
    options, rest = parser.parse_known_args(argv)
    if options.more < 1:
        raise NightlyError(f"--more {options.more}: must be at least 1")
    if options.timeout <= 0:
        raise NightlyError(f"--timeout {options.timeout:g}: must be a positive number of seconds")
    if any(arg == "--trials" or arg.startswith("--trials=") for arg in rest):
        raise NightlyError("--trials: give --more K instead; the night's target is the study's finished trials plus K")
    if any(arg == "--storage" or arg.startswith("--storage=") for arg in rest):
        raise NightlyError("--storage: pass the storage URL in HPO_STORAGE (it holds a password), not on the command line")
    from hpo.secrets import url_secrets

    for index, arg in enumerate(rest):
        if arg == "--warm-start" or arg.startswith("--warm-start="):
            value = arg.partition("=")[2] or (rest[index + 1] if index + 1 < len(rest) else "")
            if url_secrets(value.partition("@")[2]):
                raise NightlyError("--warm-start: its storage URL holds a password; set HPO_WARM_START=STUDY@URL "
                                   "(in --env-file) instead of putting it on the command line")
    return options, rest


def command(argv: list[str]) -> list[str]:
    """The `hpo search` command line for tonight (no secret in it)."""
    options, rest = parse(argv)
    if options.env_file:
        os.environ.update(load_env_file(options.env_file))
    placeholders = sorted(name for name in SECRET_VARIABLES if "change-me" in os.environ.get(name, ""))
    if placeholders:
        raise NightlyError(f"{', '.join(placeholders)}: still the example's 'change-me' placeholder "
                           "(deploy/k8s/secrets.example.yaml, docker/.env.example); set the real secrets")
    study = options.study or Path(options.module).stem
    # the hpo of this interpreter: the one whose options were just read; -P keeps the current
    # folder off sys.path (an hpo.py there would run with the secrets in its environment)
    base = [sys.executable, "-P", "-m", "hpo", "search", options.module, "--study", study, "--timeout", f"{options.timeout:g}"]
    if has_more_option():
        print(f"hpo-nightly: study {study!r}: {options.more} more finished trials tonight, "
              f"no new trial after {options.timeout:g} s", flush=True)
        return [*base, "--more", str(options.more), *rest]
    already = finished_trials(os.environ.get("HPO_STORAGE"), study)
    target = already + options.more
    print(f"hpo-nightly: study {study!r} holds {already} finished trials; tonight up to {options.more} more "
          f"(--trials {target}), no new trial after {options.timeout:g} s", flush=True)
    return [*base, "--trials", str(target), *rest]


def main(argv: list[str] | None = None) -> None:
    from hpo.errors import HpoError

    try:
        tonight = command(sys.argv[1:] if argv is None else argv)
    except (NightlyError, HpoError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    os.execv(tonight[0], tonight)


if __name__ == "__main__":
    main()
