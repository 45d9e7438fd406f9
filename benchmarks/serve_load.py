"""Load test of ``POST /classify`` on localhost, plus the malformed-upload set, and of the page's own requests.

    python benchmarks/serve_load.py                                   # untrained medclip-small, 200 requests
    python benchmarks/serve_load.py --checkpoint runs/medpix/<time>/checkpoints/step-NNNNNNNN.pt \
        --requests 400 --images /path/to/MedPix-2-0/images/*.png
    python benchmarks/serve_load.py --shards "shards/medpix/dev-*.tar"   # + the page: search + thumbnails
    python benchmarks/serve_load.py --checkpoint <ckpt> --index embeddings/medpix-dev  # an existing folder

With ``--index`` (an embedding folder of ``--checkpoint``) or ``--shards`` (embedded here first, with
the same model, into a temporary folder), the page's requests are measured too: ``--concurrency``
clients each show ``--page-views`` result pages, one page being ``GET /search?text=..&k=24`` (one of
a few queries, with a filter every third time) and then the ``GET /items/{id}/thumbnail`` of each
result, one after another (a browser fetches up to 6 at once). Thumbnails are made on the first
request and cached (``web.thumbnail_cache_items``): the first pass over the archive is the cold
figure, the next passes warm. The table gives p50/p95 per request kind and per whole page.

The service runs in this process (uvicorn on 127.0.0.1, a free port) with the same app as
``python -m clip_med.serve``. ``--concurrency`` clients (threads, one HTTP connection each) send
``--requests`` uploads in total (PNG images and pydicom's CT_small.dcm / MR_small.dcm), and the
table gives p50/p95/max latency, throughput and the error count. The baseline, measured in the
same run on the same files, is ``model.classify(bytes)`` called directly (no HTTP, one at a
time). Then every malformed upload (empty, truncated, not an image, huge dimensions, wrong
content type, over the size limit, ...) must come back as a 4xx with a message; the script exits
with status 1 if one does not, or if any load request failed.
"""

from __future__ import annotations

import argparse
import io
import statistics
import struct
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pydicom.data
import uvicorn
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from embed_bench import untrained_checkpoint  # noqa: E402

import clip_med  # noqa: E402
from clip_med.inference.service import ServiceLimits, create_app  # noqa: E402


def synthetic_pngs(count: int, side: int) -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(0)
    files = []
    for index in range(count):
        base = np.add.outer(np.arange(side), np.arange(side)) % 255
        array = np.clip(base + rng.normal(0, 20, (side, side)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        files.append((f"synthetic-{index}.png", buffer.getvalue()))
    return files


def payloads(args) -> list[tuple[str, bytes]]:
    files = [(Path(path).name, Path(path).read_bytes()) for path in args.images] if args.images else \
        synthetic_pngs(8, args.image_side)
    for name in ("CT_small.dcm", "MR_small.dcm"):
        files.append((name, Path(pydicom.data.get_testdata_file(name)).read_bytes()))
    return files


class Server:
    """uvicorn in a background thread."""

    def __init__(self, app):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


def load(url: str, files: list[tuple[str, bytes]], requests: int, concurrency: int) -> tuple[list[float], list[str],
                                                                                             float]:
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(worker: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as session:
            for number in range(worker, requests, concurrency):
                name, data = files[number % len(files)]
                start = time.perf_counter()
                try:
                    response = session.post("/classify", files={"file": (name, data)}, data={"task": "modality"})
                    problem = None if response.status_code == 200 else f"{name}: {response.status_code} {response.text}"
                except httpx.HTTPError as exc:
                    problem = f"{name}: {type(exc).__name__}: {exc}"
                with lock:
                    latencies.append((time.perf_counter() - start) * 1000)
                    if problem:
                        errors.append(problem)

    threads = [threading.Thread(target=client, args=(worker,)) for worker in range(concurrency)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, errors, time.perf_counter() - start


def huge_png(side: int = 100_000) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def malformed(png: bytes, limit: int) -> dict[str, dict]:
    return {
        "empty file": {"files": {"file": ("empty.png", b"", "image/png")}},
        "truncated PNG": {"files": {"file": ("cut.png", png[: len(png) // 2], "image/png")}},
        "not an image": {"files": {"file": ("notes.png", b"patient notes, not pixels\n" * 40, "image/png")}},
        "huge dimensions (100000x100000 header)": {"files": {"file": ("bomb.png", huge_png(), "image/png")}},
        "wrong content type (text/plain part)": {"files": {"file": ("scan.png", png, "text/plain")}},
        "wrong content type (JSON body)": {"json": {"file": "scan.png"}},
        "over the size limit": {"files": {"file": ("big.png", png + b"\x00" * (limit + 1), "image/png")}},
        "fake DICOM": {"files": {"file": ("fake.dcm", b"\x00" * 128 + b"DICM" + b"\x02" * 512, "application/dicom")}},
        "no file field": {"data": {"task": "modality"}},
    }


def check_malformed(url: str, png: bytes, limit: int) -> list[tuple[str, int, str, bool]]:
    results = []
    with httpx.Client(base_url=url, timeout=60) as session:
        for case, request in malformed(png, limit).items():
            response = session.post("/classify", **request)
            try:
                detail = str(response.json().get("detail", ""))
            except ValueError:
                detail = response.text
            ok = 400 <= response.status_code < 500 and len(detail) > 10
            results.append((case, response.status_code, detail, ok))
    return results


PAGE_QUERIES = ["axial CT of the head with hemorrhage", "MRI of the lumbar spine", "chest X-ray with pneumothorax",
                "abdominal CT with contrast", "T2 weighted MRI of the knee", "ultrasound of the kidney"]


def page_load(url: str, views: int, concurrency: int, k: int, modality: str | None
              ) -> tuple[dict[str, list[float]], list[str], float]:
    """The page's requests: a search, then the thumbnail of each result (see the module docstring)."""
    times: dict[str, list[float]] = {"search": [], "thumbnail (first request)": [], "thumbnail (cached)": [],
                                     "page (search + thumbnails)": []}
    errors: list[str] = []
    seen: set[int] = set()
    lock = threading.Lock()

    def timed(session: httpx.Client, path: str, params=None) -> tuple[float, httpx.Response | None]:
        start = time.perf_counter()
        try:
            response = session.get(path, params=params)
        except httpx.HTTPError as exc:
            with lock:
                errors.append(f"{path}: {type(exc).__name__}: {exc}")
            return (time.perf_counter() - start) * 1000, None
        if response.status_code != 200:
            with lock:
                errors.append(f"{path}: {response.status_code} {response.text[:200]}")
        return (time.perf_counter() - start) * 1000, response

    def client(worker: int) -> None:
        with httpx.Client(base_url=url, timeout=120, headers={"X-Clip-Med": "page"}) as session:
            for number in range(worker, views, concurrency):
                page_start = time.perf_counter()
                params = {"text": PAGE_QUERIES[number % len(PAGE_QUERIES)], "k": k}
                if modality and number % 3 == 2:
                    params["modality"] = modality
                elapsed, response = timed(session, "/search", params)
                with lock:
                    times["search"].append(elapsed)
                hits = response.json()["results"] if response is not None and response.status_code == 200 else []
                for hit in hits:
                    with lock:
                        cold = hit["position"] not in seen
                        seen.add(hit["position"])
                    elapsed, _ = timed(session, f"/items/{hit['position']}/thumbnail")
                    with lock:
                        times["thumbnail (first request)" if cold else "thumbnail (cached)"].append(elapsed)
                with lock:
                    times["page (search + thumbnails)"].append((time.perf_counter() - page_start) * 1000)

    threads = [threading.Thread(target=client, args=(worker,)) for worker in range(concurrency)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return times, errors, time.perf_counter() - start


def page_index(args, model, tmp: str):
    """The index the page is measured on: --index, or --shards embedded here with the benchmark's model."""
    if args.index:
        return clip_med.open_index(args.index)
    from clip_med.inference.extract import ExtractConfig, extract

    out = Path(tmp) / "embeddings"
    extract(model, args.shards, out, ExtractConfig(progress=False))
    return clip_med.open_index(out)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", help="a clip_med checkpoint (default: an untrained --model)")
    parser.add_argument("--model", default="medclip-small")
    parser.add_argument("--images", nargs="*", help="image files to upload (default: synthetic PNGs)")
    parser.add_argument("--image-side", type=int, default=512)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--baseline-requests", type=int, default=50, help="direct model.classify calls")
    parser.add_argument("--max-upload-bytes", type=int, default=8 * 1024 * 1024)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--index", help="an embedding folder of --checkpoint: also measure the page's requests")
    parser.add_argument("--shards", help="shards to embed (with this model) for the page's requests")
    parser.add_argument("--page-views", type=int, default=60, help="result pages shown, over all clients")
    parser.add_argument("--page-size", type=int, default=24, help="results (and thumbnails) per page")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or untrained_checkpoint(Path(tmp) / "run", args.model, None)
        model = clip_med.load(checkpoint, device=args.device)
        files = payloads(args)
        model.classify(files[0][1])  # warm-up (and the zero-shot classifier cache)
        direct = []
        for _, data in files * max(1, args.baseline_requests // len(files)):
            start = time.perf_counter()
            model.classify(data, task="modality")
            direct.append((time.perf_counter() - start) * 1000)
        limits = ServiceLimits(max_upload_bytes=args.max_upload_bytes)
        with Server(create_app(model, limits=limits)) as url:
            latencies, errors, wall = load(url, files, args.requests, args.concurrency)
            checks = check_malformed(url, files[0][1], args.max_upload_bytes)
        page = None
        if args.index or args.shards:
            index = page_index(args, model, tmp)
            with Server(create_app(model, index, limits=limits)) as url:
                facets = httpx.get(url + "/facets").json()["filters"].get("modality", {})
                modality = next(iter(facets), None)
                page = (len(index), *page_load(url, args.page_views, args.concurrency, args.page_size, modality))

    print(f"model {model.name} on {model.device}; {len(files)} distinct uploads "
          f"({', '.join(sorted({name.rsplit('.', 1)[-1] for name, _ in files}))})")
    print("| measurement | requests | concurrency | p50 ms | p95 ms | max ms | requests/s | errors |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| model.classify(bytes), no HTTP (baseline) | {len(direct)} | 1 | {statistics.median(direct):.1f} "
          f"| {percentile(direct, 95):.1f} | {max(direct):.1f} | {1000 / statistics.mean(direct):.1f} | 0 |")
    print(f"| POST /classify over HTTP | {len(latencies)} | {args.concurrency} | {percentile(latencies, 50):.1f} "
          f"| {percentile(latencies, 95):.1f} | {max(latencies):.1f} | {len(latencies) / wall:.1f} | {len(errors)} |")
    for error in errors[:5]:
        print("  error:", error[:300])
    if page is not None:
        size, times, page_errors, page_wall = page
        print(f"\nthe page's requests over an index of {size} images: {args.page_views} result pages of "
              f"{args.page_size}, {args.concurrency} clients, {page_wall:.1f} s, {len(page_errors)} errors")
        print("| page request | requests | concurrency | p50 ms | p95 ms | max ms |")
        print("|---|---|---|---|---|---|")
        for kind, values in times.items():
            if values:
                print(f"| {kind} | {len(values)} | {args.concurrency} | {percentile(values, 50):.1f} "
                      f"| {percentile(values, 95):.1f} | {max(values):.1f} |")
        for error in page_errors[:5]:
            print("  error:", error[:300])
        errors = errors + page_errors
    print("\n| malformed upload | status | 4xx with a message | detail |")
    print("|---|---|---|---|")
    for case, status, detail, ok in checks:
        print(f"| {case} | {status} | {'yes' if ok else 'NO'} | {detail[:110]} |")
    if errors or not all(ok for *_, ok in checks):
        sys.exit(1)


if __name__ == "__main__":
    main()
