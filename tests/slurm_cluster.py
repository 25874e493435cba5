"""A real Slurm cluster on this one machine for the tests: slurmctld and two slurmd's as simulated nodes.

Slurm 22.05 and munge come from Debian's packages (installed with apt-get when missing; that needs
root, as in CI). Everything else lives in a temp dir: slurm.conf (found through SLURM_CONF, which
jobs inherit, so `srun` inside a job finds it too), spool, state, logs and PID files. Ports are
picked free so several test sessions on one machine do not meet. Only daemons this harness started
are stopped, each by the PID in its own PID file. munged is a private one too (its own socket under
/run, named in slurm.conf's AuthInfo), so no other session's cluster depends on it.
See ../shared/notes/slurm-local.md for what was measured and why each slurm.conf line is there.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
PROGRAMS = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "sinfo", "scancel", "munged")
NODES = ("node1", "node2")
MUNGE_KEY = Path("/etc/munge/munge.key")  # created by Debian's munge package


class SlurmUnavailable(Exception):
    """Slurm cannot be installed or started here; the message says why (tests skip with it)."""


def _run(
    cmd: list[str], timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _which(program: str) -> str | None:
    return shutil.which(program) or next(
        (str(p) for p in (Path("/usr/sbin") / program, Path("/sbin") / program) if p.is_file()), None
    )


def ensure_installed() -> None:
    """Install Slurm and munge with apt-get when a program is missing."""
    missing = [p for p in PROGRAMS if _which(p) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(
            f"Slurm is not installed ({', '.join(missing)} missing) and installing needs root"
        )
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable(
            f"Slurm is not installed ({', '.join(missing)} missing) and there is no apt-get"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # Waits for another session's apt-get instead of failing on the dpkg lock.
    install = ["apt-get", "-o", "DPkg::Lock::Timeout=300", "install", "-y", "--no-install-recommends"]
    done = _run([*install, *PACKAGES], env=env, timeout=900)
    if done.returncode != 0:  # e.g. no package lists yet (a fresh CI image)
        _run(["apt-get", "-o", "DPkg::Lock::Timeout=300", "update"], env=env, timeout=900)
        done = _run([*install, *PACKAGES], env=env, timeout=900)
    if done.returncode != 0:
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise SlurmUnavailable(f"apt-get install {' '.join(PACKAGES)} failed: {last[0]}")
    still = [p for p in PROGRAMS if _which(p) is None]
    if still:
        raise SlurmUnavailable(f"installed {' '.join(PACKAGES)} but {', '.join(still)} is missing")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _slurm_conf(root: Path, host: str, munge_socket: Path) -> str:
    ctld_port = _free_port()
    node_ports = [_free_port() for _ in NODES]
    nodes = "\n".join(
        f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs=2 RealMemory=2000"
        for name, port in zip(NODES, node_ports, strict=True)
    )
    return f"""\
ClusterName=peftrun-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# No cgroups in containers: track processes through /proc.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
# 22.05 rejects < 2; 4 keeps `sbatch --wait` polling every 2 s.
MinJobAge=4
# A requeued job may start again cred_expire + 1 s after its requeue (default 121 s); when nothing else
# happens by then, only the periodic scheduling pass starts it (default every 60 s).
AuthInfo=socket={munge_socket},cred_expire=5
SchedulerParameters=sched_interval=1
KillWait=10
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
SlurmdSpoolDir={root}/spool/%n
StateSaveLocation={root}/state
{nodes}
PartitionName=debug Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class LocalSlurm:
    """A running 2-node cluster; `env` is what every Slurm command (and the jobs) must run with."""

    root: Path
    env: dict[str, str]
    pid_files: dict[str, Path] = field(default_factory=dict)  # daemon name -> PID file (started here)
    munge_dir: Path | None = None

    @classmethod
    def start(cls, root: Path, timeout: float = 60) -> LocalSlurm:
        ensure_installed()
        host = socket.gethostname().split(".")[0]
        for sub in ("run", "log", "state", *(f"spool/{n}" for n in NODES)):
            (root / sub).mkdir(parents=True, exist_ok=True)
        conf = root / "slurm.conf"
        cluster = cls(root, {**os.environ, "SLURM_CONF": str(conf)})
        try:
            conf.write_text(_slurm_conf(root, host, cluster._start_munge()))
            cluster._daemon("slurmctld", root / "run" / "slurmctld.pid", ["-f", str(conf)])
            for node in NODES:
                cluster._daemon("slurmd", root / "run" / f"slurmd-{node}.pid", ["-f", str(conf), "-N", node])
            cluster._wait_idle(timeout)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    # ---- commands ------------------------------------------------------------------------------------

    def run(self, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return _run(list(cmd), timeout=timeout, env=self.env)

    def job_state(self, job_id: str) -> str | None:
        """PENDING/RUNNING/... while the controller still knows the job (MinJobAge s after it ends)."""
        done = self.run("squeue", "-h", "-j", job_id, "-o", "%T")
        return done.stdout.strip() or None if done.returncode == 0 else None

    def wait_gone(self, job_id: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.job_state(job_id) is not None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {self.job_state(job_id)} after {timeout:.0f} s")
            time.sleep(0.5)

    def log(self, name: str) -> str:
        path = self.root / "log" / name
        return path.read_text(errors="replace") if path.is_file() else ""

    # ---- daemons -------------------------------------------------------------------------------------

    def _start_munge(self) -> Path:
        """Start a private munged; its socket. It runs as the munge user (as root it refuses: "Logfile
        is insecure"), which cannot enter the root-only pytest temp dirs: its files live under /run."""
        if not MUNGE_KEY.is_file():
            raise SlurmUnavailable(f"munge is installed but {MUNGE_KEY} is missing")
        self.munge_dir = Path(tempfile.mkdtemp(prefix="peftrun-munge.", dir="/run"))
        self.munge_dir.chmod(0o755)
        shutil.chown(self.munge_dir, "munge", "munge")
        sock = self.munge_dir / "munge.socket"
        files = {name: self.munge_dir / f"munged.{name}" for name in ("log", "pid", "seed")}
        args = [f"--socket={sock}", f"--key-file={MUNGE_KEY}"]
        args += [f"--{name}-file={path}" for name, path in files.items()]
        done = _run(["runuser", "-u", "munge", "--", _which("munged") or "munged", *args], timeout=30)
        if done.returncode != 0:
            raise SlurmUnavailable(f"munged did not start: {done.stderr.strip()[-300:]}")
        self.pid_files["munged"] = files["pid"]
        check = f"munge -n -S {sock} | unmunge -S {sock}"
        self._wait_for(lambda: _run(["bash", "-c", check], timeout=10).returncode == 0, 10, "munged")
        return sock

    def _daemon(self, name: str, pid_file: Path, args: list[str]) -> None:
        done = _run([_which(name) or name, *args], timeout=30, env=self.env)
        if done.returncode != 0:
            raise SlurmUnavailable(
                f"{name} {' '.join(args)} failed: {(done.stderr or done.stdout).strip()[-500:]}"
            )
        self.pid_files[f"{name} {args[-1]}"] = pid_file
        self._wait_for(pid_file.is_file, 10, f"{name}'s PID file {pid_file}")

    def _wait_idle(self, timeout: float) -> None:
        def idle() -> bool:
            done = self.run("sinfo", "-h", "-o", "%D %T", timeout=10)
            return done.returncode == 0 and done.stdout.split() == [str(len(NODES)), "idle"]

        self._wait_for(idle, timeout, f"{len(NODES)} idle nodes")

    def _wait_for(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                logs = self.log("slurmctld.log")[-1500:] + self.log("slurmd-node1.log")[-1500:]
                raise SlurmUnavailable(f"timed out waiting for {what}\n{logs}")
            time.sleep(0.1)

    def stop(self, timeout: float = 60) -> None:
        """Cancel what is left, then stop the daemons started here (newest first), each by its PID file."""
        if any(name.startswith("slurmctld") for name in self.pid_files):
            self.run("scancel", "--partition", "debug", timeout=20)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                done = self.run("squeue", "-h", "-o", "%i", timeout=10)
                if done.returncode != 0 or not done.stdout.strip():
                    break
                time.sleep(0.5)
        # Each daemon takes ~2 s to exit: signal them all, then wait for them together.
        stopping = [_terminate(name.split()[0], pid_file) for name, pid_file in self.pid_files.items()]
        self.pid_files.clear()
        deadline = time.monotonic() + timeout
        while any(Path(f"/proc/{pid}").exists() for pid in stopping if pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if self.munge_dir is not None:
            shutil.rmtree(self.munge_dir, ignore_errors=True)
            self.munge_dir = None


def _terminate(program: str, pid_file: Path) -> int | None:
    """SIGTERM the process in `pid_file` if it is still `program` (a PID can be reused); its PID or None."""
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    comm = _run(["ps", "-o", "comm=", "-p", str(pid)], timeout=10).stdout.strip()
    if comm != program[:15]:  # comm is cut at 15 characters
        return None
    os.kill(pid, signal.SIGTERM)
    return pid
