"""Runs a real `kvmha-agent` process with a generated config; stopped by PID, log kept for assertions."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path

AGENT_BIN = str(Path(sys.executable).with_name("kvmha-agent"))


class AgentProcess:
    def __init__(self, workdir: Path, managers: Sequence[str], libvirt_uri: str = "test:///default",
                 storage_paths: Sequence[str] = (), host_uuid: str | None = None, isolation: str = "none",
                 isolation_after_s: float = 30.0, heartbeat_interval_s: float = 0.5) -> None:
        self.host_uuid = host_uuid or str(uuid.uuid4())
        for path in storage_paths:
            if not os.path.exists(path):
                os.makedirs(path)  # the "mounted share"; the agent itself never creates it
        self.workdir = workdir
        self.config_path = workdir / f"agent-{self.host_uuid[:8]}.toml"
        self.log_path = workdir / f"agent-{self.host_uuid[:8]}.log"
        managers_toml = ", ".join(f'"{m}"' for m in managers)
        storage_toml = ", ".join(f'"{p}"' for p in storage_paths)
        self.config_path.write_text(f"""
[agent]
host_uuid = "{self.host_uuid}"
hostname = "test-{self.host_uuid[:8]}"
management_address = "127.0.0.1"
managers = [{managers_toml}]
libvirt_uri = "{libvirt_uri}"
storage_paths = [{storage_toml}]
heartbeat_interval_s = {heartbeat_interval_s}
resync_interval_s = 30.0
reconnect_max_s = 2.0
[isolation]
policy = "{isolation}"
after_s = {isolation_after_s}
""")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> AgentProcess:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([AGENT_BIN, "--config", str(self.config_path)], stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 10.0) -> int:
        """SIGTERM by PID, then SIGKILL if it does not exit; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(timeout=timeout_s)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
