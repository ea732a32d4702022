"""kvmha wire contract: protobuf/gRPC stubs generated from proto/kvmha/v1 (see generate.py)."""
