"""DFloat11: the CPU codec (byte-compatible with the official `dfloat11` format) and DF11 loading."""
