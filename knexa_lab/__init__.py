"""The lab: run federations on this machine and turn their logs into tables and plots.

- `presets/`: TOML presets (`tiny` for tests, `embedded` for the demo).
- `launcher`: `knexa-lab run` — spawn one `knexa-cpm serve` and N `knexa-node start` processes
  on loopback, follow their rounds, collect results, and always reap every child.
- `results`: merge per-node round logs into CSV/JSON and the per-round table.
- `cli`: `knexa-lab run|report`.
"""
