"""Deterministic simulator of a kvmha cluster: the production driver and decision core in a simulated environment.

- `loop`: an asyncio loop on virtual time, with the world's FIFO agenda;
- `memstore`: the store port in memory, with real rollbacks and outages/stalls on demand;
- `env`: the driver's simulated environment (clock, persistence, transport into the world, journal into the log);
- `world`: simulated hosts (power, agent, networks, storage heartbeat, hypervisor, BMC) and where VMs really run;
- `agents`: simulated agents and BMCs, connecting through the hub and answering the driver's commands;
- `simulator`: the composition — world, loop, store, driver, hub — the seeded RNG, manager restarts, the log;
- `invariants`: the checker of fencing safety (never two copies; never a start before the old host is resolved);
- `script`: scenario files (setup + timed faults) for the golden-log tests;
- `storm`: seeded random fault storms over big clusters (tests/sim, bench/sim_bench.py).
"""
