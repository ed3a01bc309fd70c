"""The worker: claims training jobs from the store and runs each in a child process (the same
``imgclf train`` as the command line, writing its events to the job's JSON-lines file), then
exports the version to ONNX. A crash or an out-of-memory kill takes the child, not the worker;
if the worker itself dies its lease runs out and the job is claimed again, and the next attempt
resumes from the checkpoint (``--resume`` continues exactly).

    python -m imgclf.serve.worker HOME [DATABASE_URL]

``imgclf worker --home DIR --db postgresql://…`` runs one alone, on a machine that shares the
database and the home folder's storage with the API machines (a GPU machine, say).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from imgclf.core.rundir import RunDir
from imgclf.serve.database import DatabaseError
from imgclf.serve.store import LEASE_S, Home, Store

POLL_S = 0.5
TRAIN_THREADS_ENV = "IMGCLF_TRAIN_THREADS"  # set by imgclf serve --train-threads for the worker it runs
STOPPED, USER_ERROR = 3, 2  # exit statuses of imgclf train (imgclf.cli)


def _child_setup() -> None:
    """In the child: lower priority (prediction stays responsive) and die with the worker."""
    os.nice(10)
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: a SIGTERM stops it at its next step
    except (OSError, AttributeError):
        pass


def _training_data(store: Store, job: dict) -> Path:
    """The model's images as a folder per category, linked (not copied) from the uploads."""
    folder = store.home.job_dir(job["id"]) / "data"
    rows = store.query(
        "SELECT i.file, c.name FROM images i JOIN categories c ON c.id = i.category_id WHERE i.model_id = ?",
        job["model_id"],
    )
    for row in rows:
        source = store.home.path / row["file"]
        target = folder / row["name"] / source.name
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, target)
        except OSError:
            target.write_bytes(source.read_bytes())
    return folder


def _version(store: Store, job: dict) -> int:
    if job["version"]:
        return int(job["version"])
    row = store.one("SELECT COALESCE(MAX(number), 0) + 1 AS n FROM versions WHERE model_id = ?", job["model_id"])
    number = int(row["n"])
    store.execute(
        "INSERT INTO versions VALUES (?, ?, ?, 'training', ?, NULL)", job["model_id"], number, job["id"], time.time()
    )
    store.execute("UPDATE jobs SET version = ? WHERE id = ?", number, job["id"])
    return number


def _command(store: Store, job: dict, run_dir: Path) -> list[str]:
    folder = store.home.job_dir(job["id"])
    events = ["--events", str(folder / "events.jsonl")]
    threads = os.environ.get(TRAIN_THREADS_ENV, "")
    if threads.isdigit() and int(threads) > 0:  # imgclf serve --train-threads: cores left to predictions
        events += ["--threads", threads]
    if RunDir(run_dir).is_run:
        return [sys.executable, "-m", "imgclf.cli", "train", "--resume", str(run_dir), *events]
    config = folder / "settings.json"
    config.write_text(job["settings"])
    return [
        sys.executable,
        "-m",
        "imgclf.cli",
        "train",
        str(_training_data(store, job)),
        "--out",
        str(run_dir),
        "--config",
        str(config),
        *events,
    ]


class Lease:
    """This worker's hold on its job: renewed at a third of its length; lost when another worker
    took the job over (this one was thought dead), and the child is then stopped."""

    def __init__(self, store: Store, job_id: str, worker: str, seconds: float = LEASE_S):
        self.store, self.job_id, self.worker, self.seconds = store, job_id, worker, seconds
        self.renewed, self.lost = time.monotonic(), False

    def keep(self) -> bool:
        if not self.lost and time.monotonic() - self.renewed > self.seconds / 3:
            try:
                self.lost = not self.store.renew_lease(self.job_id, self.worker, self.seconds)
            except DatabaseError:
                pass  # the database is away for a moment: the lease still runs; try again next time
            self.renewed = time.monotonic()
        return not self.lost


def _run_child(store: Store, job: dict, lease: Lease, command: list[str], stopping: threading.Event) -> tuple[int, str]:
    """Run one child to its end, renewing the lease and passing on a cancel, a shutdown or a lost
    lease as SIGTERM (the child stops after its current step, with a checkpoint). Returns its exit
    status and the last line it wrote to stderr."""
    log = store.home.job_dir(job["id"]) / "stderr.log"
    with open(log, "ab") as handle:
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=handle, preexec_fn=_child_setup)
        signalled = False
        while child.poll() is None:
            time.sleep(POLL_S)
            held = lease.keep()
            try:
                cancel = store.one("SELECT cancel FROM jobs WHERE id = ?", job["id"])["cancel"]
            except DatabaseError:
                cancel = 0
            if (cancel or stopping.is_set() or not held) and not signalled:
                child.send_signal(signal.SIGTERM)
                signalled = True
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return child.returncode, (lines[-1] if lines else "")


def run_job(store: Store, job: dict, lease: Lease, stopping: threading.Event) -> str:
    """Train, export and publish one job's version; returns the state the job ends in."""
    if job["attempt"] > job["max_attempts"]:
        store.finish_job(
            job["id"],
            "failed",
            "too_many_attempts",
            f"the training was interrupted {job['max_attempts']} times; see its log",
        )
        return "failed"
    store.home.job_dir(job["id"]).mkdir(parents=True, exist_ok=True)
    number = _version(store, job)
    run_dir = store.home.version_dir(job["model_id"], number)
    code, last = _run_child(store, job, lease, _command(store, job, run_dir), stopping)
    if lease.lost:
        return "taken over"  # another worker holds the job now and resumes it
    if code == 0 or (code == STOPPED and (run_dir / RunDir.METRICS).exists()):  # done, or stopped at its budget
        return _publish(store, job, run_dir, number, lease, stopping)
    cancelled = store.one("SELECT cancel FROM jobs WHERE id = ?", job["id"])["cancel"]
    if cancelled:
        store.finish_job(job["id"], "cancelled")
        store.execute(
            "UPDATE versions SET state = 'cancelled' WHERE model_id = ? AND number = ?", job["model_id"], number
        )
        return "cancelled"
    if code == USER_ERROR:
        store.finish_job(job["id"], "failed", "training_refused", last.removeprefix("imgclf: error: "))
        store.execute("UPDATE versions SET state = 'failed' WHERE model_id = ? AND number = ?", job["model_id"], number)
        return "failed"
    store.requeue_job(job["id"])  # stopped for a shutdown, or crashed: the next attempt resumes
    return "queued"


def _publish(store: Store, job: dict, run_dir: Path, number: int, lease: Lease, stopping: threading.Event) -> str:
    """Export the version (checked against PyTorch) and make it the one that serves."""
    command = [sys.executable, "-m", "imgclf.cli", "export", str(run_dir)]
    code, last = _run_child(store, job, lease, command, stopping)
    if lease.lost:
        return "taken over"
    if code != 0:
        store.finish_job(job["id"], "failed", "export_failed", last.removeprefix("imgclf: error: "))
        store.execute("UPDATE versions SET state = 'failed' WHERE model_id = ? AND number = ?", job["model_id"], number)
        return "failed"
    metrics = RunDir(run_dir).read_json(RunDir.METRICS, {})
    summary = {key: metrics.get(key) for key in ("top1", "top5", "n", "macro_f1")}
    store.execute(
        "UPDATE versions SET state = 'ready', metrics = ? WHERE model_id = ? AND number = ?",
        json.dumps(summary),
        job["model_id"],
        number,
    )
    store.execute("UPDATE models SET active_version = ? WHERE id = ?", number, job["model_id"])
    store.finish_job(job["id"], "succeeded", version=number)
    return "succeeded"


def worker_name() -> str:
    """``host-pid``: which machine and process holds a job (a dead one on this host is found by pid)."""
    return f"{socket.gethostname()}-{os.getpid()}"


class Heartbeat(threading.Thread):
    """Every few seconds: this worker is alive, and which job it holds (``/readyz`` reads it)."""

    EVERY_S = 5.0

    def __init__(self, store: Store, worker: str, stopping) -> None:
        super().__init__(daemon=True)
        self.store, self.worker, self.stopping, self.job_id = store, worker, stopping, None

    def run(self) -> None:
        while True:
            try:
                self.store.beat(self.worker, self.job_id)
            except DatabaseError:
                pass  # away for a moment; the next beat tries again
            if self.stopping.wait(self.EVERY_S):
                return


def serve_jobs(home: str | Path, stopping, database: str | None = None, lease_s: float = LEASE_S) -> None:
    """Claim and run jobs until ``stopping`` (a threading.Event or a StopToken) is set; a running
    job is then handed back to the queue. The database may be away for a while (a restart): the
    worker waits and tries again."""
    store = Store(Home(home), database)
    worker = worker_name()
    store.requeue_orphans(socket.gethostname(), _alive)
    store.forget_dead_workers(socket.gethostname(), _alive)
    heartbeat = Heartbeat(store, worker, stopping)
    heartbeat.start()
    try:
        while not stopping.is_set():
            try:
                job = store.claim_job(worker, lease_s)
            except DatabaseError:
                stopping.wait(5 * POLL_S)
                continue
            if job is None:
                stopping.wait(POLL_S)
                continue
            heartbeat.job_id = job["id"]
            run_job(store, job, Lease(store, job["id"], worker, lease_s), stopping)
            heartbeat.job_id = None
    finally:
        heartbeat.join(timeout=10)
        try:
            store.forget_worker(worker)
        except DatabaseError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    serve_jobs(args[0], stopping, args[1] if len(args) > 1 else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
