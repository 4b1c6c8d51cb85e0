"""The KNEXA-FL node: an organization's agent (`knexa-node start`).

`service.py` is the trio/libp2p shell; everything it does with the model goes through the
`backend.ModelBackend` boundary (`torch_backend.py` is the real one: transformers + peft LoRA,
`training.py`, `generation.py`, `evaluation.py`, `guardrail.py`, `profile.py`, `reward.py`).
"""
