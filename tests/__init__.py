"""kvmha test suite."""
