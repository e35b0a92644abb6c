"""Benchmark: Strata's local store against restic and borg on the same data (`make bench`)."""
