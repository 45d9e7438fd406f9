"""Hostile requests to the service, the library and the classify command (issue 9): templates with
format specs and field lookups, enormous labels, thousands of labels, huge prompt lists.

Each is refused with a 4xx (or a ValueError, or one ``error:`` line and exit status 2) before any
work: the model's lock is never taken and nothing is tokenized (counted by spies, not timed), and
the request's peak memory stays small. A valid request is answered within a generous bound while
hostile ones keep arriving at a real server: a liveness check, not a benchmark.
"""

import os
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from api_helpers import gradient, png_bytes, save_checkpoint
from fastapi.testclient import TestClient

import clip_med
from clip_med.core.templates import TemplateError
from clip_med.eval import zero_shot
from clip_med.eval.zero_shot import PromptLimit, label_prompts, zero_shot_weights
from clip_med.inference.service import ServiceLimits, create_app

ROOT = Path(__file__).resolve().parents[1]
LIMITS = ServiceLimits()  # the defaults: what a deployed service has
PEAK_BYTES = 40 * 1024 * 1024  # a hostile request's traced peak: far below what the attacks used to take
HOSTILE_TEMPLATES = {
    "padding width": "{} {:>99999999}",
    "padding width, no label field": "{:>99999999}",
    "named padding": "{} {modality:>99999999}",
    "nested fields": "{} {0:>{1}}",
    "conversion": "{} {!r}",
    "attribute": "{} {.__class__}",
    "deep attribute": "{} {modality.__class__.__mro__}",
    "index": "{} {[0]}",
    "unbalanced open": "a {} {",
    "unbalanced close": "a {} }",
    "numbered": "{0} {0}",
    "unknown field": "{} {colour}",
}


class CountingLock:
    """A lock that counts how often it is taken (the model's lock, under watch)."""

    def __init__(self):
        self._lock, self.taken = threading.Lock(), 0

    def __enter__(self):
        self._lock.acquire()
        self.taken += 1
        return self

    def __exit__(self, *exc):
        self._lock.release()

    def locked(self):
        return self._lock.locked()


class CountingTokenizer:
    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, 0

    def __call__(self, texts, *args, **kwargs):
        self.calls += 1
        return self.tokenizer(texts, *args, **kwargs)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    loaded = clip_med.load(save_checkpoint(tmp_path_factory.mktemp("attack") / "run"))
    loaded._lock = CountingLock()
    loaded.tokenizer = CountingTokenizer(loaded.tokenizer)
    return loaded


@pytest.fixture(scope="module")
def client(model):
    return TestClient(create_app(model, None, None, LIMITS))


PNG = png_bytes(gradient())


def _classify(client, **data):
    return client.post("/classify", files={"file": ("a.png", PNG, "image/png")}, data=data)


def _hostile_requests():
    long_label = "a" * 16_000
    return {
        **{f"template: {name}": dict(labels="ct,mr", prompts=template) for name, template in HOSTILE_TEMPLATES.items()},
        "two 16,000-letter labels": dict(labels=f"{long_label},{long_label}b"),
        "a 16,000-letter label among short ones": dict(labels=f"ct,mr,{long_label}"),
        "5,000 labels": dict(labels=",".join(f"label{i}" for i in range(5000))),
        "900 labels as fields": dict(labels=[f"label{i}" for i in range(900)]),
        "500 prompt templates": dict(labels="ct,mr", prompts=[f"a {{}} scan number {i}." for i in range(500)]),
        "a 16,000-letter template": dict(labels="ct,mr", prompts="{} " + "x" * 16_000),
        "templates that expand past the limit": dict(labels=",".join(f"l{i}" for i in range(64)),
                                                     prompts=[f"{{}} {{modality}} {{anatomy}} {i}" for i in range(16)]),
        "a 16,000-letter task": dict(task="t" * 16_000, labels="ct,mr"),
        "a 16,000-letter head": dict(head="h" * 16_000),
    }


@pytest.mark.parametrize("case", sorted(_hostile_requests()))
def test_hostile_classify_requests_are_refused_before_any_work(model, client, case):
    _classify(client, labels="ct,mr")  # warm up (imports, the classifier for ct/mr) outside the measurement
    taken, tokenized = model._lock.taken, model.tokenizer.calls
    tracemalloc.start()
    try:
        response = _classify(client, **_hostile_requests()[case])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert 400 <= response.status_code < 500, (case, response.status_code, response.text[:500])
    detail = response.json()["detail"]
    assert isinstance(detail, str) and 10 < len(detail) < 2000, detail[:500]
    assert model._lock.taken == taken, f"{case}: the model's lock was taken"
    assert model.tokenizer.calls == tokenized, f"{case}: texts were tokenized"
    assert peak < PEAK_BYTES, f"{case}: peak {peak / 2**20:.1f} MiB"


def test_size_refusals_are_413_and_template_refusals_422(client):
    assert _classify(client, labels="a" * 16_000 + ",b").status_code == 413
    too_many = [f"{{}} {i}" for i in range(LIMITS.max_prompts + 1)]
    assert _classify(client, labels="ct,mr", prompts=too_many).status_code == 413
    expanding = _classify(client, labels=",".join(f"l{i}" for i in range(64)),
                          prompts=[f"{{}} {{modality}} {{anatomy}} {i}" for i in range(16)])
    assert expanding.status_code == 413 and "limit" in expanding.json()["detail"]
    for template in ("{} {:>99999999}", "{} {0:>{1}}", "{} {!r}", "{} {.__class__}", "{} {[0]}", "a {} {"):
        response = _classify(client, labels="ct,mr", prompts=template)
        assert response.status_code == 422, (template, response.text)


def test_other_request_fields_are_bounded_before_work(model, client):
    taken, tokenized = model._lock.taken, model.tokenizer.calls
    with_index = TestClient(create_app(model, _FakeIndex(model), None, LIMITS))
    responses = [
        with_index.get("/search", params={"text": "x" * 20_000}),
        with_index.get("/search", params={"text": "CT", "k": 10**9}),
        with_index.post("/search", data={"text": "CT", "k": str(-1)}),
        with_index.post("/search", files={"file": ("a.png", PNG, "image/png")}, data={"k": "100000"}),
        client.get("/search", params={"text": "x" * 20_000}),  # no index: 404 before embedding
        client.post("/embed", data={"text": ["t"] * (LIMITS.max_texts + 1)}),
        client.post("/embed", data={"text": "x" * (LIMITS.max_text_chars + 1)}),
        _classify(client, top="1000000"),
    ]
    for response in responses:
        assert 400 <= response.status_code < 500, response.text[:300]
    assert model._lock.taken == taken and model.tokenizer.calls == tokenized


class _FakeIndex:
    def __init__(self, model):
        self.dim = model.dim

    def check_model(self, fingerprint, dim):
        pass

    def __len__(self):
        return 3

    def search(self, vectors, k):
        return [[]]


def test_a_valid_request_after_the_refusals_still_works(model, client):
    response = _classify(client, labels="pneumothorax,normal chest", prompts="a chest X-ray showing {}.")
    assert response.status_code == 200, response.text
    expected = model.classify(PNG, labels=["pneumothorax", "normal chest"], prompts=["a chest X-ray showing {}."])
    assert np.allclose(list(response.json()["probabilities"].values()), expected.probs[0], atol=1e-5)


def test_the_largest_allowed_classifier_is_bounded_work(model, client):
    """At the limits (64 labels x 16 templates) the classifier is built: bounded work, under the lock."""
    labels = ",".join(f"finding {i}" for i in range(LIMITS.max_labels))
    prompts = [f"a scan showing {{}}, view {i}." for i in range(LIMITS.max_prompts)]
    taken = model._lock.taken
    response = _classify(client, labels=labels, prompts=prompts)
    assert response.status_code == 200, response.text
    assert model._lock.taken > taken


# -- liveness: a real server, hostile requests arriving from threads ----------------------------


def test_a_valid_request_is_answered_while_hostile_ones_run(model):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(model, None, None, LIMITS), log_level="warning",
                                           lifespan="off"))
    serving = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    serving.start()
    base = f"http://127.0.0.1:{port}"
    stop, hostile_statuses = threading.Event(), []
    hostile = [dict(labels="ct,mr", prompts="{} {:>99999999}"), dict(labels="a" * 16_000 + ",b"),
               dict(labels="ct,mr", prompts="{} {0:>{1}}"), dict(labels=",".join(map(str, range(5000))))]

    def attack(data):
        with httpx.Client(base_url=base, timeout=30) as http:
            while not stop.is_set():
                response = http.post("/classify", files={"file": ("a.png", PNG, "image/png")}, data=data)
                hostile_statuses.append(response.status_code)

    attackers = [threading.Thread(target=attack, args=(data,), daemon=True) for data in hostile * 2]
    try:
        deadline = time.monotonic() + 20
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.started, "the server did not start"
        for thread in attackers:
            thread.start()
        time.sleep(0.5)  # let the attack get going
        with httpx.Client(base_url=base, timeout=30) as http:
            start = time.monotonic()
            response = http.post("/classify", files={"file": ("a.png", PNG, "image/png")},
                                 data={"labels": "pneumothorax,normal chest",
                                       "prompts": "a chest X-ray showing {} (liveness)."})
            elapsed = time.monotonic() - start
        assert response.status_code == 200, response.text
        assert elapsed < 10, f"a valid request took {elapsed:.1f} s while hostile requests ran"
    finally:
        stop.set()
        for thread in attackers:
            if thread.is_alive():
                thread.join(timeout=30)
        server.should_exit = True
        serving.join(timeout=30)
        sock.close()
    assert hostile_statuses and all(400 <= status < 500 for status in hostile_statuses), set(hostile_statuses)


# -- the library -----------------------------------------------------------------------------


class HashTextModel(torch.nn.Module):
    """encode_text: a fixed pseudo-random unit vector per text (seeded by its CRC)."""

    def __init__(self, dim=8):
        super().__init__()
        self.dim, self.dummy, self.encoded = dim, torch.nn.Parameter(torch.zeros(1)), 0

    def encode_text(self, texts, normalize=True):
        self.encoded += len(texts)
        rows = [torch.randn(self.dim, generator=torch.Generator().manual_seed(zlib.crc32(text.encode())))
                for text in texts]
        out = torch.stack(rows)
        return out / out.norm(dim=1, keepdim=True) if normalize else out


class _Texts(list):
    def to(self, device):
        return self


@pytest.mark.parametrize("template", list(HOSTILE_TEMPLATES.values()))
def test_the_library_refuses_hostile_templates_before_encoding(model, template):
    with pytest.raises(ValueError):
        label_prompts("modality", ["ct", "mr"], templates=[template])
    taken, tokenized = model._lock.taken, model.tokenizer.calls
    with pytest.raises(ValueError):
        model.classify(PNG, labels=["ct", "mr"], prompts=[template])
    assert model._lock.taken == taken and model.tokenizer.calls == tokenized


def test_the_library_refuses_over_long_labels_and_ensembles():
    text_model = HashTextModel()
    with pytest.raises(PromptLimit, match=f"limit of {zero_shot.MAX_LABEL_CHARS}"):
        label_prompts("modality", ["a" * 16_000, "b"], templates=["{}"])
    with pytest.raises(PromptLimit, match=f"limit of {zero_shot.MAX_LABEL_CHARS}"):
        zero_shot_weights(text_model, _Texts, {"a" * 16_000: ["x"], "b": ["y"]})
    with pytest.raises(PromptLimit, match="limit of 10 "):
        zero_shot_weights(text_model, _Texts, {"a": ["x"] * 6, "b": ["y"] * 6}, max_prompts=10)
    with pytest.raises(PromptLimit, match="limit of 100"):
        label_prompts("anatomy", [f"l{i}" for i in range(50)], templates=["{} {modality}"], max_prompts=100)
    with pytest.raises(PromptLimit, match=f"limit of {zero_shot.MAX_PROMPT_CHARS}"):
        zero_shot_weights(text_model, _Texts, {"a": ["x" * 5000], "b": ["y"]})
    with pytest.raises(PromptLimit, match="limit of 1000"):
        label_prompts("modality", ["ct", "mr"], templates=["{}" + "x" * 2000])
    with pytest.raises(TemplateError, match="format specs"):
        zero_shot_weights(text_model, _Texts, label_prompts("modality", ["ct", "mr"], templates=["{} {:>9}"]))
    # a template naming a task many times is one choice per task, not a product over its repeats
    repeated = label_prompts("anatomy", ["head"], templates=["{} " + "{modality} " * 20], synonyms=False)
    assert len(repeated["head"]) == len(label_prompts("anatomy", ["head"], templates=["{} {modality}"],
                                                      synonyms=False)["head"])
    assert text_model.encoded == 0


def test_the_model_lock_is_held_only_while_encoding():
    lock = CountingLock()
    text_model = HashTextModel()
    seen = []

    def tokenizer(texts):
        seen.append(lock.locked())
        return _Texts(texts)

    original = text_model.encode_text

    def encode_text(texts, normalize=True):
        assert lock.locked(), "encoding without the lock"
        return original(texts, normalize)

    text_model.encode_text = encode_text
    zero_shot_weights(text_model, tokenizer, {f"c{i}": [f"p{i}-{k}" for k in range(1 + i % 3)] for i in range(25)},
                      lock=lock)
    assert seen and not any(seen) and lock.taken == 1


# -- the classify command ----------------------------------------------------------------------


def test_the_classify_command_refuses_a_format_spec_template(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a checkpoint\n")
    env = {key: value for key, value in os.environ.items() if key != "HYDRA_FULL_ERROR"}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run([sys.executable, "-m", "clip_med.classify", f"checkpoint={notes}", f"images={notes}",
                           "labels=[ct,mr]", "prompts=['{} {:>99999999}']"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-3000:]
    assert "format spec" in lines[0] and "Traceback" not in done.stderr
