"""Hub models download on first use, resume after an interruption, and stay offline when told.

The hub is :class:`tests.support.fake_hub.FakeHub`: a real HTTP server on loopback speaking the
hub's protocol (repo info, tree, HEAD metadata, ranged GETs), reached through ``HF_ENDPOINT`` by
the real ``huggingface_hub`` client. The repository is a real tiny GPT-2 checkpoint, plus weight
copies a node must not download (flax, a .bin next to the safetensors).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from knexa_node.models import (
    LoraSettings,
    ModelLoadError,
    fetch_model,
    load_model,
    prepare_model,
    resolve_model,
)
from tests.support.fake_hub import FakeHub

REPO = "acme/tiny-gpt2"
WEIGHTS = "model.safetensors"
#: huggingface_hub writes a download in chunks of DOWNLOAD_CHUNK_SIZE (10 MiB) and resumes from the
#: last whole chunk on disk; real weights are GBs, the test repo's are ~1 MB, so chunks shrink here
CHUNK = 64 * 1024


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def repo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2 checkpoint as a hub repo, with files a node should skip."""
    cache = tmp_path_factory.mktemp("knexa-cache")
    built = prepare_model("tiny-gpt2", cache_dir=cache).path
    repo = tmp_path_factory.mktemp("repo")
    for f in built.iterdir():
        if f.is_file() and not f.name.startswith("."):
            shutil.copy(f, repo / f.name)
    (repo / "flax_model.msgpack").write_bytes(b"flax" * 1000)
    (repo / "pytorch_model.bin").write_bytes(b"bin!" * 1000)
    (repo / "README.md").write_text("# tiny\n")
    assert (repo / WEIGHTS).stat().st_size > 64 * 1024
    return repo


@pytest.fixture
def hub(repo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    server = FakeHub({REPO: repo_dir})
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.DOWNLOAD_CHUNK_SIZE", CHUNK)
    try:
        yield server
    finally:
        server.close()


def test_first_use_downloads_resumes_a_dropped_transfer_then_uses_the_cache_offline(
        hub: FakeHub, repo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    size = (repo_dir / WEIGHTS).stat().st_size
    hub.interrupt(WEIGHTS, size // 2)  # the connection drops halfway through the weights
    spec = resolve_model(REPO, cache_dir=tmp_path / "knexa")
    assert spec.kind == "hub" and spec.source == REPO
    assert _sha(spec.path / WEIGHTS) == _sha(repo_dir / WEIGHTS)
    assert (spec.path / "config.json").is_file() and (spec.path / "tokenizer_config.json").is_file()
    assert not (spec.path / "flax_model.msgpack").exists() and not (spec.path / "pytorch_model.bin").exists()
    first, resumed = hub.gets(WEIGHTS)
    # resumed with a Range request from the last whole chunk the dropped transfer wrote
    assert first.range is None and first.bytes_sent == size // 2
    assert resumed.range == f"bytes={(size // 2) // CHUNK * CHUNK}-"
    assert resumed.bytes_sent == size - (size // 2) // CHUNK * CHUNK
    loaded = load_model(spec, lora=LoraSettings(), device="cpu", threads=1)
    assert loaded.model_type == "gpt2"

    # later uses read the cache: no request at all, online or offline
    hub.requests.clear()
    assert resolve_model(REPO, cache_dir=tmp_path / "knexa").path == spec.path
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model(REPO, cache_dir=tmp_path / "knexa").path == spec.path
    assert hub.requests == []


def test_revision_is_pinnable_and_a_wrong_one_is_one_line(hub: FakeHub, tmp_path: Path) -> None:
    spec = resolve_model(f"{REPO}@{hub.commit}", cache_dir=tmp_path)
    assert spec.name == f"{REPO}@{hub.commit}" and spec.path.name == hub.commit
    assert all(hub.commit in r.path for r in hub.requests if "/resolve/" in r.path)
    with pytest.raises(ModelLoadError) as info:
        resolve_model(f"{REPO}@no-such-branch", cache_dir=tmp_path)
    msg = str(info.value)
    assert "\n" not in msg and "no-such-branch" in msg and "cannot download" in msg
    with pytest.raises(ModelLoadError) as info:
        resolve_model("acme/missing", cache_dir=tmp_path)
    assert "\n" not in str(info.value) and "acme/missing" in str(info.value)


def test_offline_miss_names_fetch_model(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as info:
        resolve_model(REPO, cache_dir=tmp_path)
    msg = str(info.value)
    assert "\n" not in msg and "offline" in msg and f"knexa-node fetch-model {REPO} --to DIR" in msg
    with pytest.raises(ModelLoadError, match="needs the network"):
        fetch_model(REPO, tmp_path / "out")
    assert hub.requests == []


def _fetch_cmd(dest: Path) -> list[str]:
    """`knexa-node fetch-model` in a child process, with the hub client's chunk shrunk (see CHUNK)."""
    code = ("import sys, huggingface_hub.constants as c; c.DOWNLOAD_CHUNK_SIZE = int(sys.argv[1]); "
            "from knexa_node.cli import main; sys.exit(main(sys.argv[2:]))")
    return [sys.executable, "-c", code, str(CHUNK), "fetch-model", REPO, "--to", str(dest)]


@pytest.mark.slow
def test_fetch_model_resumes_a_dropped_transfer_and_a_rerun_fetches_nothing(
        hub: FakeHub, repo_dir: Path, tmp_path: Path) -> None:
    """An air-gapped site's download through the CLI, in a child process.

    huggingface_hub resumes a dropped transfer within the run (a Range request from the last
    whole chunk written). It does not resume across processes: since its process-unique temp
    files (huggingface_hub PR 4228) a killed run restarts unfinished files from zero.
    """
    size = (repo_dir / WEIGHTS).stat().st_size
    half = size // 2
    hub.interrupt(WEIGHTS, half)
    dest = tmp_path / "tiny-gpt2"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    first = subprocess.run(_fetch_cmd(dest), env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    assert f"--model {dest}" in first.stdout and "Fetching" in first.stderr  # the progress bar
    assert _sha(dest / WEIGHTS) == _sha(repo_dir / WEIGHTS)
    assert [g.range for g in hub.gets(WEIGHTS)] == [None, f"bytes={half // CHUNK * CHUNK}-"]
    assert not (dest / "flax_model.msgpack").exists()

    hub.requests.clear()
    again = subprocess.run(_fetch_cmd(dest), env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert not any(r.method == "GET" and "/resolve/" in r.path for r in hub.requests)
    # the folder is a complete checkpoint: it loads offline by path
    spec = resolve_model(str(dest), cache_dir=tmp_path / "knexa", offline=True)
    assert spec.kind == "path"
    assert load_model(spec, lora=LoraSettings(), device="cpu", threads=1).model_type == "gpt2"


def test_fetch_model_cli_error_is_one_line(hub: FakeHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from knexa_node.cli import main

    capsys.readouterr()
    code = main(["fetch-model", "acme/missing", "--to", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert code == 21 and "\n" not in err and err.startswith("knexa-node: cannot download acme/missing@main")


def test_fetch_model_refuses_local_models(tmp_path: Path) -> None:
    for name in ("smollm2-135m", "tiny-llama"):
        with pytest.raises(ModelLoadError, match="built locally"):
            fetch_model(name, tmp_path)
    with pytest.raises(ModelLoadError, match="neither a hub id"):
        fetch_model("not a model", tmp_path)
