"""Generated stubs of kvmha.v1; do not edit, run `make proto`."""
