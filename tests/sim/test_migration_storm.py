"""Migrations in a storm (issue 17): live migrations and maintenance while hosts fail around them, among the
storm's other faults, with either side of a migration losing power mid-way. Asserted: never two running copies and
no start elsewhere before the old host was proven dead (the invariant checker), every HA VM that lost its run is
running again within its bound (the liveness checker), and every sequence really ran."""

from __future__ import annotations

import pytest

from kvmha.manager.sim.migration_faults import MIGRATION_SEQUENCES
from kvmha.manager.sim.storm import Storm, storm_simulator

HOSTS = 200
VMS_PER_HOST = 6
FAULTS_UNTIL_S = 600.0
QUIET_S = 300.0


@pytest.mark.parametrize("seed", [1, 2])
def test_migrations_under_faults_keep_safety_and_liveness(seed: int) -> None:
    sim, rng = storm_simulator(HOSTS, VMS_PER_HOST, seed, keep_log=True)
    storm = Storm(sim, rng, rate_per_s=0.05, until_s=FAULTS_UNTIL_S, migrations=8, max_concurrent_share=0.1)
    storm.start()
    try:
        sim.run_until(FAULTS_UNTIL_S + QUIET_S)
    finally:
        sim.close()

    assert sim.checker.violations == []
    for kind in MIGRATION_SEQUENCES:
        assert storm.injected.get(kind, 0) >= 2, (kind, storm.injected)
    migrated = [line for line in sim.log if " migrated from " in line]
    lost = [line for line in sim.log if "lost during its migration" in line]
    assert migrated and lost, "no migration completed, or none was caught by its source's death"
    assert not sim.liveness.owed, sim.liveness.owed
