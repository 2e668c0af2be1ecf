"""Measuring the engine: throughput benchmarks and verify against the reference."""
