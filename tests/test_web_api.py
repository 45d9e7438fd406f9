"""The service's browse API and its guards, without a browser: items and thumbnails read from the shards,
filters, paging, "more like this", moved shards, traversal and injection attempts, the access token."""

from __future__ import annotations

import hmac
import io
import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pydicom.data
import pytest
from api_helpers import gradient, png_bytes
from fastapi.testclient import TestClient
from PIL import Image
from web_helpers import HOSTILE_CAPTION, HOSTILE_ID, HOSTILE_SOURCE, TOKEN, build_archive, member_image, pixels

import clip_med
from clip_med.inference import auth
from clip_med.inference.auth import check_bind, resolve_token
from clip_med.inference.service import ServiceLimits, WebConfig, create_app

LIMITS = ServiceLimits(max_upload_bytes=300_000, max_pixels=4_000_000, max_k=20, max_offset=50)
CT_SMALL = pydicom.data.get_testdata_file("CT_small.dcm")
ROUTES_WITH_AN_ID = ("/items/{}", "/items/{}/thumbnail", "/items/{}/image", "/items/{}/similar")


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return build_archive(tmp_path_factory.mktemp("web"))


@pytest.fixture(scope="module")
def index(archive):
    return clip_med.open_index(archive.folder)


@pytest.fixture(scope="module")
def client(archive, index):
    app = create_app(archive.model, index, {"modality": archive.head}, LIMITS, WebConfig(thumbnail_side=24))
    return TestClient(app)


@pytest.fixture(scope="module")
def table(archive):
    return pq.read_table(archive.folder / "metadata.parquet").to_pylist()


def _hostile_positions(table):
    return [position for position, row in enumerate(table) if row["source"] == HOSTILE_SOURCE]


def test_the_schema_documents_the_browse_routes(client):
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/facets", "/items/{item_id}", "/items/{item_id}/thumbnail", "/items/{item_id}/image",
                 "/items/{item_id}/similar", "/analyze", "/search"):
        assert path in paths, path
    search = {parameter["name"] for parameter in paths["/search"]["get"]["parameters"]}
    assert {"text", "k", "offset", "modality", "anatomy", "split", "source"} <= search
    assert "image/jpeg" in paths["/items/{item_id}/thumbnail"]["get"]["responses"]["200"]["content"]


def test_items_are_the_rows_and_their_images_come_from_the_shards(client, table):
    assert len(table) == 19
    for position, row in enumerate(table):
        item = client.get(f"/items/{position}").json()
        assert item["position"] == position and item["id"] == row["id"] and item["key"] == row["key"]
        assert item["caption"] == row["caption"] and item["labels"] == json.loads(row["labels"])
        original = member_image(row["shard"], row["key"])
        full = client.get(f"/items/{position}/image")
        assert full.status_code == 200 and full.headers["content-type"] == "image/png"
        shown = Image.open(io.BytesIO(full.content))
        assert shown.size == original.size and np.array_equal(pixels(shown), pixels(original))
        thumb = client.get(f"/items/{position}/thumbnail")
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
        small = Image.open(io.BytesIO(thumb.content))
        assert small.format == "JPEG" and max(small.size) == 24
        expected = original.convert("L").resize(small.size, Image.Resampling.BILINEAR)
        assert np.abs(pixels(small).astype(int) - pixels(expected).astype(int)).mean() < 12  # the same picture
    assert client.get(f"/items/{len(table)}").status_code == 404
    assert "ids run from 0" in client.get(f"/items/{len(table)}/thumbnail").json()["detail"]


def test_facets_filters_and_paging(client, index, table, archive):
    facets = client.get("/facets").json()
    assert facets["index_size"] == len(table)
    for name in ("modality", "anatomy", "split", "source"):
        expected = {}
        for row in table:
            expected[row[name]] = expected.get(row[name], 0) + 1
        assert facets["filters"][name] == expected, name
    query = archive.model.embed_texts(["a CT of the head"])
    vectors = np.load(archive.folder / "image_embeddings.npy")
    modality = max(facets["filters"]["modality"], key=facets["filters"]["modality"].get)
    filtered = client.get("/search", params={"text": "a CT of the head", "k": 20, "modality": modality}).json()
    matching = [position for position, row in enumerate(table) if row["modality"] == modality]
    assert filtered["total"] == len(matching) < len(table)
    assert {hit["modality"] for hit in filtered["results"]} == {modality}
    brute = sorted(matching, key=lambda position: (-float(vectors[position] @ query[0]), position))
    assert [hit["position"] for hit in filtered["results"]] == brute
    both = client.get("/search", params={"text": "CT", "k": 20, "modality": modality, "split": "nope"}).json()
    assert both["total"] == 0 and both["results"] == []
    second_pages = []
    for filters in ({}, {"modality": modality}):
        whole = client.get("/search", params={"text": "an MRI", "k": 6, **filters}).json()["results"]
        pages = [client.get("/search", params={"text": "an MRI", "k": 3, "offset": offset, **filters}).json()
                 for offset in (0, 3)]
        assert [hit["position"] for page in pages for hit in page["results"]] == [hit["position"] for hit in whole]
        assert [hit["rank"] for hit in pages[1]["results"]] == [4, 5, 6]
        second_pages.append([hit["position"] for hit in pages[1]["results"]])
    posted = client.post("/search", data={"text": "an MRI", "k": "3", "offset": "3"}).json()["results"]
    assert [hit["position"] for hit in posted] == second_pages[0]
    assert client.get("/search", params={"text": "CT", "offset": 51}).status_code == 422
    assert client.get("/search", params={"text": "CT", "offset": -1}).status_code == 422
    assert client.get("/search", params={"text": "CT", "split": "x" * 5000}).status_code == 413


def test_more_like_this_returns_the_item_first(client, table):
    for position in range(len(table)):
        answer = client.get(f"/items/{position}/similar", params={"k": 5}).json()
        assert answer["results"][0]["position"] == position
        assert answer["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
        assert [hit["rank"] for hit in answer["results"]] == [1, 2, 3, 4, 5]
    row = table[0]
    same = client.get("/items/0/similar", params={"k": 20, "modality": row["modality"]}).json()
    assert same["results"][0]["position"] == 0 and {hit["modality"] for hit in same["results"]} == {row["modality"]}
    assert client.get("/items/0/similar", params={"k": 0}).status_code == 422


def test_analyze_classifies_with_every_classifier_and_finds_neighbours(client, archive):
    for name, data in (("scan.png", png_bytes(gradient())), ("CT_small.dcm", open(CT_SMALL, "rb").read())):
        answer = client.post("/analyze", files={"file": (name, data, "application/octet-stream")},
                             data={"k": "4"})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert [result["name"] for result in body["classifications"]] == ["modality", "anatomy", "head modality"]
        for result in body["classifications"]:
            assert sum(item["probability"] for item in result["probabilities"]) == pytest.approx(1.0, abs=1e-4)
        expected = archive.model.classify(data, task="anatomy")
        anatomy = {item["label"]: item["probability"] for item in body["classifications"][1]["probabilities"]}
        assert anatomy == pytest.approx(expected[0], abs=1e-5)
        assert len(body["neighbours"]["results"]) == 4
    corrupt = client.post("/analyze", files={"file": ("broken.png", png_bytes(gradient())[:60], "image/png")})
    assert 400 <= corrupt.status_code < 500 and len(corrupt.json()["detail"]) > 10
    too_big = client.post("/analyze", files={"file": ("big.png", b"\x89PNG" + b"\x00" * 400_000, "image/png")})
    assert too_big.status_code == 413  # the JSON API's upload limit holds for the page's uploads


def test_shards_that_moved_or_changed_give_a_clear_error(tmp_path, archive):
    shard = tmp_path / "shards" / "dev-000000.tar"
    shard.parent.mkdir()
    shutil.copy(archive.hostile_shard, shard)
    from clip_med.inference.extract import ExtractConfig, extract

    extract(archive.model, [str(shard)], tmp_path / "out", ExtractConfig(workers=0, progress=False))
    client = TestClient(create_app(archive.model, clip_med.open_index(tmp_path / "out"), None, LIMITS))
    assert client.get("/items/0/thumbnail").status_code == 200
    moved = tmp_path / "elsewhere.tar"
    shard.rename(moved)
    for route in ("/items/1/thumbnail", "/items/1/image"):
        response = client.get(route)
        assert response.status_code == 410 and "moved or deleted" in response.json()["detail"], response.text
    assert client.get("/items/1").status_code == 200  # the row itself is still there
    shutil.copy(moved, shard)  # back, but a different file (its modification time differs)
    response = client.get("/items/2/image")
    assert response.status_code == 410 and "changed since it was embedded" in response.json()["detail"]


TRAVERSALS = ["../../etc/passwd", "..%2f..%2fetc%2fpasswd", "%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/etc/passwd",
              "%2fetc%2fpasswd", "..\\..\\windows", "0/../../../etc/passwd", "-1", "1e3", "0x1",
              "99999999999999999999999999", "%00", "1%00", "<script>", "%3Cscript%3E"]
# (a path of ".." or "." alone is normalised away by the client before it is sent)


def _refused_or_inert(response) -> bool:
    if 400 <= response.status_code < 500:
        return True
    body = response.content
    return response.status_code == 200 and b"root:" not in body and b"import " not in body


def test_traversal_attempts_on_every_route_that_takes_an_id_or_a_name(client):
    for attempt in TRAVERSALS:
        for route in ROUTES_WITH_AN_ID:
            response = client.get(route.format(attempt))
            assert 400 <= response.status_code < 500, (route, attempt, response.status_code)
        for route in (f"/static/{attempt}", f"/static/app.js/{attempt}", f"/static/{attempt}/app.js"):
            response = client.get(route)
            assert 400 <= response.status_code < 500, (route, response.status_code)
    for name in ("service.py", "auth.py", "../service.py", "..%2fservice.py", "web/app.js", "index.html%00",
                 "APP.JS", "app.js.map", ".", ".."):
        response = client.get(f"/static/{name}")
        assert 400 <= response.status_code < 500 or response.content == client.get("/static/index.html").content, name


def test_filters_are_compared_as_data(client, table):
    for attempt in [*TRAVERSALS, "'; DROP TABLE x; --", "\" OR 1=1", "*", "%", ".*"]:
        for name in ("modality", "anatomy", "split", "source"):
            for response in (client.get("/search", params={"text": "CT", name: attempt}),
                             client.get("/items/0/similar", params={name: attempt}),
                             client.post("/search", data={"text": "CT", name: attempt})):
                assert _refused_or_inert(response), (name, attempt, response.text[:200])
                if response.status_code == 200:
                    assert response.json()["total"] == 0
    hostile = client.get("/search", params={"text": "CT", "k": 20, "source": HOSTILE_SOURCE}).json()
    assert hostile["total"] == len(_hostile_positions(table)) == 3


def test_markup_in_captions_and_metadata_comes_back_as_data(client, table):
    position = _hostile_positions(table)[0]
    response = client.get(f"/items/{position}")
    assert response.headers["content-type"] == "application/json"
    item = response.json()
    assert item["caption"] == HOSTILE_CAPTION and item["source"] == HOSTILE_SOURCE and item["id"].startswith(HOSTILE_ID)
    assert item["meta"]["path"] == "../../etc/passwd"  # metadata is shown, never opened
    page = client.get("/")
    assert page.status_code == 200 and HOSTILE_CAPTION.encode() not in page.content
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert response.headers["x-content-type-options"] == "nosniff"
    script = client.get("/static/app.js").text
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in script, sink
    assert "<script>" not in page.text.replace('<script src="/static/app.js" defer></script>', "")


def test_every_route_needs_the_token_when_one_is_set(archive, index, monkeypatch):
    client = TestClient(create_app(archive.model, index, {"modality": archive.head}, LIMITS, token=TOKEN))
    png = png_bytes(gradient())
    requests = [("GET", "/", {}), ("GET", "/static/app.js", {}), ("GET", "/static/app.css", {}),
                ("GET", "/static/index.html", {}), ("GET", "/openapi.json", {}), ("GET", "/docs", {}),
                ("GET", "/redoc", {}), ("GET", "/health", {}), ("GET", "/facets", {}), ("GET", "/items/0", {}),
                ("GET", "/items/0/thumbnail", {}), ("GET", "/items/0/image", {}), ("GET", "/items/0/similar", {}),
                ("GET", "/search?text=CT", {}), ("GET", "/no/such/route", {}),
                ("POST", "/search", {"data": {"text": "CT"}}), ("POST", "/embed", {"data": {"text": "CT"}}),
                ("POST", "/classify", {"files": {"file": ("a.png", png, "image/png")}}),
                ("POST", "/analyze", {"files": {"file": ("a.png", png, "image/png")}})]
    for method, path, extra in requests:
        for headers in ({}, {"Authorization": "Bearer wrong-token-wrong-token"}, {"Authorization": TOKEN},
                        {"Authorization": f"Basic {TOKEN}"}, {"Cookie": f"{auth.COOKIE}={TOKEN}"}):
            response = client.request(method, path, headers=headers, **extra)
            assert response.status_code == 401, (method, path, headers, response.status_code)
        allowed = client.request(method, path, headers={"Authorization": f"Bearer {TOKEN}"}, **extra)
        assert allowed.status_code == (404 if path == "/no/such/route" else 200), (method, path, allowed.text[:200])
    asked = client.get("/", headers={"Accept": "text/html"})
    assert asked.status_code == 401 and 'name="token"' in asked.text and "app.js" not in asked.text

    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    assert client.get("/health", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert calls and calls[-1][1] == TOKEN.encode()  # the token is compared in constant time

    wrong = client.post("/auth/login", data={"token": "not-the-token-at-all"}, follow_redirects=False)
    assert wrong.status_code == 401 and "not this service" in wrong.text
    login = client.post("/auth/login", data={"token": TOKEN}, follow_redirects=False)
    assert login.status_code == 303 and login.headers["location"] == "/"
    cookie = login.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKEN not in cookie
    session = {"Cookie": cookie.split(";")[0]}
    assert client.get("/", headers=session).status_code == 200
    assert client.get("/items/0/thumbnail", headers=session).headers["content-type"] == "image/jpeg"
    # a cross-site form can send the cookie but not the page's header
    assert client.post("/search", data={"text": "CT"}, headers=session).status_code == 401
    assert client.post("/search", data={"text": "CT"}, headers={**session, "X-Clip-Med": "page"}).status_code == 200


def test_binding_beyond_localhost_needs_a_token(monkeypatch):
    monkeypatch.delenv(auth.TOKEN_ENV, raising=False)
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        check_bind(host, None)
    for host in ("0.0.0.0", "::", "192.168.1.20", "example.org"):
        with pytest.raises(ValueError, match="without an access token"):
            check_bind(host, None)
        check_bind(host, TOKEN)
    assert resolve_token(auth.AuthConfig()) is None
    monkeypatch.setenv(auth.TOKEN_ENV, TOKEN)
    assert resolve_token(auth.AuthConfig()) == TOKEN
    assert resolve_token(auth.AuthConfig(token=TOKEN + "x")) == TOKEN + "x"
    with pytest.raises(ValueError, match="at least 16"):
        resolve_token(auth.AuthConfig(token="short"))


def test_the_command_refuses_to_expose_the_service_without_a_token(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != auth.TOKEN_ENV}
    done = subprocess.run([sys.executable, "-m", "clip_med.serve", f"checkpoint={tmp_path / 'none.pt'}",
                           "host=0.0.0.0"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and auth.TOKEN_ENV in errors[0] and "Traceback" not in done.stderr, done.stderr


def test_cors_is_off_unless_configured(archive, index):
    preflight = {"Origin": "https://elsewhere.example", "Access-Control-Request-Method": "POST"}
    plain = TestClient(create_app(archive.model, index, None, LIMITS))
    assert "access-control-allow-origin" not in plain.options("/search", headers=preflight).headers
    assert "access-control-allow-origin" not in plain.get("/health", headers={"Origin": preflight["Origin"]}).headers
    allowed = TestClient(create_app(archive.model, index, None, LIMITS, cors_origins=["https://elsewhere.example"]))
    answer = allowed.options("/search", headers=preflight)
    assert answer.headers["access-control-allow-origin"] == "https://elsewhere.example"


def test_logs_hold_no_query_texts_captions_or_file_names(client, table, caplog):
    caplog.set_level(logging.DEBUG)
    secret = "zebra-patient-doe-1937"
    client.get("/search", params={"text": secret})
    client.post("/search", data={"text": secret})
    position = _hostile_positions(table)[0]
    client.get(f"/items/{position}")
    client.get(f"/items/{position}/thumbnail")
    client.post("/analyze", files={"file": (f"{secret}.png", png_bytes(gradient())[:80], "image/png")})
    client.post("/classify", files={"file": (f"{secret}.png", b"\x89PNG\r\n\x1a\n" + b"\x01" * 300, "image/png")})
    served = [record for record in caplog.records if not record.name.startswith("httpx")]  # the client's own log
    assert any(record.name == "clip_med.inference.access" and "/search" in record.getMessage() for record in served)
    for record in served:
        message = record.getMessage()
        assert secret not in message and HOSTILE_CAPTION not in message and HOSTILE_SOURCE not in message, message


def test_the_page_is_served_without_an_index_too(archive):
    client = TestClient(create_app(archive.model, None, None, LIMITS))
    assert client.get("/").status_code == 200 and client.get("/static/app.js").status_code == 200
    assert client.get("/items/0").status_code == 404 and "index=" in client.get("/facets").json()["detail"]
    answer = client.post("/analyze", files={"file": ("a.png", png_bytes(gradient()), "image/png")}).json()
    assert answer["neighbours"] is None and len(answer["classifications"]) == 2
    off = TestClient(create_app(archive.model, None, None, LIMITS, WebConfig(enabled=False)))
    assert off.get("/").status_code == 404
