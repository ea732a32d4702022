"""Simulated BMCs (OpenIPMI ipmi_sim) on free 127.0.0.1 ports, each powering a harmless ``sleep`` as its "host".

Every simulator a test starts is stopped at teardown by PID, host process included, even when the test fails.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kvmha.lab.bmc import BmcConfig, BmcSimulator, find_free_port

HOST_CMD = "sleep 100000"

BmcFactory = Callable[..., BmcSimulator]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    missing = [tool for tool in ("ipmi_sim", "ipmitool") if shutil.which(tool) is None]
    if not missing:
        return
    skip = pytest.mark.skip(reason=f"{' and '.join(missing)} not installed (Debian packages openipmi, ipmitool)")
    for item in items:
        if "bmc_factory" in getattr(item, "fixturenames", ()):
            item.add_marker(skip)


@pytest.fixture
def bmc_factory(tmp_path: Path) -> Iterator[BmcFactory]:
    """Makes and starts simulators: ``bmc_factory(startcmd=..., **BmcConfig fields)``."""
    made: list[BmcSimulator] = []

    def make(startcmd: str = HOST_CMD, start: bool = True, **fields: Any) -> BmcSimulator:
        name = f"bmc{len(made) + 1}"
        config = BmcConfig(name=name, port=find_free_port(), workdir=tmp_path / name, startcmd=startcmd, **fields)
        sim = BmcSimulator(config)
        made.append(sim)
        if start:
            sim.start()
        return sim

    yield make
    for sim in made:
        sim.stop()


def process_alive(pid: int, start_ticks: int) -> bool:
    """The process (this PID with this start time) exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat.rpartition(")")[2].split()
    return int(fields[19]) == start_ticks and fields[0] not in ("Z", "X")


def start_ticks(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19])
