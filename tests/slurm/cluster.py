"""A one-node SLURM cluster on this machine, for the tests and for trying train.sh
by hand: munged, slurmctld and slurmd as root on 127.0.0.1, everything (keys,
state, spool, logs, sockets) under one folder, no accounting database.

    python tests/slurm/cluster.py start DIR   # prints: export SLURM_CONF=DIR/slurm.conf
    export SLURM_CONF=DIR/slurm.conf           # sbatch, squeue, scontrol now talk to it
    python tests/slurm/cluster.py stop DIR     # cancels the jobs, stops the daemons

The node describes itself as a small GPU node (16 CPUs, 64 GB, 4 GPUs, the GPUs a
count without device files) whatever the machine has (SlurmdParameters=
config_overrides), so train.sh is submitted with its own #SBATCH header unchanged.
Needs Debian's slurm-wlm and munge (bash .ci/install-slurm.sh).
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo")
NODE = "CPUs=16 Boards=1 SocketsPerBoard=1 CoresPerSocket=16 ThreadsPerCore=1 RealMemory=65536 Gres=gpu:4"


def missing():
    """The programs of a SLURM cluster that are not installed (empty when all are)."""
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return [d for d in DAEMONS if shutil.which(d, path=path) is None]


def free_ports(n):
    """n TCP ports on 127.0.0.1 that nothing listens on now."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def write_conf(root):
    """Write root/slurm.conf and root/gres.conf; return the slurm.conf path."""
    host = socket.gethostname().split(".")[0]
    ctld_port, slurmd_port = free_ports(2)
    conf = f"""\
# Written by tests/slurm/cluster.py: a one-node test cluster.
ClusterName=gntest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
# The container has no systemd and no delegated cgroups: root runs the daemons,
# processes are tracked through /proc, tasks are not confined.
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire: a requeued job waits this long (default 120 s) before it may start again.
AuthInfo=socket={root}/munge/munge.socket.2,cred_expire=5
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
# Look at pending jobs every 2 s (the defaults, 30-60 s, would slow a requeue).
SchedulerParameters=sched_interval=2,bf_interval=2
ReturnToService=2
SlurmdParameters=config_overrides
GresTypes=gpu
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName={host} NodeAddr=127.0.0.1 {NODE} State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
    (root / "slurm.conf").write_text(conf)
    # Slurm drops GPUs without a device file: links to /dev/null stand in for them.
    (root / "dev").mkdir(exist_ok=True)
    for i in range(4):
        (root / "dev" / f"gpu{i}").unlink(missing_ok=True)
        (root / "dev" / f"gpu{i}").symlink_to("/dev/null")
    (root / "gres.conf").write_text(f"NodeName={host} Name=gpu File={root}/dev/gpu[0-3]\n")
    return root / "slurm.conf"


def start_munged(root):
    """A munged of our own, on its own socket and key (the system one is left alone)."""
    d = root / "munge"
    d.mkdir(mode=0o755)
    key = d / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    subprocess.run(["munged", "--force", f"--socket={d}/munge.socket.2", f"--key-file={key}",
                    f"--pid-file={d}/munged.pid", f"--log-file={d}/munged.log",
                    f"--seed-file={d}/munged.seed"], env=env(root), check=True)


def env(root):
    """os.environ with SLURM_CONF pointing at the cluster under root."""
    return {**os.environ, "SLURM_CONF": str(Path(root) / "slurm.conf"),
            "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin"}


def node_state(root):
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=env(root),
                         capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else f"(sinfo: {out.stderr.strip()})"


def start(root, timeout=60):
    """Start the cluster under root (created if missing); return its environment."""
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("state", "spool"):
        (root / sub).mkdir(exist_ok=True)
    write_conf(root)
    start_munged(root)
    e = env(root)
    # -i: ignore state left by an earlier cluster in this folder.
    subprocess.run(["slurmctld", "-i"], env=e, check=True)
    subprocess.run(["slurmd"], env=e, check=True)
    deadline = time.time() + timeout
    while (state := node_state(root)) != "idle":
        if time.time() > deadline:
            stop(root)
            raise RuntimeError(f"node not idle after {timeout} s (sinfo: {state}); "
                               f"see {root}/slurmctld.log and {root}/slurmd.log")
        time.sleep(0.5)
    return e


def pid_of(path):
    try:
        pid = int(Path(path).read_text().split()[0])
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError, IndexError):
        return None


def kill_and_wait(pid, timeout=15):
    """SIGTERM pid, then SIGKILL if it still runs after timeout seconds."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + wait
        while time.time() < deadline:
            if not Path(f"/proc/{pid}").exists() or "Z" in stat_state(pid):
                return
            time.sleep(0.1)


def stat_state(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "gone"


def processes(root):
    """Live processes started by the cluster under root: the daemons and every job process,
    all of which inherit SLURM_CONF=root/slurm.conf (zombies are not counted)."""
    mark = f"SLURM_CONF={Path(root).resolve()}/slurm.conf".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and mark in (proc / "environ").read_bytes().split(b"\0") \
                    and stat_state(proc.name) not in ("Z", "gone"):
                pids.append(int(proc.name))
        except OSError:
            pass
    return pids


def stop(root, timeout=60):
    """Cancel every job, wait for them to end, stop the daemons; return the pids that
    had to be killed by hand (empty when everything ended by itself)."""
    root = Path(root).resolve()
    e = env(root)
    if pid_of(root / "slurmctld.pid"):
        subprocess.run(["scancel", "--full", "--user", "root"], env=e, capture_output=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = subprocess.run(["squeue", "-h"], env=e, capture_output=True, text=True)
            if out.returncode != 0 or not out.stdout.strip():
                break
            time.sleep(0.5)
    for name in ("slurmd.pid", "slurmctld.pid", "munge/munged.pid"):
        if pid := pid_of(root / name):
            kill_and_wait(pid)
    killed = processes(root)
    for pid in killed:
        kill_and_wait(pid, timeout=5)
    return killed


def main(argv):
    if len(argv) != 3 or argv[1] not in ("start", "stop"):
        sys.exit(__doc__)
    if argv[1] == "start":
        if gone := missing():
            sys.exit(f"not installed: {' '.join(gone)} (bash .ci/install-slurm.sh)")
        start(argv[2])
        print(f"export SLURM_CONF={Path(argv[2]).resolve()}/slurm.conf")
    else:
        killed = stop(argv[2])
        print("stopped" + (f"; killed leftover job processes {killed}" if killed else ""))


if __name__ == "__main__":
    main(sys.argv)
