"""Test support: a fake model backend, helpers for daemons in subprocesses, peer identities."""
