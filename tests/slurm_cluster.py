"""A real one-node SLURM cluster for the tests (Debian's slurm-wlm and munge).

munged, slurmctld and slurmd run in the foreground as children of the test process, with every
file (keys, sockets, state, spool, logs, pids) in one temporary folder and the two SLURM ports
picked free on 127.0.0.1; clients find the cluster through SLURM_CONF alone. The node looks like
a PACE GPU node (16 CPUs, 256 GB, four H100s) so that sbatch/cluster.env's defaults are accepted
as they are: SlurmdParameters=config_overrides lets slurmd announce more than this machine has,
and the GPUs are character devices made with mknod (SLURM rejects plain files) that jobs see
through CUDA_VISIBLE_DEVICES. No accounting (no slurmdbd): sacct exits 1, as the runner expects.

    python tests/slurm_cluster.py DIR     # start one by hand; prints how to use and stop it

/work/shared/design/traps.md has what was checked about starting it on this kind of machine.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

SBIN = os.pathsep.join(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scancel", "scontrol", "sinfo")
APT = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "slurm-wlm", "munge"]
NODE = {"CPUs": 16, "RealMemory": 256000, "gpus": 4, "gpu_type": "H100"}


def which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=SBIN)


def missing() -> list[str]:
    return [n for n in (*DAEMONS, *CLIENTS) if which(n) is None]


def ensure_installed() -> str | None:
    """None when SLURM and munge are here (installed now from Debian's packages if we may),
    else the one-line reason why the tests that need them cannot run."""
    if not missing():
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        why = "not root" if os.geteuid() != 0 else "no apt-get"
        return (
            f"SLURM tests skipped: {', '.join(missing())} not installed and cannot install here "
            f"({why}); run `{' '.join(APT)}` as root (tests/run.sh does)"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    r = subprocess.run(APT, env=env, capture_output=True, text=True)
    if r.returncode != 0:  # the package lists may be missing on a fresh machine
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        r = subprocess.run(APT, env=env, capture_output=True, text=True)
    if missing():
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["?"]
        return f"SLURM tests skipped: `{' '.join(APT)}` failed: {tail[0]}"
    return None


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Cluster:
    """start() to an idle node, stop() after: jobs cancelled, daemons gone."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.procs: dict[str, subprocess.Popen] = {}

    def write_config(self) -> None:
        t = self.root
        for d in ("state", "spool", "dev", "log"):
            (t / d).mkdir(parents=True, exist_ok=True)
        t.chmod(0o700)  # munged refuses a socket folder others may write to
        gpus = NODE["gpus"]
        for i in range(gpus):
            dev = t / "dev" / f"gpu{i}"
            if not dev.exists():
                os.mknod(dev, 0o666 | 0o020000, os.makedev(1, 3))  # a character device
        (t / "gres.conf").write_text(
            f"NodeName=localhost Name=gpu Type={NODE['gpu_type']} File={t}/dev/gpu[0-{gpus - 1}]\n"
        )
        ctld, slurmd = free_ports(2)
        lines = {
            "ClusterName": "fdllmtest",
            "SlurmctldHost": "localhost",
            "SlurmUser": "root",
            "AuthType": "auth/munge",
            "AuthInfo": f"socket={t}/munge.sock",
            "SlurmctldPort": ctld,
            "SlurmdPort": slurmd,
            "StateSaveLocation": t / "state",
            "SlurmdSpoolDir": t / "spool",
            "SlurmctldLogFile": t / "log/slurmctld.log",
            "SlurmdLogFile": t / "log/slurmd.log",
            "SlurmctldPidFile": t / "slurmctld.pid",
            "SlurmdPidFile": t / "slurmd.pid",
            "ProctrackType": "proctrack/linuxproc",
            "TaskPlugin": "task/none",
            "AccountingStorageType": "accounting_storage/none",
            "JobAcctGatherType": "jobacct_gather/none",
            "SelectType": "select/cons_tres",
            "SelectTypeParameters": "CR_Core",
            "MpiDefault": "none",
            "ReturnToService": 2,
            "MinJobAge": 300,
            "SchedulerParameters": "sched_interval=2",
            "SlurmdParameters": "config_overrides",
            "GresTypes": "gpu",
        }
        text = "".join(f"{k}={v}\n" for k, v in lines.items())
        text += (
            f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={NODE['CPUs']} "
            f"RealMemory={NODE['RealMemory']} Gres=gpu:{NODE['gpu_type']}:{gpus}\n"
            "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP\n"
        )
        self.conf.write_text(text)

    def _daemon(self, name: str, argv: list[str]) -> None:
        out = open(self.root / "log" / f"{name}.out", "w")  # noqa: SIM115 (kept by the child)
        self.procs[name] = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        out.close()

    def start(self, timeout_s: float = 60) -> None:
        t = self.root
        self.write_config()
        key = t / "munge.key"
        if not key.exists():
            subprocess.run([which("mungekey"), "-c", "-k", str(key)], check=True)
        munged = [which("munged"), "-F", "--force", "-S", f"{t}/munge.sock"]
        munged += [f"--key-file={key}", f"--pid-file={t}/munged.pid"]
        munged += [f"--log-file={t}/log/munged.log", f"--seed-file={t}/munge.seed"]
        self._daemon("munged", munged)
        self._wait(lambda: (t / "munge.sock").exists(), timeout_s, "munged's socket")
        self._daemon("slurmctld", [which("slurmctld"), "-D", "-f", str(self.conf)])
        self._daemon("slurmd", [which("slurmd"), "-D", "-N", "localhost", "-f", str(self.conf)])
        self._wait(lambda: self.node_state() == "idle", timeout_s, "an idle node")

    def node_state(self) -> str:
        r = self.run(["sinfo", "-h", "-o", "%T"], check=False)
        return r.stdout.strip() if r.returncode == 0 else ""

    def run(self, argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=60)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")
        return r

    def jobs(self) -> list[str]:
        """Every live job and array task, one id each (`squeue -r`)."""
        return self.run(["squeue", "-h", "-r", "-o", "%i"]).stdout.split()

    def drain(self, timeout_s: float = 60) -> None:
        """Wait until the queue is empty (a task that wrote its DONE marker is still listed
        while it exits)."""
        self._wait(lambda: not self.jobs(), timeout_s, "an empty queue")

    def cancel_all(self, timeout_s: float = 60) -> None:
        self.run(["scancel", "--user", str(os.getuid())], check=False)
        self._wait(lambda: not self.jobs(), timeout_s, "an empty queue")

    def _wait(self, cond, timeout_s: float, what: str) -> None:
        deadline = time.time() + timeout_s
        while not cond():
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(
                        f"{name} exited ({p.returncode}) while waiting for {what}:\n" + self.logs()
                    )
            if time.time() > deadline:
                raise RuntimeError(f"no {what} after {timeout_s:.0f} s:\n" + self.logs())
            time.sleep(0.1)

    def logs(self, lines: int = 15) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*")):
            tail = f.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {f}\n" + "\n".join(tail))
        return "\n".join(out)

    def stop(self) -> None:
        """Cancel every job (a shutdown alone leaves running jobs behind), stop the daemons."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            with contextlib.suppress(RuntimeError):
                self.cancel_all(timeout_s=30)
            self.run(["scontrol", "shutdown"], check=False)
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            if name == "munged":  # the SLURM daemons stop on `scontrol shutdown`, munged on TERM
                p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/slurm_cluster.py DIR")
    if reason := ensure_installed():
        sys.exit(reason)
    c = Cluster(Path(sys.argv[1]).resolve())
    c.start()
    print(f"export SLURM_CONF={c.conf}")
    print(f"# to stop it: scancel -u $USER; scontrol shutdown; kill $(cat {c.root}/munged.pid)")
