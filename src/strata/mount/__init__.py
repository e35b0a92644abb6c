"""Mounting a snapshot read-only (FUSE): the kernel's side over engine.snapshot_tree."""
