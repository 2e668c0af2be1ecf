"""Leaf utilities: user errors, progress, atomic files, host description, fp32 numerics."""
