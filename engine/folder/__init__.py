"""Purifying folders: output-folder contract, run order, batch rule, local and Ray runs."""
