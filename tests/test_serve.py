import io
import struct
import zlib

import numpy as np
import pydicom.data
import pytest
from api_helpers import gradient, png_bytes, save_checkpoint, synthetic_shards
from fastapi.testclient import TestClient
from PIL import Image

import clip_med
from clip_med.eval.linear_probe import fit_probe
from clip_med.eval.probe_head import ProbeHead
from clip_med.inference.extract import ExtractConfig, extract
from clip_med.inference.service import ServiceLimits, create_app

LIMITS = ServiceLimits(max_upload_bytes=300_000, max_pixels=4_000_000, max_labels=8, max_k=20, max_text_chars=200)
CT_SMALL = pydicom.data.get_testdata_file("CT_small.dcm")
MR_SMALL = pydicom.data.get_testdata_file("MR_small.dcm")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model = clip_med.load(save_checkpoint(root / "run"))
    shard_set = synthetic_shards(root / "shards", {"dev": 12})
    extract(model, shard_set.urls("dev"), root / "out", ExtractConfig(workers=0, progress=False))
    x = model.embed_images([gradient(seed=seed) for seed in range(8)])
    head = ProbeHead.from_fitted(fit_probe(x, ["ct", "mr"] * 4, Cs=[1.0]), "modality", model.fingerprint, model.name)
    app = create_app(model, clip_med.open_index(root / "out"), {"modality": head}, LIMITS)
    return model, head, TestClient(app)


def _png(seed=0):
    return png_bytes(gradient(seed=seed))


def _jpeg():
    buffer = io.BytesIO()
    Image.fromarray(gradient()).save(buffer, format="JPEG")
    return buffer.getvalue()


def _huge_png(width=100_000, height=100_000):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 100))
            + chunk(b"IEND", b""))


def test_health_and_openapi(served):
    model, _, client = served
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["model"] == "medclip-tiny" and health["index"] == {"size": 12}
    assert health["heads"]["modality"]["labels"] == ["ct", "mr"] and health["limits"]["max_k"] == 20
    paths = client.get("/openapi.json").json()["paths"]
    # the JSON API of before, plus the browse routes of the page (tests/test_web_api.py)
    assert {"/health", "/classify", "/embed", "/search"} <= set(paths) and set(paths["/search"]) == {"get", "post"}


@pytest.mark.parametrize("name,data", [("scan.png", _png()), ("scan.jpg", _jpeg()),
                                       ("CT_small.dcm", open(CT_SMALL, "rb").read()),
                                       ("MR_small.dcm", open(MR_SMALL, "rb").read())])
def test_classify_uploads_like_the_python_api(served, name, data):
    model, _, client = served
    response = client.post("/classify", files={"file": (name, data, "application/octet-stream")},
                           data={"task": "anatomy"})
    assert response.status_code == 200, response.text
    body = response.json()
    expected = model.classify(data, task="anatomy")
    assert body["labels"] == expected.labels and body["prediction"] == expected.predictions[0]
    assert np.allclose([body["probabilities"][label] for label in body["labels"]], expected.probs[0], atol=1e-5)
    assert body["format"] == {"png": "png", "jpg": "jpeg", "dcm": "dicom"}[name.rsplit(".", 1)[1]]
    assert len(body["top"]) == 3


def test_classify_with_labels_prompts_and_heads(served):
    model, head, client = served
    files = {"file": ("a.png", _png(), "image/png")}
    own = client.post("/classify", files=files, data={"labels": "pneumothorax, normal chest",
                                                      "prompts": "a chest X-ray showing {}."}).json()
    expected = model.classify(_png(), labels=["pneumothorax", "normal chest"], prompts=["a chest X-ray showing {}."])
    assert own["labels"] == ["pneumothorax", "normal chest"]
    assert np.allclose(list(own["probabilities"].values()), expected.probs[0], atol=1e-5)
    repeated = client.post("/classify", files=files, data={"labels": ["pneumothorax", "normal chest"],
                                                           "prompts": ["a chest X-ray showing {}."]}).json()
    assert repeated["probabilities"] == own["probabilities"]
    probe = client.post("/classify", files=files, data={"head": "modality"}).json()
    assert probe["method"] == "linear_probe" and probe["labels"] == ["ct", "mr"]
    assert np.allclose(list(probe["probabilities"].values()), model.classify(_png(), head=head).probs[0], atol=1e-5)


def test_embed_and_search(served):
    model, _, client = served
    image = client.post("/embed", files={"file": ("a.png", _png(), "image/png")}).json()
    assert image["kind"] == "image" and image["dim"] == 128
    assert np.allclose(image["embeddings"], model.embed_images(_png()), atol=1e-5)
    texts = client.post("/embed", data={"text": ["a CT of the head", "an MRI"]}).json()
    assert np.allclose(texts["embeddings"], model.embed_texts(["a CT of the head", "an MRI"]), atol=1e-5)
    index = clip_med.open_index(served[0].info.path.parent.parent.parent / "out")
    expected = [hit.id for hit in model.search(index, text="a CT of the head", k=4)]
    by_get = client.get("/search", params={"text": "a CT of the head", "k": 4}).json()
    assert [hit["id"] for hit in by_get["results"]] == expected and by_get["index_size"] == 12
    by_post = client.post("/search", data={"text": "a CT of the head", "k": "4"}).json()
    assert [hit["id"] for hit in by_post["results"]] == expected
    by_image = client.post("/search", files={"file": ("CT_small.dcm", open(CT_SMALL, "rb").read())},
                           data={"k": "3"}).json()
    assert [hit["id"] for hit in by_image["results"]] == [hit.id for hit in model.search(index, image=CT_SMALL, k=3)]


def _malformed_requests():
    png = _png()
    return {
        "empty upload": dict(files={"file": ("a.png", b"", "image/png")}),
        "truncated png": dict(files={"file": ("a.png", png[: len(png) // 2], "image/png")}),
        "not an image": dict(files={"file": ("a.png", b"hello, I am text" * 20, "image/png")}),
        "huge dimensions": dict(files={"file": ("bomb.png", _huge_png(), "image/png")}),
        "large but under pillow's limit": dict(files={"file": ("big.png", _huge_png(3000, 3000), "image/png")}),
        "declared text": dict(files={"file": ("a.txt", png, "text/plain")}),
        "json body": dict(json={"file": "a.png"}),
        "form without file": dict(data={"task": "modality"}),
        "over the size limit": dict(files={"file": ("a.png", png + b"\x00" * 400_000, "image/png")}),
        "broken multipart": dict(content=b"--xyz\r\ngarbage", headers={"content-type": "multipart/form-data; "
                                                                                       "boundary=xyz"}),
        "fake dicom": dict(files={"file": ("a.dcm", b"\x00" * 128 + b"DICM" + b"\x01" * 300, "application/dicom")}),
        "one label": dict(files={"file": ("a.png", png, "image/png")}, data={"labels": "pneumonia"}),
        "unknown task": dict(files={"file": ("a.png", png, "image/png")}, data={"task": "finding"}),
        "unknown head": dict(files={"file": ("a.png", png, "image/png")}, data={"head": "nope"}),
        "too many labels": dict(files={"file": ("a.png", png, "image/png")}, data={"labels": ",".join("abcdefghij")}),
        "bad template": dict(files={"file": ("a.png", png, "image/png")}, data={"labels": "a,b", "prompts": "x"}),
        "bad top": dict(files={"file": ("a.png", png, "image/png")}, data={"top": "0"}),
    }


@pytest.mark.parametrize("case", sorted(_malformed_requests()))
def test_every_malformed_upload_gets_a_4xx_with_a_message(served, case):
    response = served[2].post("/classify", **_malformed_requests()[case])
    assert 400 <= response.status_code < 500, (case, response.status_code, response.text)
    detail = response.json()["detail"]
    assert isinstance(detail, str) and len(detail) > 10


def test_size_limits_hold_for_streamed_bodies_and_other_endpoints(served):
    client = served[2]

    def chunks():  # a well-formed multipart upload, sent without a Content-Length
        yield (b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
               b"Content-Type: image/png\r\n\r\n" + _png())
        for _ in range(10):
            yield b"x" * 50_000
        yield b"\r\n--xyz--\r\n"

    streamed = client.post("/classify", content=chunks(),
                           headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert streamed.status_code == 413 and "exceeds the limit" in streamed.json()["detail"]
    bad = [client.get("/search", params={"text": "CT", "k": 0}), client.get("/search"),
           client.get("/search", params={"text": "x" * 500}), client.post("/search"),
           client.post("/search", data={"text": "CT", "k": "abc"}), client.post("/embed"),
           client.post("/embed", data={"text": "   "}), client.post("/embed", data={"text": ["t"] * 100}),
           client.post("/embed", files={"file": ("a.png", b"nope", "image/png")})]
    for response in bad:
        assert 400 <= response.status_code < 500 and response.json()["detail"], response.text


def test_mutated_files_never_cause_a_server_error(served):
    client = served[2]
    rng = np.random.default_rng(0)
    originals = [_png(), _jpeg(), open(CT_SMALL, "rb").read()]
    for trial in range(24):
        data = bytearray(originals[trial % 3])
        for position in rng.integers(8, len(data), size=8):
            data[position] = rng.integers(0, 256)
        if trial % 4 == 0:
            data = data[: rng.integers(10, len(data))]
        response = client.post("/classify", files={"file": ("x", bytes(data), "application/octet-stream")})
        assert response.status_code < 500, (trial, response.text)


def test_no_index_means_a_clear_404(served):
    model = served[0]
    client = TestClient(create_app(model, None, None, LIMITS))
    response = client.get("/search", params={"text": "CT"})
    assert response.status_code == 404 and "index=" in response.json()["detail"]
