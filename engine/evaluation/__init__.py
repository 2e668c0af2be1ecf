"""Robustness evaluation: the attack registry, evaluation runs and their reports."""
