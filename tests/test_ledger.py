"""The ledger and the study lock, one behavioural suite run against every storage hpo
supports: SQLite, PostgreSQL (127.0.0.1:5432) and MariaDB (127.0.0.1:3306). Like Optuna's
``StorageTestCase``: the behaviour is written once, the storage is the parameter."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState

from hpo.record.ledger import DRIVER_ATTR, Ledger, StudyLock, counts_towards_target
from hpo.record.liveness import driver_id, driver_is_dead, known_alive
from hpo.record.locks import StudyLockTimeout
from hpo.record.optuna_access import write_trial_attrs
from hpo.record.study import open_storage
from tests.conftest import hpo_env


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres),
                        pytest.param("mariadb", marks=pytest.mark.mariadb)])
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'hpo.db'}"
    else:
        yield request.getfixturevalue("postgres_url" if request.param == "postgresql" else "mariadb_url")
    while LEDGERS:  # heartbeat threads stop before the database is dropped
        LEDGERS.pop().close()


def space(trial: optuna.Trial) -> dict:
    return {"x": trial.suggest_float("x", 0.0, 1.0)}


LEDGERS: list[Ledger] = []
"""The ledgers a test made (their heartbeat threads are stopped after it)."""


def new_ledger(url: str, target: int = 10, create: bool = False) -> Ledger:
    """A ledger on its own storage object, as another process would have it."""
    storage = open_storage(url)
    study = optuna.create_study(study_name="s", storage=storage, load_if_exists=True) if create else \
        optuna.load_study(study_name="s", storage=storage)
    LEDGERS.append(Ledger(study, space, target=target))
    return LEDGERS[-1]


def set_driver(ledger: Ledger, number: int, driver: str) -> None:
    trial = ledger.study.get_trials(deepcopy=False)[number]
    ledger.study._storage.set_trial_system_attr(trial._trial_id, DRIVER_ATTR, driver)


def age_heartbeat(url: str, trial_id: int) -> None:
    """Make the trial's heartbeat a day old (a driver silent far past the grace period)."""
    engine = sqlalchemy.create_engine(url)
    with engine.begin() as connection:
        connection.execute(sqlalchemy.text("UPDATE trial_heartbeats SET heartbeat = :old WHERE trial_id = :id"),
                           {"old": "2000-01-01 00:00:00", "id": trial_id})
    engine.dispose()


def dead_driver() -> str:
    """The identity of a process of this machine that has exited."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    time.sleep(0.2)
    identity = driver_id(process.pid)
    process.kill()
    process.wait()
    return identity


FOREIGN = "elsewhere:0a1b2c3d-0000-0000-0000-000000000000:4026531836:4242:1700000000.000"
TRY_LOCK = """
import sys, optuna
from hpo.record.ledger import StudyLock
from hpo.record.locks import StudyLockTimeout
lock = StudyLock(optuna.load_study(study_name="s", storage=sys.argv[1]), timeout=0.5)
for _ in range(2):
    try:
        with lock:
            print("ACQUIRED", flush=True)
    except StudyLockTimeout as error:
        print("BLOCKED", "'s'" in str(error), flush=True)
    sys.stdin.readline()
"""


class TestLedgerOnEveryStorage:
    def test_lock_excludes_another_process_and_times_out_clearly(self, storage_url: str) -> None:
        ledger = new_ledger(storage_url, create=True)
        other = subprocess.Popen([sys.executable, "-c", TRY_LOCK, storage_url], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=hpo_env())
        try:
            with ledger.lock, ledger.lock:  # reentrant within one process
                held = other.stdout.readline().strip()
            other.stdin.write("\n")
            other.stdin.flush()
            free = other.stdout.readline().strip()
            other.stdin.write("\n")
            other.stdin.flush()
            assert other.wait(timeout=60) == 0, other.stderr.read()
        finally:
            other.kill()
        assert held == "BLOCKED True", "another process waits, then gets a one-line error naming the study"
        assert free == "ACQUIRED"

    def test_claims_stop_at_the_target_across_processes(self, storage_url: str) -> None:
        first = new_ledger(storage_url, target=3, create=True)
        second = new_ledger(storage_url, target=3)
        claimed = [first.claim(), second.claim(), first.claim(), second.claim(), first.claim()]
        assert [c is not None for c in claimed] == [True, True, True, False, False]
        first.tell(claimed[0].number, TrialState.COMPLETE, value=1.0)
        assert second.claim() is None, "running trials of every process count"
        assert first.finished() == 1 and first.others_running() == 1 and second.others_running() == 1

    def test_the_claim_counts_in_one_query_what_counts_towards_the_target(self, storage_url: str) -> None:
        ledger = new_ledger(storage_url, target=100, create=True)
        study = ledger.study
        make = optuna.trial.create_trial
        for state, attrs in [(TrialState.COMPLETE, {}), (TrialState.PRUNED, {"reason": "pruned"}),
                             (TrialState.FAIL, {"reason": "error"}), (TrialState.FAIL, {"reason": "oom"}),
                             (TrialState.FAIL, {"reason": "error", "retried": True}),
                             (TrialState.FAIL, {"reason": "interrupted"}), (TrialState.FAIL, {"reason": "superseded"}),
                             (TrialState.FAIL, {"reason": "claim"}), (TrialState.FAIL, {})]:
            study.add_trial(make(state=state, value=1.0 if state == TrialState.COMPLETE else None, user_attrs=attrs))
        study.enqueue_trial({"x": 0.5})  # WAITING: not taken
        ledger.claim()  # RUNNING: taken
        expected = sum(1 for t in study.get_trials() if counts_towards_target(t) or t.state == TrialState.RUNNING)
        assert expected == 5 and ledger.taken() == expected
        queries: list[str] = []
        sqlalchemy.event.listen(ledger.lock.engine, "before_cursor_execute", lambda *a: queries.append(a[2]))
        ledger.taken()
        assert len(queries) == 1, queries

    def test_a_claim_takes_a_waiting_trial_first_and_asks_without_reading_the_study_when_none_waits(
            self, storage_url: str) -> None:
        """Reruns wait in Optuna's queue: a claim runs them first. With nothing queued the ask
        skips Study.ask's read of every unfinished trial (one query says nothing waits)."""
        from hpo.record.optuna_access import ask

        ledger = new_ledger(storage_url, target=100, create=True)
        study = ledger.study
        for _ in range(3):  # other drivers' running trials: what Study.ask reads on every ask
            study.ask().suggest_float("x", 0.0, 1.0)
        study.enqueue_trial({"x": 0.25})
        queued = ledger.claim()
        assert queued.params == {"x": 0.25} and queued.number == 3, "the waiting trial, not a new one"
        queries: list[str] = []
        sqlalchemy.event.listen(ledger.lock.engine, "before_cursor_execute", lambda *a: queries.append(a[2]))
        fresh = ask(study)
        ours = len(queries)
        queries.clear()
        optunas = study.ask()
        assert (fresh.number, optunas.number) == (4, 5)
        assert ours < len(queries), (ours, len(queries))
        assert fresh.user_attrs == {} and 0.0 <= ledger.claim().params["x"] <= 1.0

    def test_heartbeats_come_from_their_own_thread_while_the_loop_waits(self, storage_url: str) -> None:
        ledger = new_ledger(storage_url, create=True)
        ledger.heartbeats.interval = 0.5
        asked = ledger.claim()
        engine = sqlalchemy.create_engine(storage_url)
        query = sqlalchemy.text("SELECT heartbeat FROM trial_heartbeats WHERE trial_id = :id")
        with engine.connect() as connection:
            first = connection.execute(query, {"id": asked.trial._trial_id}).scalar()
        with ledger.lock:  # the driver's loop is stuck waiting (here: holding) the study lock
            time.sleep(2.5)  # MySQL/MariaDB keep whole seconds
            with engine.connect() as connection:
                later = connection.execute(query, {"id": asked.trial._trial_id}).scalar()
        engine.dispose()
        ledger.close()
        assert later > first and ledger.heartbeats.beats >= 2

    def test_reclaim_requeues_a_dead_drivers_trial_exactly_once(self, storage_url: str) -> None:
        owner = new_ledger(storage_url, create=True)
        asked = owner.claim()
        owner.running.clear()  # the driver is gone; the record stays RUNNING
        set_driver(owner, asked.number, dead_driver())
        reclaimers = [new_ledger(storage_url) for _ in range(3)]
        results: list[list[int]] = []
        threads = [threading.Thread(target=lambda r=r: results.append(r.reclaim())) for r in reclaimers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert sorted(results) == [[], [], [asked.number]], "one reclaimer fails it, the others find it done"
        trials = reclaimers[0].study.get_trials()
        assert trials[asked.number].state == TrialState.FAIL
        assert trials[asked.number].user_attrs["reason"] == "interrupted"
        reruns = [t for t in trials if t.user_attrs.get("retry_of") == asked.number]
        assert len(reruns) == 1 and reruns[0].state == TrialState.WAITING and reruns[0].user_attrs["attempt"] == 2
        again = reclaimers[1].claim()
        assert again.number == reruns[0].number and again.params == asked.params

    def test_reclaim_takes_a_trial_whose_claimer_died_mid_claim(self, storage_url: str) -> None:
        ledger = new_ledger(storage_url, create=True)
        half = optuna.load_study(study_name="s", storage=open_storage(storage_url)).ask()  # no driver, no heartbeat
        assert ledger.reclaim() == [half.number]
        assert ledger.study.get_trials()[half.number].user_attrs["reason"] == "interrupted"

    def test_reclaim_never_fails_a_live_drivers_trial_and_judges_others_by_heartbeat(self, storage_url: str) -> None:
        owner = new_ledger(storage_url, create=True)
        mine, foreign_stale, foreign_fresh = owner.claim(), owner.claim(), owner.claim()
        for asked in (mine, foreign_stale):
            age_heartbeat(storage_url, asked.trial._trial_id)
        owner.running.pop(foreign_stale.number)
        owner.running.pop(foreign_fresh.number)
        set_driver(owner, foreign_stale.number, FOREIGN)
        set_driver(owner, foreign_fresh.number, FOREIGN)
        other = new_ledger(storage_url)
        assert other.reclaim() == [foreign_stale.number], "stale heartbeat of a live driver here: not failed"
        assert owner.reclaim() == []
        states = {t.number: t.state for t in other.study.get_trials()}
        assert states[mine.number] == TrialState.RUNNING and states[foreign_fresh.number] == TrialState.RUNNING

    def test_a_result_for_a_trial_failed_meanwhile_is_kept(self, storage_url: str) -> None:
        owner = new_ledger(storage_url, create=True)
        asked = owner.claim()
        owner.record_intermediate(asked.number, 1, 0.25)
        set_driver(owner, asked.number, FOREIGN)  # looks like another host's silent driver
        age_heartbeat(storage_url, asked.trial._trial_id)
        assert new_ledger(storage_url).reclaim() == [asked.number]
        owner.record_intermediate(asked.number, 2, 0.5)  # the driver goes on: its writes fail, its result must not
        told = owner.tell(asked.number, TrialState.COMPLETE, value=0.5, attrs={"last_step": 2})
        assert told.kept_as is not None and told.state == TrialState.COMPLETE
        trials = {t.number: t for t in owner.study.get_trials()}
        kept = trials[told.kept_as]
        assert kept.state == TrialState.COMPLETE and kept.value == 0.5 and kept.params == asked.params
        assert kept.user_attrs["late_result_of"] == asked.number and kept.intermediate_values == {1: 0.25, 2: 0.5}
        rerun = next(t for t in trials.values() if t.user_attrs.get("retry_of") == asked.number)
        assert rerun.state == TrialState.FAIL and rerun.user_attrs["reason"] == "superseded"
        assert sum(counts_towards_target(t) for t in trials.values()) == 1, "the config counts once"

    def test_a_claim_records_config_driver_and_heartbeat_and_attrs_are_written_all_or_none(
            self, storage_url: str) -> None:
        """The claim writes the config, the driver and the first heartbeat in one transaction, and
        a trial's attrs go in together or not at all: a value the study cannot store (a set) leaves
        none of its batch behind, and the same attrs can be written once it is fixed."""
        ledger = new_ledger(storage_url, create=True)
        asked = ledger.claim()
        trial = ledger.study.get_trials(deepcopy=False)[asked.number]
        assert trial.user_attrs["config"] == asked.params
        assert trial.system_attrs[DRIVER_ATTR] == ledger.driver
        engine = sqlalchemy.create_engine(storage_url)
        with engine.connect() as connection:
            beats = connection.execute(sqlalchemy.text("SELECT COUNT(*) FROM trial_heartbeats WHERE trial_id = :id"),
                                       {"id": trial._trial_id}).scalar_one()
        engine.dispose()
        assert beats == 1
        with pytest.raises(TypeError):
            ledger.set_attrs(asked.number, {"device": "cpu", "tags": {"a", "b"}})
        assert "device" not in ledger.study.get_trials(deepcopy=False)[asked.number].user_attrs
        ledger.set_attrs(asked.number, {"device": "cuda", "tags": ["a", "b"]})
        ledger.set_attrs(asked.number, {"device": "cpu"})  # a key written again is replaced
        ledger.tell(asked.number, TrialState.COMPLETE, 0.5, attrs={"last_step": 3})
        trial = ledger.study.get_trials(deepcopy=False)[asked.number]
        assert (trial.state, trial.user_attrs["device"], trial.user_attrs["tags"], trial.user_attrs["last_step"]) == \
            (TrialState.COMPLETE, "cpu", ["a", "b"], 3)
        with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):  # Optuna's own check
            write_trial_attrs(ledger.study, trial._trial_id, {"late": 1}, {"late": 2})
        assert "late" not in ledger.study.get_trials(deepcopy=False)[asked.number].user_attrs

    def test_interrupted_reruns_are_bounded(self, storage_url: str) -> None:
        ledger = new_ledger(storage_url, target=1, create=True)
        told = []
        for _ in range(3):
            asked = ledger.claim()
            told.append(ledger.tell(asked.number, TrialState.FAIL, reason="interrupted"))
        assert [t.again for t in told] == [True, True, False]
        assert told[-1].reason == "interrupted_too_often"
        assert ledger.finished() == 1 and ledger.claim() is None
        assert len({tuple(t.params.items()) for t in ledger.study.get_trials()}) == 1

    def test_ctrl_c_is_not_an_attempt(self, storage_url: str) -> None:
        """Trials stopped by Ctrl-C (crashed=False) run again as the same attempt, however
        often; only crashes count towards interrupted_too_often."""
        ledger = new_ledger(storage_url, target=1, create=True)
        for _ in range(4):
            asked = ledger.claim()
            assert asked.attempt == 1
            told = ledger.tell(asked.number, TrialState.FAIL, reason="interrupted", crashed=False)
            assert (told.again, told.reason) == (True, "interrupted")
        for expected in (True, True, False):  # then three crashes
            asked = ledger.claim()
            assert ledger.tell(asked.number, TrialState.FAIL, reason="interrupted").again is expected
        assert ledger.study.get_trials()[-1].user_attrs["reason"] == "interrupted_too_often"


def test_sqlite_urls_naming_one_file_share_one_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    optuna.create_study(study_name="s", storage=open_storage("sqlite:///hpo.db"))
    relative = StudyLock(optuna.load_study(study_name="s", storage="sqlite:///hpo.db"), timeout=0.3)
    absolute = StudyLock(optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'hpo.db'}"), timeout=0.3)
    assert relative.path == absolute.path == os.path.realpath(tmp_path / "hpo.db")
    with relative:
        blocked = []
        thread = threading.Thread(target=lambda: blocked.append(_times_out(absolute)))
        thread.start()
        thread.join()
    assert blocked == [True]


def _times_out(lock: StudyLock) -> bool:
    try:
        with lock:
            return False
    except StudyLockTimeout:
        return True


def test_driver_identity_is_judged_safely() -> None:
    me = driver_id()
    host, boot, namespace, pid, start = me.split(":")
    assert int(pid) == os.getpid() and known_alive(me) and not driver_is_dead(me)
    assert driver_is_dead(dead_driver())
    moved = f"{host}:{boot}:{namespace}:{pid}:{float(start) + 0.4:.3f}"
    assert known_alive(moved), "start times are compared with a tolerance"
    reused = f"{host}:{boot}:{namespace}:{pid}:{float(start) - 3600:.3f}"
    assert driver_is_dead(reused), "the pid now belongs to a younger process"
    assert not driver_is_dead(f"{host}:another-boot:{namespace}:{pid}:{float(start) - 3600:.3f}")
    assert not driver_is_dead(f"{host}:{boot}:1:{pid}:{float(start) - 3600:.3f}"), "another PID namespace"
    assert not driver_is_dead(FOREIGN) and not driver_is_dead("garbage")
    assert driver_is_dead(f"{host}:{pid}:{float(start) - 3600:.2f}"), "the old host:pid:start form still reads"
    assert not driver_is_dead(f"{host}:{pid}:gone")


HIDDEN = """
import os, sys
import psutil
from hpo.record.liveness import driver_is_dead
os.setgroups([])
os.setgid(65534)
os.setuid(65534)  # nobody: with hidepid=2 it sees only its own processes in /proc
live, dead = sys.argv[1:]
pid = int(live.split(":")[3])
try:
    psutil.Process(pid)
    hidden = False
except psutil.NoSuchProcess:
    hidden = True
print(hidden, driver_is_dead(live), driver_is_dead(dead))
"""


def test_another_users_driver_hidden_by_hidepid_is_not_dead(tmp_path: Path) -> None:
    """Issue 19, item 15: with /proc mounted hidepid=2, another user's live driver has no /proc
    entry (psutil: NoSuchProcess), and its trials were reclaimed as a dead driver's. Signal 0
    answers EPERM for it: alive. A real hidepid=2 proc mount, in a mount namespace of its own
    (root needed: skipped elsewhere), read by a process that drops to the user nobody."""
    probe = subprocess.run(["unshare", "--mount", "sh", "-c", "mount -t proc -o hidepid=2 proc /proc"],
                           capture_output=True, text=True)
    if probe.returncode != 0 or os.geteuid() != 0:
        pytest.skip(f"needs root to mount a hidepid=2 /proc in a mount namespace ({probe.stderr.strip()[:200]})")
    driver = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.2)
        live = driver_id(driver.pid)
        result = subprocess.run(["unshare", "--mount", "sh", "-c",
                                 'mount -t proc -o hidepid=2 proc /proc && exec "$0" -c "$1" "$2" "$3"',
                                 sys.executable, HIDDEN, live, dead_driver()],
                                capture_output=True, text=True, timeout=60, env=hpo_env(), cwd=tmp_path)
    finally:
        driver.kill()
        driver.wait()
    assert result.returncode == 0, result.stdout + result.stderr
    hidden, live_dead, dead_dead = result.stdout.split()
    assert hidden == "True", "the driver's /proc entry is hidden from the reader"
    assert live_dead == "False", "a live driver hidden by hidepid=2 counted as dead"
    assert dead_dead == "True", "a driver that exited is still known dead"


def test_transient_errors_are_retried_a_bounded_number_of_times() -> None:
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import OperationalError

    from hpo.record.stores import is_transient, retry_transient

    assert is_transient(OperationalError("SELECT 1", {}, Exception("server closed the connection unexpectedly")))
    assert is_transient(MlflowException("API request to endpoint /api/2.0/mlflow/runs/create failed with error "
                                        "code 503 != 200"))
    assert is_transient(ConnectionRefusedError())
    assert not is_transient(MlflowException("RESOURCE_DOES_NOT_EXIST: run 'x' not found"))
    assert not is_transient(ValueError("bad input"))
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("reset by peer")
        return "ok"

    assert retry_transient(flaky, first_wait=0.01) == "ok" and len(calls) == 3
    calls.clear()

    def down() -> None:
        calls.append(1)
        raise ConnectionResetError("reset by peer")

    with pytest.raises(ConnectionResetError):
        retry_transient(down, attempts=4, first_wait=0.01)
    assert len(calls) == 4, "gives up after the last attempt"


def test_an_error_while_claiming_fails_the_trial_and_leaves_nothing_running(tmp_path: Path) -> None:
    """A space whose value the study cannot store (a set) used to leave the claimed trial
    RUNNING for ever; now the claim fails it (reason ``claim``, not counted) and raises.
    An error inside space itself fails it with reason ``space``."""
    study = optuna.create_study(study_name="s", storage=open_storage(f"sqlite:///{tmp_path / 'hpo.db'}"))

    def unstorable(trial: optuna.Trial) -> dict:
        return {"x": trial.suggest_float("x", 0.0, 1.0), "tags": {"a", "b"}}

    def broken(trial: optuna.Trial) -> dict:
        raise RuntimeError("no space today")

    for space_function, error, reason in ((unstorable, TypeError, "claim"), (broken, RuntimeError, "space")):
        ledger = Ledger(study, space_function, target=5)
        try:
            with pytest.raises(error):
                ledger.claim()
        finally:
            ledger.close()
        trial = study.get_trials(deepcopy=False)[-1]
        assert (trial.state, trial.user_attrs["reason"]) == (TrialState.FAIL, reason)
        assert error.__name__ in trial.user_attrs["error"]
    assert not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    assert ledger.finished() == 1, "a failed claim does not count; a space error does"
