"""A real one-node SLURM cluster for the tests: munged, slurmctld and slurmd, started and stopped here.

Everything but munge lives in a private folder: slurm.conf (found by the client commands
through SLURM_CONF), state, spool, logs and pid files, on free ports, so the cluster neither
needs nor touches /etc/slurm. munge uses its system key and socket (Debian's package creates the
key); a munged this module starts is stopped again. Needs root (slurmd runs jobs as their users)
and Debian's ``slurm-wlm`` and ``munge`` packages, which ``make`` installs.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("slurmctld", "slurmd", "munged", "sbatch")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unavailable_reason() -> str:
    """'' when a cluster can be started here, else why not (one line)."""
    missing = [d for d in DAEMONS if shutil.which(d) is None and not Path(f"/usr/sbin/{d}").exists()]
    if missing:
        return f"SLURM cannot be started: {', '.join(missing)} not installed (apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "SLURM cannot be started: slurmd must run as root and these tests are not"
    return ""


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024 - 512
    return 1024


class Cluster:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.host = socket.gethostname().split(".")[0]
        self.cpus = os.cpu_count() or 1
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._procs: list[subprocess.Popen] = []
        self._munged_pid: int | None = None

    # -- start / stop ---------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> Cluster:
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._start_munge()
        self._write_config()
        for daemon in ("slurmctld", "slurmd"):
            log = open(self.root / "log" / f"{daemon}.out", "ab")
            # -D: stay in the foreground, so the process is ours to stop
            self._procs.append(subprocess.Popen([self._bin(daemon), "-D", "-f", str(self.conf)], env=self.env,
                                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
            if daemon == "slurmctld":
                self._wait(lambda: self._run(["scontrol", "ping"], check=False).stdout.count("UP") > 0, timeout,
                           "slurmctld did not answer")
        self._wait(lambda: self._run(["sinfo", "-h", "-o", "%t"], check=False).stdout.strip() in ("idle", "mix"),
                   timeout, "the node did not become idle")
        return self

    def stop(self) -> None:
        for p in reversed(self._procs):
            if p.poll() is None:
                p.terminate()
        for p in reversed(self._procs):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self._procs.clear()
        if self._munged_pid is not None:
            try:
                os.kill(self._munged_pid, 15)
            except ProcessLookupError:
                pass
            self._munged_pid = None

    def logs(self) -> str:
        """The daemons' logs, for a failing test's message."""
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted((self.root / "log").glob("*")) if p.is_file())

    # -- jobs ---------------------------------------------------------------------------------
    def sbatch(self, args: list[str], env: dict[str, str] | None = None, cwd: str | Path | None = None) -> int:
        out = self._run(["sbatch", "--parsable", *args], env=env, cwd=cwd).stdout.strip()
        return int(out.split(";")[0].split("_")[0])

    def job_states(self, job_id: int) -> dict[str, dict[str, str]]:
        """{'<id>' or '<id>_<task>': fields of ``scontrol show job``} for a job or array, while slurmctld
        remembers it (MinJobAge below)."""
        res = self._run(["scontrol", "-o", "show", "job", str(job_id)], check=False)
        jobs = {}
        for line in res.stdout.splitlines():
            fields = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
            key = fields.get("JobId", "")
            if "ArrayTaskId" in fields:
                key = f"{fields['ArrayJobId']}_{fields['ArrayTaskId']}"
            jobs[key] = fields
        return jobs

    def wait(self, job_id: int, timeout: float) -> dict[str, dict[str, str]]:
        """Wait until every task of the job has ended; returns their final fields."""
        done = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = self.job_states(job_id)
            if states and all(f.get("JobState") in done for f in states.values()):
                return states
            time.sleep(1)
        raise TimeoutError(f"job {job_id} still running after {timeout:.0f}s: {self.job_states(job_id)}")

    def signal(self, job_id: int, sig: str) -> None:
        """``scancel --signal``: every process of the job's steps gets it, as at a preemption warning."""
        self._run(["scancel", f"--signal={sig}", str(job_id)])

    # -- internals --------------------------------------------------------------------------
    @staticmethod
    def _bin(name: str) -> str:
        return shutil.which(name) or f"/usr/sbin/{name}"

    def _run(self, cmd: list[str], check: bool = True, env: dict[str, str] | None = None,
             cwd: str | Path | None = None) -> subprocess.CompletedProcess:
        res = subprocess.run(cmd, env={**self.env, **(env or {})}, cwd=cwd, capture_output=True, text=True,
                             timeout=60)
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()}\n{self.logs()}")
        return res

    def _wait(self, ok, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self._procs):
                raise RuntimeError(f"a SLURM daemon exited at start\n{self.logs()}")
            if ok():
                return
            time.sleep(0.5)
        raise RuntimeError(f"{what} within {timeout:.0f}s\n{self.logs()}")

    def _start_munge(self) -> None:
        if subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0:
            return  # a munged is already serving the default socket
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            key.write_bytes(os.urandom(1024))
            shutil.chown(key, "munge", "munge")
            key.chmod(0o400)
        run_dir = Path("/run/munge")
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.chown(run_dir, "munge", "munge")
        pid_file = run_dir / "munged.pid"
        subprocess.run(["runuser", "-u", "munge", "--", self._bin("munged")], check=True, capture_output=True)
        self._wait(lambda: subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0,
                   20, "munged did not start")
        if pid_file.exists():
            self._munged_pid = int(pid_file.read_text().split()[0])

    def _write_config(self) -> None:
        r = self.root
        (r / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\nIgnoreSystemd=yes\n")
        self.conf.write_text(f"""\
ClusterName=pecotest
SlurmctldHost={self.host}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
# a requeued job waits for its launch credentials to expire (default 120 s) before it may start again
AuthInfo=cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd.pid'}
SlurmctldLogFile={r / 'log' / 'slurmctld.log'}
SlurmdLogFile={r / 'log' / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
# the main and backfill schedulers every second (defaults 60 s / 30 s): a requeued job starts once eligible
SchedulerParameters=sched_interval=1,bf_interval=1
MinJobAge=600
KillWait=30
InactiveLimit=0
SlurmdTimeout=300
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
NodeName={self.host} CPUs={self.cpus} RealMemory={_memory_mb()} State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
""")
