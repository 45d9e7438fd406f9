"""A fake Hugging Face hub for the pretrained-model tests: tiny repos in real layouts, served over HTTP.

Nothing here touches the network: :class:`FakeHub` is an HTTP server on 127.0.0.1 that answers the
requests ``huggingface_hub`` (``hf_hub_download``, ``snapshot_download``, ``HfApi.model_info`` /
``list_repo_tree``) and ``transformers``' ``from_pretrained`` make, as huggingface_hub 2.x makes them:

* ``HEAD|GET /{repo}/resolve/{revision}/{filename}``: 200 with ``X-Repo-Commit``, ``ETag``
  and ``Content-Length`` (weights files also carry ``X-Linked-Etag`` / ``X-Linked-Size``, as LFS
  files do on the hub); 404 with ``X-Error-Code: EntryNotFound`` (and the commit) for a missing
  file, ``RepoNotFound`` for an unknown repo, ``RevisionNotFound`` for an unknown revision;
  ``Range: bytes=N-`` gives 206 (a resumed download);
* ``GET /api/models/{repo}[/revision/{revision}]``: the model info (``sha``, ``siblings``);
* ``GET /api/models/{repo}/tree/{revision}[/{path}]``: the file listing.

The repos (see :func:`standard_repos`):

* :data:`BIOMEDCLIP_REPO`: BiomedCLIP's layout (``open_clip_config.json`` with ``model_cfg`` and
  ``preprocess_cfg``, ``open_clip_pytorch_model.bin``), a random timm ViT image tower
  (timm's ``test_vit``: 64 wide, 160 px) and a Hugging Face BERT text tower named by
  ``text_cfg.hf_model_name`` / ``hf_tokenizer_name`` = :data:`TEXT_REPO`, another repo of the
  same hub (as BiomedCLIP names ``microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract``);
* :data:`TEXT_REPO`: a tiny random BERT (``config.json``, ``model.safetensors``) with its
  WordPiece tokenizer files (``tokenizer.json``, ``tokenizer_config.json``, ``vocab.txt``);
* :data:`TAG_REPO`: ``open_clip_pytorch_model.bin`` of a :data:`TAG_ARCH` model, the weights of the
  pretrained tag :data:`TAG` that :func:`register_tag` adds to open_clip's registry (test only);
* :data:`TIMM_REPO`: ``model.safetensors`` of timm's ``test_vit``, where timm downloads it from for an
  image tower with ``timm_model_pretrained`` (the text repo's ``model.safetensors`` serves
  ``hf_model_pretrained``).

Use::

    with FakeHub(standard_repos()) as hub:              # or the ``fake_hub`` fixture below
        hub_env(monkeypatch, hub.url, tmp_path / "hf")  # this process (patches huggingface_hub.constants)
        env = subprocess_env(hub.url, tmp_path / "hf")  # commands started with subprocess
        run_command("clip_med.classify", [...], env, tag=True)

Stable API (other test files import it): FakeHub, standard_repos, biomedclip_repo, biomedclip_config,
text_repo, tag_repo, timm_repo, register_tag, tag_config, hub_env, subprocess_env, run_command,
fake_hub (fixture), BIOMEDCLIP_REPO, TEXT_REPO, TAG_REPO, TIMM_REPO, TAG_ARCH, TAG, HUB_MODEL.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
import torch

BIOMEDCLIP_REPO = "clipmed-test/tiny-biomedclip"
TEXT_REPO = "clipmed-test/tiny-pubmedbert"
TAG_REPO = "clipmed-test/medclip-tiny-clipmed-test"
TIMM_REPO = "timm/test_vit.r160_in1k"  # where timm looks for test_vit's pretrained weights (its hf_hub_id)
TAG_ARCH = "medclip-tiny"  # clip_med's own tiny architecture (64 px, 2-layer text transformer)
TAG = "clipmed_test"
HUB_MODEL = f"hf-hub:{BIOMEDCLIP_REPO}"
REPO_ROOT = Path(__file__).resolve().parents[1]

# BiomedCLIP's open_clip_config.json, shrunk: the same keys, a timm ViT and a BERT of the same fake hub.
EMBED_DIM = 32
CONTEXT_LENGTH = 32
IMAGE_SIZE = 160  # timm's test_vit has a fixed 160 px position embedding (open_clip does not resize timm ViTs)
BIOMEDCLIP_PREPROCESS = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}
# The tag's weights were "trained" with other statistics than open_clip's defaults, so that using them shows.
TAG_PREPROCESS = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bilinear",
                  "resize_mode": "squash"}

_WORDS = ("a an the of in on with and or no image photo scan view ct mri x ray xray radiograph ultrasound "
          "pet angiogram axial sagittal coronal brain head neck chest lung abdomen pelvis spine liver heart "
          "kidney bone knee hand foot breast normal showing shows medical contrast t1 t2 weighted").split()
_VOCAB = list(dict.fromkeys(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz0123456789",
                             *".,;:-()/'", *(f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz0123456789"), *_WORDS]))
LFS_SUFFIXES = (".bin", ".safetensors", ".pt", ".pth")


# ---------------------------------------------------------------------------------------------
# Repos


def _bert_config() -> Any:
    from transformers import BertConfig

    return BertConfig(vocab_size=len(_VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64, pad_token_id=0)


@cache
def _text_repo_files(seed: int) -> tuple[tuple[str, bytes], ...]:
    from safetensors.torch import save as save_safetensors
    from transformers import BertModel, BertTokenizerFast

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = BertTokenizerFast(vocab={word: i for i, word in enumerate(_VOCAB)}, do_lower_case=True)
        tokenizer.save_pretrained(folder)
        _bert_config().save_pretrained(folder)
        files = {path.name: path.read_bytes() for path in Path(folder).iterdir() if path.is_file()}
    model = BertModel(_bert_config(), add_pooling_layer=False)
    files["model.safetensors"] = save_safetensors({k: v.contiguous() for k, v in model.state_dict().items()},
                                                  metadata={"format": "pt"})
    files["vocab.txt"] = ("\n".join(_VOCAB) + "\n").encode()
    return tuple(sorted(files.items()))


def text_repo(seed: int = 0) -> dict[str, bytes]:
    """A tiny random BERT (config.json, model.safetensors) and its WordPiece tokenizer's files."""
    return dict(_text_repo_files(seed))


def biomedclip_config(text_repo_id: str = TEXT_REPO, preprocess_cfg: dict | None = None) -> dict[str, Any]:
    """``open_clip_config.json`` in BiomedCLIP's layout (hf_model_name / hf_tokenizer_name: ``text_repo_id``)."""
    return {
        "model_cfg": {
            "embed_dim": EMBED_DIM,
            "vision_cfg": {"timm_model_name": "test_vit", "timm_model_pretrained": False, "timm_pool": "",
                           "timm_proj": "linear", "image_size": IMAGE_SIZE},
            "text_cfg": {"hf_model_name": text_repo_id, "hf_tokenizer_name": text_repo_id, "hf_proj_type": "mlp",
                         "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": CONTEXT_LENGTH},
        },
        "preprocess_cfg": dict(BIOMEDCLIP_PREPROCESS if preprocess_cfg is None else preprocess_cfg),
    }


def _torch_bytes(state_dict: dict[str, torch.Tensor]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    return buffer.getvalue()


def _safetensors_bytes(state_dict: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save as save_safetensors

    return save_safetensors({key: value.contiguous() for key, value in state_dict.items()})


def _weights_files(state_dict: dict[str, torch.Tensor], formats: tuple[str, ...]) -> dict[str, bytes]:
    files = {}
    if "bin" in formats:
        files["open_clip_pytorch_model.bin"] = _torch_bytes(state_dict)
    if "safetensors" in formats:
        files["open_clip_model.safetensors"] = _safetensors_bytes(state_dict)
    return files


@cache
def _biomedclip_state(seed: int) -> dict[str, torch.Tensor]:
    import open_clip

    with tempfile.TemporaryDirectory() as folder:
        for name, data in text_repo(seed).items():
            (Path(folder) / name).write_bytes(data)
        model_cfg = biomedclip_config(text_repo_id=folder)["model_cfg"]
        model_cfg["text_cfg"]["hf_model_pretrained"] = False
        torch.manual_seed(seed)
        model = open_clip.CustomTextCLIP(**model_cfg)
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def biomedclip_repo(text_repo_id: str = TEXT_REPO, preprocess_cfg: dict | None = None, seed: int = 0,
                    weights: tuple[str, ...] = ("bin",), extra_files: dict[str, bytes] | None = None
                    ) -> dict[str, bytes]:
    """A repo in BiomedCLIP's layout. ``weights``: ``("bin",)`` as BiomedCLIP, ``("safetensors",)`` or both."""
    files = {"open_clip_config.json": json.dumps(biomedclip_config(text_repo_id, preprocess_cfg), indent=2).encode(),
             "README.md": b"# tiny BiomedCLIP-layout model for clip_med's tests\n"}
    files.update(_weights_files(_biomedclip_state(seed), weights))
    files.update(extra_files or {})
    return files


@cache
def _tag_state(seed: int) -> dict[str, torch.Tensor]:
    import open_clip

    import clip_med.modeling.factory  # noqa: F401  (registers medclip-tiny with open_clip)

    torch.manual_seed(seed)
    model = open_clip.create_model(TAG_ARCH)
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def tag_repo(seed: int = 1) -> dict[str, bytes]:
    """The weights of pretrained tag :data:`TAG` of :data:`TAG_ARCH` (open_clip_pytorch_model.bin only)."""
    return {"open_clip_pytorch_model.bin": _torch_bytes(_tag_state(seed)), "README.md": b"# tiny tag weights\n"}


@cache
def _timm_state(seed: int) -> dict[str, torch.Tensor]:
    import timm

    torch.manual_seed(seed)
    model = timm.create_model("test_vit", pretrained=False)
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def timm_repo(seed: int = 2) -> dict[str, bytes]:
    """timm's ``test_vit`` "ImageNet" weights (``model.safetensors``), for image towers with timm_model_pretrained."""
    return {"model.safetensors": _safetensors_bytes(_timm_state(seed)), "README.md": b"# tiny timm weights\n"}


def standard_repos() -> dict[str, dict[str, bytes]]:
    return {BIOMEDCLIP_REPO: biomedclip_repo(), TEXT_REPO: text_repo(), TAG_REPO: tag_repo(), TIMM_REPO: timm_repo()}


def tag_config(repo_id: str = TAG_REPO) -> dict[str, Any]:
    """The entry open_clip's pretrained registry gets for :data:`TAG` (as open_clip's own ``_pcfg`` writes them)."""
    return {"url": "", "hf_hub": f"{repo_id}/", "quick_gelu": False, **TAG_PREPROCESS}


def register_tag(monkeypatch=None, repo_id: str = TAG_REPO) -> None:
    """Add :data:`TAG` for :data:`TAG_ARCH` to open_clip's pretrained registry (undone by ``monkeypatch``)."""
    from open_clip import pretrained

    tags = {**pretrained._PRETRAINED.get(TAG_ARCH, {}), TAG: tag_config(repo_id)}
    if monkeypatch is None:
        pretrained._PRETRAINED[TAG_ARCH] = tags
    else:
        monkeypatch.setitem(pretrained._PRETRAINED, TAG_ARCH, tags)


# ---------------------------------------------------------------------------------------------
# The server


@dataclasses.dataclass
class _Repo:
    files: dict[str, bytes]
    commit: str
    etags: dict[str, str]


def _commit_of(files: dict[str, bytes]) -> str:
    digest = hashlib.sha1()
    for name, data in sorted(files.items()):
        digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    return digest.hexdigest()


class FakeHub:
    """The hub's file protocol on ``http://127.0.0.1:<free port>`` (a thread; :meth:`stop` to go offline)."""

    def __init__(self, repos: dict[str, dict[str, bytes]] | None = None):
        self.repos: dict[str, _Repo] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, for assertions
        self.unhandled: list[tuple[str, str]] = []  # requests this server does not know (answered 404)
        for repo_id, files in (repos or {}).items():
            self.add_repo(repo_id, files)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    def add_repo(self, repo_id: str, files: dict[str, bytes]) -> str:
        """Add (or replace: a new commit) a repo; returns its commit hash."""
        commit = _commit_of(files)
        self.repos[repo_id] = _Repo(dict(files), commit, {name: hashlib.sha256(data).hexdigest()
                                                           for name, data in files.items()})
        return commit

    def start(self) -> FakeHub:
        hub = self

        class Handler(_HubHandler):
            owner = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        return self

    def stop(self) -> None:
        """Stop serving: afterwards every request fails to connect (the machine is offline)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            assert self._thread is not None
            self._thread.join(timeout=10)
            self._server = self._thread = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def downloads(self, repo_id: str | None = None) -> list[str]:
        """Paths of the file GETs served (optionally of one repo): what was really downloaded."""
        prefix = f"/{repo_id}/resolve/" if repo_id else ""
        return [path for method, path in self.requests
                if method == "GET" and "/resolve/" in path and path.startswith(prefix)]


class _HubHandler(BaseHTTPRequestHandler):
    owner: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002  (quiet: the tests read .requests)
        pass

    def do_HEAD(self) -> None:  # noqa: N802
        self._route(body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._route(body=True)

    # -- routing ---------------------------------------------------------------------------------

    def _route(self, body: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        self.owner.requests.append((self.command, path))
        parts = path.strip("/").split("/")
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]), body)
        if len(parts) >= 4 and parts[:2] == ["api", "models"]:
            repo_id, rest = "/".join(parts[2:4]), parts[4:]
            if not rest:
                return self._model_info(repo_id, "main")
            if rest[0] == "revision" and len(rest) == 2:
                return self._model_info(repo_id, rest[1])
            if rest[0] == "tree" and len(rest) >= 2:
                return self._tree(repo_id, rest[1], "/".join(rest[2:]))
        self.owner.unhandled.append((self.command, path))
        self._error(404, None, body=body)

    def _repo(self, repo_id: str, revision: str, body: bool) -> _Repo | None:
        repo = self.owner.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", body=body)
            return None
        if revision not in ("main", repo.commit):
            self._error(404, "RevisionNotFound", body=body, commit=None)
            return None
        return repo

    def _resolve(self, repo_id: str, revision: str, filename: str, body: bool) -> None:
        repo = self._repo(repo_id, revision, body)
        if repo is None:
            return
        data = repo.files.get(filename)
        if data is None:
            return self._error(404, "EntryNotFound", body=body, commit=repo.commit)
        etag = repo.etags[filename]
        headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{etag}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if filename.endswith(LFS_SUFFIXES):
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))})
        start = _range_start(self.headers.get("Range"))
        status = 200
        if start:
            status, data = 206, data[start:]
            headers["Content-Range"] = f"bytes {start}-{start + len(data) - 1}/{start + len(data)}"
        self._send(status, data, headers, body)

    def _model_info(self, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_id, revision, True)
        if repo is None:
            return
        info = {"_id": repo.commit[:24], "id": repo_id, "modelId": repo_id, "author": repo_id.split("/")[0],
                "sha": repo.commit, "private": False, "disabled": False, "gated": False, "downloads": 0, "likes": 0,
                "tags": [], "library_name": "open_clip",
                "siblings": [{"rfilename": name} for name in sorted(repo.files)]}
        self._send_json(info)

    def _tree(self, repo_id: str, revision: str, folder: str) -> None:
        repo = self._repo(repo_id, revision, True)
        if repo is None:
            return
        prefix = f"{folder.rstrip('/')}/" if folder else ""
        names = [name for name in sorted(repo.files) if name.startswith(prefix)]
        if folder and not names:
            return self._error(404, "EntryNotFound", body=True, commit=repo.commit)
        entries = []
        for name in names:
            data = repo.files[name]
            entry: dict[str, Any] = {"type": "file", "oid": hashlib.sha1(data).hexdigest(), "size": len(data),
                                     "path": name}
            if name.endswith(LFS_SUFFIXES):
                entry["lfs"] = {"oid": repo.etags[name], "size": len(data), "pointerSize": 134}
            entries.append(entry)
        self._send_json(entries)

    # -- responses -------------------------------------------------------------------------------

    def _send(self, status: int, data: bytes, headers: dict[str, str], body: bool) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _send_json(self, value: Any) -> None:
        self._send(200, json.dumps(value).encode(), {"Content-Type": "application/json"}, self.command != "HEAD")

    def _error(self, status: int, code: str | None, body: bool, commit: str | None = None) -> None:
        message = f"{code or 'Not Found'}: {self.path}"
        headers = {"Content-Type": "application/json"}
        if code:
            headers.update({"X-Error-Code": code, "X-Error-Message": message})
        if commit:
            headers["X-Repo-Commit"] = commit
        self._send(status, json.dumps({"error": message}).encode(), headers, body)


def _range_start(header: str | None) -> int:
    if not header or not header.startswith("bytes="):
        return 0
    first = header[len("bytes="):].split("-", 1)[0]
    return int(first) if first.isdigit() else 0


# ---------------------------------------------------------------------------------------------
# Pointing huggingface_hub at it


def _hub_variables(endpoint: str | None, cache: Path, offline: bool) -> dict[str, str]:
    cache = Path(cache)
    variables = {"HF_HOME": str(cache), "HF_HUB_CACHE": str(cache / "hub"), "HF_HUB_OFFLINE": "1" if offline else "0",
                 "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                 "HF_HUB_DISABLE_XET": "1", "TRANSFORMERS_OFFLINE": "1" if offline else "0",
                 "TOKENIZERS_PARALLELISM": "false", "HF_HUB_ETAG_TIMEOUT": "5", "HF_HUB_DOWNLOAD_TIMEOUT": "10"}
    # Without a server the endpoint is an address nothing listens on (connections are refused at once).
    variables["HF_ENDPOINT"] = endpoint or "http://127.0.0.1:9"
    return variables


def hub_env(monkeypatch, endpoint: str | None, cache: Path, offline: bool = False) -> dict[str, str]:
    """Point this process's huggingface_hub at ``endpoint`` with the cache under ``cache`` (HF_HOME).

    huggingface_hub reads these variables when it is imported, so its ``constants`` are patched too
    (and transformers' shared ``HfApi``, which keeps the endpoint it was made with, is dropped).
    """
    from huggingface_hub import constants

    variables = _hub_variables(endpoint, cache, offline)
    for key, value in variables.items():
        monkeypatch.setenv(key, value)
    endpoint_url = variables["HF_ENDPOINT"]
    for name, value in {"ENDPOINT": endpoint_url,
                        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint_url + "/{repo_id}/resolve/{revision}/{filename}",
                        "HF_HOME": variables["HF_HOME"], "HF_HUB_CACHE": variables["HF_HUB_CACHE"],
                        "HF_HUB_OFFLINE": offline, "HF_HUB_DISABLE_TELEMETRY": True,
                        "HF_HUB_DISABLE_XET": True}.items():
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, value)
    # transformers keeps one HfApi, made with the endpoint of its first use: a later test's would go to a
    # server that is gone (and wait out huggingface_hub's retries).
    from transformers.utils import hub as transformers_hub

    if hasattr(transformers_hub, "_hf_api"):
        monkeypatch.setattr(transformers_hub, "_hf_api", None)
    return variables


def subprocess_env(endpoint: str | None, cache: Path, offline: bool = False) -> dict[str, str]:
    """``os.environ`` plus the hub variables, for commands started with :func:`run_command`."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(_hub_variables(endpoint, cache, offline))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


_BOOTSTRAP = """
import runpy, sys
sys.path.insert(0, {tests!r})
if {tag!r}:
    import hub_fixtures
    hub_fixtures.register_tag()
sys.argv = [{module!r}] + sys.argv[1:]
runpy.run_module({module!r}, run_name="__main__", alter_sys=True)
"""


def run_command(module: str, args: list[str], env: dict[str, str], tag: bool = False, timeout: float = 600,
                cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m <module> <args>`` in a fresh process with ``env``; ``tag=True`` registers :data:`TAG` first
    (the only difference from the real command: a test-only entry in open_clip's pretrained registry)."""
    code = _BOOTSTRAP.format(tests=str(Path(__file__).parent), tag=tag, module=module)
    command = [sys.executable, "-c", code, *args] if tag else [sys.executable, "-m", module, *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=str(cwd or REPO_ROOT))


@pytest.fixture(scope="module")
def fake_hub():
    """The standard repos served for a test module (``hub.stop()`` inside a test ends serving for the rest)."""
    with FakeHub(standard_repos()) as hub:
        yield hub
