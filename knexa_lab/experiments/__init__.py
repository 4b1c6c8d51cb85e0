"""Built-in `knexa-lab experiment` presets: tiny.toml (CI), embedded.toml (SmolLM2 on CPU), paper.toml (GPU)."""
