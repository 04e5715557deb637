"""Default bounds on a request body as sent and as decompressed (a forward_backward at the
default limits of 262,144 tokens is under 8 MiB). engine.wire enforces them; the gateway's
Settings can change them. Dependency-free, so the settings load without the wire formats."""

MAX_BODY_BYTES = 32 * 1024 * 1024
MAX_DECOMPRESSED_BYTES = 32 * 1024 * 1024
