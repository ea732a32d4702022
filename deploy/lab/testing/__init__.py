"""Test doubles and process harnesses shared by tests/ and bench/ (never used by the lab or the product itself).

They live in the installed kvmha.lab package rather than under tests/ so that the benchmarks, which run as
`.venv/bin/python bench/<name>.py` from a fresh clone, import them like any other module, without putting the
repository on sys.path and without importing the test suite.

- `local`: `LocalCluster` (the real manager with agents as processes on 127.0.0.1, test-driver libvirt, simulated
  BMCs) and `AgentProcess` (one real agent with a generated config);
- `fake_manager`: `FakeManager`, a real gRPC AgentLink server that records what agents send and sends commands;
- `libvirtd`: `PrivateLibvirtd`, a libvirtd + virtlogd of our own in a private mount namespace (real QEMU);
- `databases`: `fresh_database(kind, tmp)`, a throw-away SQLite / PostgreSQL / MariaDB database.

The lab harness (`kvmha.lab.harness.LabCluster`), the wait helper (`kvmha.lab.wait.wait_for`) and the domain XML
builder (`kvmha.lab.domain.domain_xml`) are in kvmha.lab itself: the demo uses them too.
"""
