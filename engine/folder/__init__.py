"""Purifying folders: the output-folder contract (names, records, resume), local and Ray runs."""
