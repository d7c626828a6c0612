"""Measure an artifact, here or on a target over SSH / ADB: the runner, its result schema,
system facts, fleets, energy, the results store (no torch)."""
