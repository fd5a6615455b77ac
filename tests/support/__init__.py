"""Shared test infrastructure: real registry and redis processes, an image builder, the real
Debian test image. Everything here is used by the tests of every stage."""
