"""Helpers for tests and benchmarks: synthetic zoos, relative errors, and the storage
conformance suite that every storage location must pass.

Nothing here is imported by ``import tvbase``.
"""
