"""Federated-learning methods compared by `knexa-lab experiment` (contract: ``base.py``)."""
