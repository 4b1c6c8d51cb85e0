"""`knexa-lab experiment`: the paper's method comparison (Table 4) on one split, seeds and budget.

``methods/`` holds one module per method behind the contract in ``methods/base.py``; the engine
runs them in-process over the same learning code the daemons use (TorchBackend), or drives the
real daemons for the P2P methods; ``report`` rebuilds tables and plots from saved metrics.
"""
