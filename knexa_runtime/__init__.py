"""Plumbing shared by both daemons and the lab, free of networking and ML.

- `atomic`: crash-safe file writes (temp file, fsync, rename) for every piece of state on disk.
- `logs`: one-event-per-line logging setup for the daemons.
"""
