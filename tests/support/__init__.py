"""Test support: a fake model backend and helpers for daemons in subprocesses."""
