"""kvmha."""
