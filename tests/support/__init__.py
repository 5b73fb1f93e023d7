"""Not tests: scripts that multi-process tests launch with ``accelerate launch`` and the local Hub server."""
