"""The init of a lab host: PID 1 of the host's PID namespace, started by the host's BMC at power-on.

Theory of operation. The BMC's startcmd runs `ip netns exec <netns> unshare --pid --fork --kill-child
--mount-proc --propagation private python -m kvmha.lab.boot <boot.json>`. This process is therefore PID 1 of a new
PID namespace, in a new private mount namespace, in the host's network namespace. It

1. makes the host's private filesystem view: a tmpfs over /run/libvirt (sockets, pid files and the status of
   running domains die with the host, as on a real reboot) and binds of the host's own folders over /var/lib/libvirt,
   /etc/libvirt, /var/log/libvirt, /var/cache/libvirt; and a bind of the shared storage onto itself, so that a
   storage fault can be injected into this host's view alone;
2. starts virtlogd, virtlockd, libvirtd (in the foreground, as its children, each with an explicit pid file under
   the private /run/libvirt) and, when configured, the kvmha agent; each waits for the socket of the one before;
3. reaps every process that ends in the host. It must: libvirt double-forks QEMU and its capability probes, which
   are then re-parented to PID 1, and a PID 1 that does not reap leaves zombies that libvirt waits 40 s on
   ("Failed to terminate process ... with SIGKILL: Device or resource busy");
4. on SIGHUP (sent by `kvmha-lab heal`) starts again the services that are not running, so a killed libvirtd or
   agent stays dead until healed. It never restarts anything by itself: faults must last until healed.

When this process dies (BMC power off kills the unshare above it, whose --kill-child sends it SIGKILL) the kernel
kills every process of the namespace: libvirt daemons, the agent and every QEMU, as when a plug is pulled.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

SOCKET_WAIT_S = 60.0


@dataclass(frozen=True)
class Service:
    name: str
    argv: list[str]
    wait_for: str | None  # a socket path that exists once the service is ready for the next one


@dataclass(frozen=True)
class BootConfig:
    host: str
    tmpfs: list[str]
    binds: list[tuple[str, str]]
    log_dir: str  # inside the host, after the binds: where each service's output goes
    boot_log: str  # this init's own log
    services: list[Service]
    # Folders to keep visible when a tmpfs covers a folder above them (the Pacemaker stack's private /run would hide
    # the shared storage of a lab whose state dir is under /run): opened before the tmpfs mounts, bound back after.
    keep: list[str] = field(default_factory=list)

    @staticmethod
    def load(path: Path) -> BootConfig:
        raw = json.loads(path.read_text())
        return BootConfig(
            host=raw["host"],
            tmpfs=list(raw["tmpfs"]),
            binds=[(src, dst) for src, dst in raw["binds"]],
            log_dir=raw["log_dir"],
            boot_log=raw["boot_log"],
            services=[Service(s["name"], list(s["argv"]), s.get("wait_for")) for s in raw["services"]],
            keep=list(raw.get("keep", [])),
        )

    def dump(self) -> str:
        return json.dumps(
            {
                "host": self.host,
                "tmpfs": self.tmpfs,
                "binds": [list(b) for b in self.binds],
                "log_dir": self.log_dir,
                "boot_log": self.boot_log,
                "services": [{"name": s.name, "argv": s.argv, "wait_for": s.wait_for} for s in self.services],
                "keep": self.keep,
            },
            indent=2,
        )


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} boot: {message}", flush=True)


def mount_private_view(config: BootConfig) -> None:
    # Binds first: their sources may live under a folder a tmpfs is about to cover (a state dir under /run).
    kept = {path: os.open(path, os.O_PATH | os.O_DIRECTORY) for path in config.keep}
    for source, target in config.binds:
        subprocess.run(["mount", "--bind", source, target], check=True)
    for target in config.tmpfs:
        os.makedirs(target, exist_ok=True)  # /run/libvirt inside a fresh private /run
        mode = "1777" if target == "/dev/shm" else "0755"
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"mode={mode},size=64m", "kvmha-lab", target], check=True)
    for path, fd in kept.items():
        os.makedirs(path, exist_ok=True)
        # --no-canonicalize: the kernel must follow the fd itself; its path string now names the empty new folder.
        subprocess.run(["mount", "--no-canonicalize", "--bind", f"/proc/self/fd/{fd}", path], check=True,
                       pass_fds=(fd,))
        os.close(fd)


class Init:
    def __init__(self, config: BootConfig) -> None:
        self.config = config
        self.running: dict[str, int] = {}  # service name -> PID (inside the host)
        self.heal_requested = False

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            for name, service_pid in list(self.running.items()):
                if service_pid == pid:
                    del self.running[name]
                    log(f"{name} (pid {pid}) ended: status {status}")

    def start(self, service: Service) -> None:
        log_path = Path(self.config.log_dir) / f"{service.name}.log"
        with open(log_path, "ab") as out:
            child = subprocess.Popen(
                service.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.running[service.name] = child.pid
        log(f"started {service.name} (pid {child.pid})")
        if service.wait_for:
            self.wait_for_socket(service)

    def wait_for_socket(self, service: Service) -> None:
        assert service.wait_for is not None
        deadline = time.monotonic() + SOCKET_WAIT_S
        while not os.path.exists(service.wait_for):
            self.reap()
            if service.name not in self.running:
                log(f"{service.name} died before {service.wait_for} appeared")
                return
            if time.monotonic() > deadline:
                log(f"{service.wait_for} did not appear within {SOCKET_WAIT_S:.0f} s")
                return
            time.sleep(0.05)

    def start_missing(self) -> None:
        for service in self.config.services:
            if service.name not in self.running:
                if service.wait_for and os.path.exists(service.wait_for):
                    # A killed daemon leaves its socket file behind; the wait must see the new one.
                    os.unlink(service.wait_for)
                self.start(service)

    def run_forever(self) -> None:
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)

        def on_hup(_sig: int, _frame: FrameType | None) -> None:
            self.heal_requested = True

        signal.signal(signal.SIGHUP, on_hup)
        # A handler (not SIG_IGN) so that the wakeup fd sees SIGCHLD; ignoring it would auto-reap behind our back.
        signal.signal(signal.SIGCHLD, lambda _sig, _frame: None)
        self.start_missing()
        log("host is up")
        while True:
            select.select([wake_r], [], [], 5.0)
            with contextlib.suppress(BlockingIOError):
                os.read(wake_r, 512)
            self.reap()
            if self.heal_requested:
                self.heal_requested = False
                log("heal: starting services that are not running")
                self.start_missing()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m kvmha.lab.boot BOOT_JSON", file=sys.stderr)
        return 2
    if os.getpid() != 1:
        print("kvmha.lab.boot must be PID 1 of the lab host's PID namespace", file=sys.stderr)
        return 2
    config = BootConfig.load(Path(args[0]))
    # The BMC runs us with its own stdout; the host's story belongs in the host's folder.
    log_fd = os.open(config.boot_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    log(f"booting {config.host}")
    mount_private_view(config)
    os.environ["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    Init(config).run_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
