"""The CPM (Central Profiler/Matchmaker): learns who should teach whom; never sees a package.

Pure cores (numpy, no networking):
- `features`: pair contexts (`concat` [p_i, p_j] and `interaction`).
- `bandit`: vectorised LinUCB with Sherman-Morrison updates.
- `matching`: greedy disjoint selection of ordered (teacher, student) pairs.
- `policies`: linucb / random / heuristic / round_robin / oracle behind one interface.
- `rewards`: running (Welford) reward normalisation.
- `rounds`: the round state machine (quorum, timeout, issued directives, reward acceptance).
- `simulate`, `sim_world`, `sim_report`: the synthetic matchmaker study (`knexa-cpm simulate`):
  CLI and grid, the hidden generative world, and CSV/table/plots.
Plumbing: `state` (atomic snapshot/restore), `config`, `errors`, `service` (trio + libp2p),
`cli` (`knexa-cpm serve|simulate`).
"""
