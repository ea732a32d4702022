"""Integration tests: real external programs (ipmi_sim, ipmitool) on 127.0.0.1."""
