"""A private libvirtd (+ virtlogd) for tests, in its own mount namespace, that leaves nothing behind.

Inside `unshare --mount --propagation private`: a tmpfs over /run (so nothing is created in the machine's /run),
a temporary folder bound at /run/libvirt, and private folders bound over /var/lib/libvirt, /etc/libvirt,
/var/log/libvirt and /var/cache/libvirt. The machine's own libvirt (if any) and other tests' daemons are untouched.

The test process stays outside the namespace and reaches the daemon through its socket in the temporary folder:
`qemu+unix:///system?socket=<tmp>/run/libvirt-sock` (see `uri`). QEMU runs as root (set in the PRIVATE qemu.conf)
so that /dev/kvm works without changing its mode on the machine; cgroups and security drivers are off so that
several private daemons never collide on a cgroup path.

Every process is stopped BY PID (QEMUs from their pid files, libvirtd, virtlogd, the namespace holder), also when
the start fails; then the folder is removed. Usage:

    with PrivateLibvirtd() as lv:
        conn = libvirt.open(lv.uri)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from types import TracebackType

LIBVIRTD_CONF = """\
unix_sock_group = "root"
unix_sock_rw_perms = "0700"
unix_sock_ro_perms = "0700"
unix_sock_admin_perms = "0700"
auth_unix_rw = "none"
auth_unix_ro = "none"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
"""

QEMU_CONF = """\
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
namespaces = []
cgroup_controllers = []
"""

_HOLDER_SCRIPT = """\
set -e
mount -t tmpfs -o mode=0755 kvmha-test-run /run
mkdir -p /run/libvirt /run/lock
mount --bind "$1/run" /run/libvirt
mount --bind "$1/lib" /var/lib/libvirt
mount --bind "$1/etc" /etc/libvirt
mount --bind "$1/log" /var/log/libvirt
mount --bind "$1/cache" /var/cache/libvirt
virtlogd -d -p /run/libvirt/virtlogd.pid
touch "$1/ready"
exec "$2" -c "$3"
"""

# The namespace holder after set-up. If the test process dies without stop() (SIGKILL, CI timeout), the kernel
# sends this process SIGTERM (PR_SET_PDEATHSIG) and it kills what would otherwise outlive the test: the QEMUs and
# virtlogd, by the PIDs in their pid files (checked against their command lines). libvirtd follows on its own: its
# reaper has the same death signal.
_HOLDER_PY = """
import ctypes, glob, os, signal
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
def cleanup(*_args):
    for path in glob.glob("/run/libvirt/qemu/*.pid") + ["/run/libvirt/virtlogd.pid"]:
        try:
            pid = int(open(path).read().strip())
            if b"qemu" in open(f"/proc/{pid}/cmdline", "rb").read() or path.endswith("virtlogd.pid"):
                os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError):
            pass
    os._exit(0)
signal.signal(signal.SIGTERM, cleanup)
if os.getppid() == 1:
    cleanup()
while True:
    signal.pause()
"""


# libvirt reports a QEMU death (STOPPED event) only once the QEMU pid is gone, i.e. reaped. QEMU is daemonized, so
# its parent is the nearest "child subreaper" above libvirtd, else PID 1. Some sandboxes' PID 1 reaps orphans only
# every ~1-2 s (systemd reaps at once), which would add that much to every kill-to-event time measured here; so
# libvirtd runs under this small reaper: it forwards signals to libvirtd, reaps every orphan at once, and exits
# with libvirtd's status (QEMUs that outlive libvirtd then go back to PID 1, as on a host).
_REAPER = """
import ctypes, os, signal, sys
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG: the test died
child = os.fork()
if child == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(sig, lambda signum, _frame: os.kill(child, signum))
while True:
    try:
        pid, status = os.wait()
    except ChildProcessError:
        sys.exit(0)
    if pid == child:
        sys.exit(os.waitstatus_to_exitcode(status) & 0xFF)
"""


class LibvirtdError(RuntimeError):
    pass


def available() -> str | None:
    """None when a private libvirtd can run here, else why not (for pytest.skip)."""
    if os.geteuid() != 0:
        return "needs root (mount namespace, QEMU as root)"
    for tool in ("libvirtd", "virtlogd", "unshare", "nsenter", "virsh", "qemu-system-x86_64"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _kill(pid: int, sig: int, must_contain: str) -> None:
    """Signal one process by PID, after checking it is what we think (a pid file may outlive its process)."""
    if must_contain in _cmdline(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while _alive(pid) and must_wait(deadline):
        time.sleep(0.05)
    return not _alive(pid)


def must_wait(deadline: float) -> bool:
    return time.monotonic() < deadline


class PrivateLibvirtd:
    def __init__(self, prefix: str = "kvmha-lv-") -> None:
        self.base = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
        self.run_dir = os.path.join(self.base, "run")
        for sub in ("run", "lib", "etc", "log", "cache"):
            os.makedirs(os.path.join(self.base, sub), mode=0o755)
        with open(os.path.join(self.base, "etc", "libvirtd.conf"), "w") as fh:
            fh.write(LIBVIRTD_CONF)
        with open(os.path.join(self.base, "etc", "qemu.conf"), "w") as fh:
            fh.write(QEMU_CONF)
        for name in ("virtlogd.conf", "libvirt.conf"):
            open(os.path.join(self.base, "etc", name), "w").close()
        self._holder: subprocess.Popen[bytes] | None = None
        self._libvirtd: subprocess.Popen[bytes] | None = None
        self._stderr_path = os.path.join(self.base, "libvirtd.stderr")

    @property
    def socket_path(self) -> str:
        return os.path.join(self.run_dir, "libvirt-sock")

    @property
    def uri(self) -> str:
        return f"qemu+unix:///system?socket={self.socket_path}"

    @property
    def domain_type(self) -> str:
        """'kvm' when /dev/kvm is there (QEMU runs as root, so it can open it), else TCG ('qemu')."""
        forced = os.environ.get("KVMHA_TEST_DOMAIN_TYPE")
        if forced:
            return forced
        return "kvm" if os.path.exists("/dev/kvm") else "qemu"

    # -- lifecycle ------------------------------------------------------------------------------------------
    def __enter__(self) -> PrivateLibvirtd:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self, timeout_s: float = 60.0) -> PrivateLibvirtd:
        try:
            self._holder = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", _HOLDER_SCRIPT, "sh", self.base,
                 sys.executable, _HOLDER_PY],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=open(os.path.join(self.base, "holder.stderr"), "wb"))  # noqa: SIM115 - the child owns it
            deadline = time.monotonic() + timeout_s
            while not os.path.exists(os.path.join(self.base, "ready")):
                if self._holder.poll() is not None or time.monotonic() > deadline:
                    raise LibvirtdError(f"namespace set-up failed: {self._read('holder.stderr')}")
                time.sleep(0.05)
            self.start_libvirtd(max(1.0, deadline - time.monotonic()))
        except BaseException:
            self.stop()
            raise
        return self

    def start_libvirtd(self, timeout_s: float = 60.0) -> None:
        """(Re)start libvirtd in the namespace and wait until it answers on its socket."""
        assert self._holder is not None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        stderr = open(self._stderr_path, "ab")  # noqa: SIM115 - handed to the child
        # nsenter without --fork execs the reaper, which runs libvirtd as its only direct child.
        self._libvirtd = subprocess.Popen(
            ["nsenter", "-t", str(self._holder.pid), "-m", "--", sys.executable, "-c", _REAPER,
             "libvirtd", "-p", "/run/libvirt/libvirtd.pid"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)
        stderr.close()
        deadline = time.monotonic() + timeout_s
        while True:
            if self._libvirtd.poll() is not None:
                raise LibvirtdError(f"libvirtd exited {self._libvirtd.returncode}: {self._read('libvirtd.stderr')}"
                                    f" {self._read('log/libvirtd.log')[-2000:]}")
            if os.path.exists(self.socket_path) and self.virsh("version", check=False).returncode == 0:
                return
            if time.monotonic() > deadline:
                raise LibvirtdError(f"libvirtd did not answer within {timeout_s}s: {self._read('libvirtd.stderr')}")
            time.sleep(0.1)

    def stop_libvirtd(self, sig: int = signal.SIGTERM) -> None:
        """Stop only libvirtd (its QEMUs keep running, as on a real host), by PID."""
        proc, self._libvirtd = self._libvirtd, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def restart_libvirtd(self) -> None:
        self.stop_libvirtd()
        self.start_libvirtd()

    @property
    def libvirtd_pid(self) -> int | None:
        return self._pid_file("libvirtd.pid")

    def qemu_pid(self, domain_name: str) -> int:
        """The QEMU process of a running domain, from the pid file libvirt keeps for it."""
        with open(os.path.join(self.run_dir, "qemu", f"{domain_name}.pid")) as fh:
            pid = int(fh.read().strip())
        if "qemu" not in _cmdline(pid):
            raise LibvirtdError(f"pid {pid} of {domain_name} is not a QEMU process")
        return pid

    def stop(self) -> None:
        """Stop everything by PID and remove the folder; safe to call twice and after a failed start."""
        qemu_dir = os.path.join(self.run_dir, "qemu")
        qemu_pids = []
        if os.path.isdir(qemu_dir):
            for name in os.listdir(qemu_dir):
                if name.endswith(".pid"):
                    with contextlib.suppress(OSError, ValueError), open(os.path.join(qemu_dir, name)) as fh:
                        qemu_pids.append(int(fh.read().strip()))
        for pid in qemu_pids:
            _kill(pid, signal.SIGKILL, "qemu")
        self.stop_libvirtd()
        virtlogd_pid = self._pid_file("virtlogd.pid")
        if virtlogd_pid is not None:
            _kill(virtlogd_pid, signal.SIGTERM, "virtlogd")
            if not _wait_gone(virtlogd_pid, 5):
                _kill(virtlogd_pid, signal.SIGKILL, "virtlogd")
        for pid in qemu_pids:
            _wait_gone(pid, 5)
        if self._holder is not None:
            if self._holder.poll() is None:
                self._holder.kill()
            self._holder.wait(timeout=10)
            self._holder = None
        shutil.rmtree(self.base, ignore_errors=True)

    # -- helpers --------------------------------------------------------------------------------------------
    def virsh(self, *args: str, check: bool = True, timeout_s: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["virsh", "-c", self.uri, *args], capture_output=True, text=True, check=check,
                              timeout=timeout_s)

    def _pid_file(self, name: str) -> int | None:
        try:
            with open(os.path.join(self.run_dir, name)) as fh:
                return int(fh.read().strip())
        except (OSError, ValueError):
            return None

    def _read(self, rel: str) -> str:
        try:
            with open(os.path.join(self.base, rel), errors="replace") as fh:
                return fh.read()[-4000:]
        except OSError:
            return ""
