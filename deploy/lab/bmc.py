"""A simulated BMC per lab host: OpenIPMI's ``ipmi_sim`` on a 127.0.0.1 UDP port, whose "power" is a process.

Theory of operation (everything below was observed on the project's Debian 12 machines, OpenIPMI 2.0.33; the
commands and timings are in the tests under ``tests/integration/``):

* **What is the power.** ``startcmd`` is run by ipmi_sim as ``/bin/sh -c "exec <startcmd>"`` (seen with strace), so
  the startcmd process *is* a direct child of ipmi_sim and must be one command (``exec`` makes ``a; b`` run only
  ``a``; wrap compound commands in ``sh -c '…'``). The chassis reads "on" exactly while that process exists.
* **Power off** sends SIGTERM to the startcmd PID only — not to its process group, so its own children survive
  unless the startcmd is the root of a PID namespace (``unshare --pid --fork --kill-child …``, as the lab does).
  Without a VM connection on the system interface (there is none here) the graceful step is skipped and SIGTERM
  comes on ipmi_sim's next 1 s timer tick: the status read "off" 0.8-1.2 s after the request for a process that
  dies on SIGTERM. A process that ignores SIGTERM gets SIGKILL ``kill_wait_s`` later (2.5 s in all with 2 s).
  ipmi_sim reaps it, so no zombie is left. ``poweroff_wait 0`` would disable SIGTERM and SIGKILL altogether, hence
  ``poweroff_wait_s`` must be positive.
* **Power on** runs startcmd again at once (a new PID); "power on" while on does nothing (no second process).
* **Killing ipmi_sim** (SIGTERM or SIGKILL) does *not* touch the startcmd process: it is re-parented to PID 1 and
  keeps running — a host whose BMC died. :meth:`BmcSimulator.stop` therefore also ends the host processes (every
  process left in the process group ipmi_sim leads), unless asked to leave them running (:meth:`kill_host` ends
  them later). On this machine PID 1 does not reap orphans, so a host process killed after ipmi_sim is gone stays
  a zombie; ``stop()`` ends the host processes *before* ipmi_sim, which reaps its own child.
* **Configuration that is required** (both omissions were seen to fail): the emulator file must say
  ``mc_setbmc 0x20`` before ``mc_add`` (else "No bmc_ipmb specified", or a segmentation fault when a startcmd is
  set); chassis power control needs a system-interface channel ``serial 15 <addr> <tcp-port> codec VM`` (else
  "Set Chassis Power Control failed: Invalid data field in request") — that channel listens on a TCP port, which
  here defaults to the same number as the UDP port. ``-n`` (no stdio) because ipmi_sim is not on a terminal.
* **State.** ipmi_sim persists users, LAN/SOL parameters, SEL and SDRs under ``<state-dir>/ipmi_sim/<name>/``
  (default state dir ``/var``); once a users file exists it wins over the config. Each simulator gets its own
  ``<workdir>/state`` (``-s``), emptied at every start, so simulators never share state and a start always follows
  the :class:`BmcConfig` (a factory-fresh BMC).
* ``ipmitool -I lanplus`` needs ``-C 3`` against ipmi_sim, else it spends 10 s on "Unable to Get Channel Cipher
  Suites" before each command.

Readiness is checked with an RMCP/ASF presence ping (ipmi_sim answers it on the LAN port), which needs no session.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Literal

IPMI_SIM = "ipmi_sim"
IPMITOOL = "ipmitool"
LOOPBACK = "127.0.0.1"

# RMCP header (version 6, no sequence, class ASF) + ASF presence ping (IANA 4542, type 0x80, tag 1, no data).
_ASF_PING = bytes([0x06, 0x00, 0xFF, 0x06, 0x00, 0x00, 0x11, 0xBE, 0x80, 0x01, 0x00, 0x00])
_ASF_PONG_TYPE = 0x40
_SAFE_WORD = re.compile(r"[A-Za-z0-9_.@+-]{1,16}")
_POLL_S = 0.05


class BmcError(RuntimeError):
    """The simulator could not be started, stopped or asked for its power state."""


@dataclass
class BmcConfig:
    """One simulated BMC. ``startcmd`` is the "power" of the host: running means on."""

    name: str
    port: int
    workdir: Path
    startcmd: str
    user: str = "admin"
    password: str = field(default="secret", repr=False)
    poweroff_wait_s: int = 2
    kill_wait_s: int = 2
    start_now: bool = True
    vm_port: int | None = None  # TCP port of the system interface ipmi_sim needs for power control; None: = port
    # Where the LAN channel answers. The lab runs each BMC in a network namespace of its own (netns) on the lab's
    # BMC network (kvmha.lab.bmcnet); without one, the BMC answers on 127.0.0.1 of the caller's namespace.
    address: str = LOOPBACK
    netns: str | None = None
    ready_timeout_s: float = 5.0
    stop_timeout_s: float = 5.0

    def validate(self) -> None:
        """Reject what would break the generated lan.conf (it has no quoting) or ipmi_sim's power control."""
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,32}", self.name):
            raise ValueError(f"BMC name {self.name!r}: use 1-32 letters, digits, '_', '.', '-'")
        for label, port in (("port", self.port), ("vm_port", self.vm_port)):
            if port is not None and not 0 < port < 65536:
                raise ValueError(f"{label} {port} out of range")
        if not self.startcmd.strip() or any(c in self.startcmd for c in '"\n\r\\'):
            raise ValueError("startcmd must be one non-empty line without double quotes or backslashes")
        try:
            ipaddress.ip_address(self.address)
        except ValueError:
            raise ValueError(f"BMC address {self.address!r} is not an IP address") from None
        if self.netns is not None and not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", self.netns):
            raise ValueError(f"network namespace name {self.netns!r}")
        if not _SAFE_WORD.fullmatch(self.user) or not _SAFE_WORD.fullmatch(self.password):
            raise ValueError("user and password: 1-16 characters of letters, digits and _.@+-")
        if self.poweroff_wait_s <= 0 or self.kill_wait_s <= 0:
            raise ValueError("poweroff_wait_s and kill_wait_s must be positive (0 disables the kill in ipmi_sim)")


@dataclass(frozen=True)
class _Proc:
    """A process as seen in /proc: the start time tells a PID apart from a later process reusing it."""

    pid: int
    ppid: int
    pgid: int
    state: str
    start_ticks: int

    @property
    def alive(self) -> bool:
        return self.state not in ("Z", "X")


def _read_proc(pid: int) -> _Proc | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # the command name may contain spaces and parentheses
    return _Proc(pid, int(fields[1]), int(fields[2]), fields[0], int(fields[19]))


def _all_procs() -> list[_Proc]:
    procs = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (proc := _read_proc(int(entry))) is not None:
            procs.append(proc)
    return procs


def _is_same_alive(proc: _Proc) -> bool:
    now = _read_proc(proc.pid)
    return now is not None and now.start_ticks == proc.start_ticks and now.alive


def _signal(proc: _Proc, sig: signal.Signals) -> None:
    if _is_same_alive(proc):  # re-checked right before the signal so a reused PID is never hit
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)


def _end_processes(procs: list[_Proc], term_wait_s: float, timeout_s: float) -> None:
    """SIGTERM, then SIGKILL what is left after ``term_wait_s``; waits (bounded) until all are gone."""
    for proc in procs:
        _signal(proc, signal.SIGTERM)
    if _wait_gone(procs, term_wait_s):
        return
    for proc in procs:
        _signal(proc, signal.SIGKILL)
    if not _wait_gone(procs, timeout_s):
        raise BmcError(f"processes {[p.pid for p in procs if _is_same_alive(p)]} survived SIGKILL")


def _wait_gone(procs: list[_Proc], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while any(_is_same_alive(p) for p in procs):
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_S)
    return True


def find_free_port() -> int:
    """A 127.0.0.1 port free for both UDP (the LAN channel) and TCP (the system interface, same number)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((LOOPBACK, 0))
            port = int(tcp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((LOOPBACK, port))
                except OSError:
                    continue
                return port
    raise BmcError("no free 127.0.0.1 port for both UDP and TCP")


def asf_ping(port: int, timeout_s: float, address: str = LOOPBACK) -> bool:
    """True if something answers an RMCP presence ping on address:port within ``timeout_s``."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout_s)
        try:
            sock.sendto(_ASF_PING, (address, port))
            data, _ = sock.recvfrom(512)
        except OSError:  # timeout, or ICMP port unreachable reported as ConnectionRefusedError
            return False
    return len(data) > 8 and data[8] == _ASF_PONG_TYPE


class BmcSimulator:
    """Runs one ``ipmi_sim`` as a child process; every signal it sends goes to a PID it started itself."""

    def __init__(self, config: BmcConfig) -> None:
        config.validate()
        self.config = config
        self._popen: subprocess.Popen[bytes] | None = None
        self._leader: _Proc | None = None  # ipmi_sim as it was at start: pid, start time, its process group
        self._orphan_group: _Proc | None = None  # set when stopped with the host left running

    def __repr__(self) -> str:
        return f"BmcSimulator(name={self.config.name!r}, port={self.config.port}, pid={self.pid})"

    @property
    def pid(self) -> int | None:
        """The PID of the running ipmi_sim, None when stopped."""
        if self._popen is None or self._popen.poll() is not None:
            return None
        return self._popen.pid

    @property
    def host_pid(self) -> int | None:
        """The PID of the startcmd process (the powered-on host), None when powered off or stopped."""
        pid = self.pid
        if pid is None:
            return None
        children = [p for p in _all_procs() if p.ppid == pid and p.alive]
        return children[0].pid if children else None

    @property
    def log_path(self) -> Path:
        return self.config.workdir / "ipmi_sim.log"

    def start(self) -> None:
        """Write the configuration, launch ipmi_sim and wait until it answers; raises :class:`BmcError` if not."""
        if self.pid is not None:
            raise BmcError(f"BMC {self.config.name} is already running (pid {self.pid})")
        self.kill_host()  # a host left running by stop(leave_host_running=True) would be a second "power"
        lan_conf, emu, state_dir = self._write_files()
        argv = [IPMI_SIM, "-n", "-c", str(lan_conf), "-f", str(emu), "-s", str(state_dir)]
        if self.config.netns:  # nsenter execs ipmi_sim after setns: the PID we start is still ipmi_sim's own
            argv = ["nsenter", f"--net=/run/netns/{self.config.netns}", "--", *argv]
        with self.log_path.open("ab") as log:
            self._popen = subprocess.Popen(
                argv,
                cwd=self.config.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: the host processes stay findable after it dies
            )
        self._leader = _read_proc(self._popen.pid)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def stop(self, *, leave_host_running: bool = False) -> None:
        """Stop ipmi_sim by PID (SIGTERM, SIGKILL after ``stop_timeout_s``). Idempotent.

        The host processes (startcmd and whatever it left in ipmi_sim's process group) are ended first, while
        ipmi_sim can still reap them — unless ``leave_host_running`` (a BMC failure with the host still up);
        :meth:`kill_host` or the next :meth:`start` / :meth:`stop` ends them then.
        """
        popen, leader = self._popen, self._leader
        if popen is None or leader is None:
            if not leave_host_running:
                self.kill_host()
            return
        if not leave_host_running and popen.poll() is None:
            self._end_host(leader)
        if popen.poll() is None:
            popen.terminate()  # Popen signals its own child's PID and no other
            try:
                popen.wait(timeout=self.config.stop_timeout_s)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait(timeout=self.config.stop_timeout_s)
        self._popen = None
        self._leader = None
        self._orphan_group = leader
        if not leave_host_running:
            self.kill_host()

    def kill_host(self) -> None:
        """End host processes left running after ipmi_sim stopped (a no-op when there are none)."""
        leader = self._orphan_group
        if leader is None:
            return
        if self.pid is None:
            now = _read_proc(leader.pid)
            if now is not None and now.start_ticks != leader.start_ticks:
                # The group id is in use by an unrelated process: ours are all gone, the number was reused.
                self._orphan_group = None
                return
            self._end_host(leader)
        self._orphan_group = None

    def power(self) -> Literal["on", "off"]:
        """The chassis power state as a client sees it, through ipmitool (lanplus)."""
        out = self._ipmitool("chassis", "power", "status")
        if out.rstrip().endswith(" on"):
            return "on"
        if out.rstrip().endswith(" off"):
            return "off"
        raise BmcError(f"BMC {self.config.name}: unexpected power status {out.strip()!r}")

    def chassis_power(self, action: Literal["on", "off"]) -> None:
        """Send a chassis power on/off request through ipmitool (for lab scripts and tests)."""
        self._ipmitool("chassis", "power", action)

    def __enter__(self) -> BmcSimulator:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _end_host(self, leader: _Proc) -> None:
        # SIGTERM first so a host root such as `unshare --kill-child` can take its namespace down; a host that
        # ignores it gets SIGKILL after at most 1 s (a teardown, not a simulated power off: no need to be patient).
        cfg = self.config
        _end_processes(self._group_members(leader), min(cfg.kill_wait_s, 1.0), cfg.stop_timeout_s)

    def _group_members(self, leader: _Proc) -> list[_Proc]:
        """Processes in ipmi_sim's process group, started after it, other than ipmi_sim: the host's processes."""
        return [
            p
            for p in _all_procs()
            if p.pgid == leader.pgid and p.pid != leader.pid and p.start_ticks >= leader.start_ticks and p.alive
        ]

    def _write_files(self) -> tuple[Path, Path, Path]:
        cfg = self.config
        cfg.workdir.mkdir(parents=True, exist_ok=True)
        state_dir = cfg.workdir / "state"
        shutil.rmtree(state_dir, ignore_errors=True)
        state_dir.mkdir()
        lan_conf = cfg.workdir / "lan.conf"
        lan_conf.touch(mode=0o600)  # it holds the password
        lan_conf.chmod(0o600)
        lan_conf.write_text(_lan_conf(cfg))
        emu = cfg.workdir / "bmc.emu"
        emu.write_text(
            "mc_setbmc 0x20\nmc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02 persist_sdr\nmc_enable 0x20\n"
        )
        return lan_conf, emu, state_dir

    def _wait_ready(self) -> None:
        assert self._popen is not None
        deadline = time.monotonic() + self.config.ready_timeout_s
        answered = False
        while time.monotonic() < deadline:
            if self._popen.poll() is not None:
                raise BmcError(
                    f"ipmi_sim for {self.config.name} exited with {self._popen.returncode}: {self._log_tail()}"
                )
            answered = answered or asf_ping(self.config.port, timeout_s=0.2, address=self.config.address)
            # With start_now the host must be up too, else the first power reading races the first start.
            if answered and (not self.config.start_now or self.host_pid is not None):
                return
            time.sleep(_POLL_S)
        where = f"{self.config.address}:{self.config.port}"
        what = "did not start its startcmd" if answered else f"did not answer on {where}"
        raise BmcError(
            f"ipmi_sim for {self.config.name} {what} within {self.config.ready_timeout_s} s: {self._log_tail()}"
        )

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-500:].strip() or "(empty log)"
        except OSError:
            return "(no log)"

    def _ipmitool(self, *args: str) -> str:
        cfg = self.config
        cmd = [IPMITOOL, "-I", "lanplus", "-C", "3", "-H", cfg.address, "-p", str(cfg.port), "-U", cfg.user, "-E"]
        cmd += ["-N", "1", "-R", "2", *args]
        # -E takes the password from the environment, so it is never on a command line others can read.
        env = {**os.environ, "IPMI_PASSWORD": cfg.password}
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=15, check=False)
        except subprocess.TimeoutExpired as exc:
            raise BmcError(f"BMC {cfg.name}: ipmitool {' '.join(args)} timed out") from exc
        if done.returncode != 0:
            raise BmcError(f"BMC {cfg.name}: ipmitool {' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout


def _lan_conf(cfg: BmcConfig) -> str:
    guid = hashlib.md5(cfg.name.encode(), usedforsecurity=False).hexdigest()
    vm_port = cfg.vm_port if cfg.vm_port is not None else cfg.port
    return f"""# Generated by kvmha.lab.bmc for {cfg.name}; rewritten at every start.
name "{cfg.name}"
set_working_mc 0x20
  startlan 1
    addr {cfg.address} {cfg.port}
    priv_limit admin
    allowed_auths_callback md5
    allowed_auths_user md5
    allowed_auths_operator md5
    allowed_auths_admin md5
    guid {guid}
  endlan
  serial 15 {LOOPBACK} {vm_port} codec VM
  startcmd "{cfg.startcmd}"
  startnow {"true" if cfg.start_now else "false"}
  poweroff_wait {cfg.poweroff_wait_s}
  kill_wait {cfg.kill_wait_s}
  user 2 true "{cfg.user}" "{cfg.password}" admin 10 md5
"""
