"""Deterministic simulator of a kvmha cluster driving the real decision core."""
