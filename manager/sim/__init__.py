"""Deterministic simulator of a kvmha cluster driving the real decision core.

- `world`: simulated hosts (power, agent, networks, storage heartbeat, hypervisor, BMC) and where VMs really run;
- `agents`: simulated agents and BMCs answering the core's commands through the simulated network;
- `simulator`: the event heap, the one seeded RNG, the manager side (facts in, actions out, saved records, restarts);
- `invariants`: the checker of fencing safety (never two copies; never a start before the old host is resolved);
- `script`: scenario files (setup + timed faults) for the golden-log tests;
- `storm`: seeded random fault storms over big clusters (tests/sim, bench/sim_bench.py).
"""
