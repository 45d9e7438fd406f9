"""The HTTP service (FastAPI): classify, embed and search with one loaded model.

Endpoints: ``POST /classify``, ``POST /classify/series`` (several images of one series or case, or a zip
of a DICOM series: one prediction from their pooled embeddings, :mod:`clip_med.inference.series`),
``POST /embed``, ``GET|POST /search``, ``GET /health``; for browsing the
index ``GET /facets``, ``GET /items/{id}`` (a row), ``/items/{id}/thumbnail`` and ``/items/{id}/image``
(the picture, read from the shard it was embedded from: :mod:`clip_med.inference.archive`),
``/items/{id}/similar`` ("more like this") and ``POST /analyze`` (an upload classified by zero-shot
and every loaded head, plus its neighbours); searches take ``offset`` and filters (``modality``,
``anatomy``, ``split``, ``source``: :mod:`clip_med.inference.browse`). The OpenAPI schema is at
``/openapi.json`` and interactive docs at ``/docs``; the browser page (``clip_med/inference/web``)
is at ``/``. With a token (:mod:`clip_med.inference.auth`) every route needs it.

Everything a client sends is checked before it reaches the model: the request body is capped
(``max_upload_bytes``, refused from ``Content-Length`` before reading, and counted while
streaming), the upload's declared type must be an image type (or absent/octet-stream), its
*content* must be PNG, JPEG, TIFF, WebP, BMP or DICOM by its leading bytes, and the image goes
through the same size guards as the shard writer (``max_pixels`` is checked from the header,
before pixels are decoded). Texts, class labels and prompt templates are checked against
:class:`ServiceLimits` (count and characters each) and templates must be plain ``{}`` templates
(:mod:`clip_med.core.templates`: no format specs, conversions, attributes or indexes), all before
any tokenizing, decoding or model call; so the work done under the model's lock is bounded by
``max_labels`` x ``max_prompt_texts`` prompts of the model's context length. Every refusal is a
4xx with a ``detail`` message saying what was wrong; a 5xx means a bug in clip_med.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Optional

import numpy as np
import torch
from fastapi import FastAPI, File, Form, HTTPException, Path, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image

from clip_med.core.bounds import bounded
from clip_med.core.templates import TemplateError, template_fields
from clip_med.data.images import ImageLimits, ImageRejected
from clip_med.data.record import SkipReason
from clip_med.eval.probe_head import HeadError, ProbeHead
from clip_med.eval.zero_shot import PromptLimit
from clip_med.inference.archive import MEDIA_TYPES, ArchiveError, BytesCache, ShardArchive, encode
from clip_med.inference.auth import AccessGuard, AuthConfig, check_bind, resolve_token
from clip_med.inference.browse import FILTERS, BrowseError, Catalog
from clip_med.inference.evaluation import ModelOptions, load_model
from clip_med.inference.index import IndexFolderError, SearchIndex
from clip_med.inference.inputs import load_image, sniff
from clip_med.inference.series import POOLING
from clip_med.labels import taxonomy

log = logging.getLogger(__name__)

UPLOAD_FORMATS = ("png", "jpeg", "dicom", "tiff", "webp", "bmp")
DECLARED_TYPES_OK = ("image/", "application/dicom", "application/octet-stream")
MULTIPART_OVERHEAD = 64 * 1024
STATUS_BY_REASON = {
    SkipReason.EMPTY_FILE: 400,
    SkipReason.FILE_TOO_LARGE: 413,
    SkipReason.TOO_MANY_PIXELS: 413,
    SkipReason.NOT_AN_IMAGE: 415,
    SkipReason.UNSUPPORTED_MODE: 415,
}


@dataclass
class ServiceLimits:
    max_upload_bytes: int = bounded(32 * 1024 * 1024, minimum=1)  # one request body
    max_pixels: int = bounded(50_000_000, minimum=1)  # one image, from its header, before decoding
    max_text_chars: int = bounded(2000, minimum=1)  # one text of /embed or /search
    max_texts: int = bounded(64, minimum=1)  # texts of one /embed request
    max_labels: int = bounded(64, minimum=1)  # class labels of one /classify request
    max_label_chars: int = bounded(200, minimum=1)  # one class label (also a task or head name)
    max_prompts: int = bounded(16, minimum=1)  # prompt templates of one /classify request
    max_prompt_chars: int = bounded(300, minimum=1)  # one prompt template
    # prompts one classifier encodes: labels x templates x the names they fill in
    max_prompt_texts: int = bounded(2048, minimum=1)
    max_k: int = bounded(100, minimum=1)  # search results
    max_offset: int = bounded(10_000, minimum=0)  # paging: results skipped before the k returned
    max_series_images: int = bounded(256, minimum=1)  # images of one /classify/series request (files or zip members)
    max_series_bytes: int = bounded(256 * 1024 * 1024, minimum=1)  # a series zip's members, uncompressed, in all


@dataclass
class WebConfig:
    enabled: bool = True  # the browser page at / (its static files under /static/)
    thumbnail_side: int = bounded(256, minimum=16, maximum=4096)  # longest side of /items/{id}/thumbnail
    image_max_side: int = bounded(2048, minimum=16)  # /items/{id}/image is shrunk to fit (PNG)
    thumbnail_cache_items: int = bounded(4096, minimum=0)  # LRU of encoded thumbnails
    thumbnail_cache_bytes: int = bounded(256 * 1024 * 1024, minimum=0)
    image_cache_items: int = bounded(64, minimum=0)  # LRU of encoded full images
    image_cache_bytes: int = bounded(128 * 1024 * 1024, minimum=0)
    shard_cache: int = bounded(256, minimum=1)  # shards whose member offsets are kept (read once each)


@dataclass
class ServeConfig(ModelOptions):
    index: Optional[str] = None  # an embedding folder from python -m clip_med.embed (enables /search)
    heads: dict[str, str] = field(default_factory=dict)  # name -> probe head file, used as /classify head=<name>
    host: str = "127.0.0.1"  # any other address needs an access token (auth.token or CLIP_MED_SERVE_TOKEN)
    port: int = bounded(8000, minimum=1, maximum=65535)
    limits: ServiceLimits = field(default_factory=ServiceLimits)
    log_level: str = "info"
    auth: AuthConfig = field(default_factory=AuthConfig)
    web: WebConfig = field(default_factory=WebConfig)
    cors_origins: list[str] = field(default_factory=list)  # origins allowed by CORS; empty: CORS off


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: refuse bodies over ``max_bytes`` (declared or streamed) with 413."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            response = JSONResponse({"detail": _too_large(int(declared), self.max_bytes)}, status_code=413)
            return await response(scope, receive, send)
        seen, refused = 0, None

        async def counting_receive():
            nonlocal seen, refused
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                refused = JSONResponse({"detail": _too_large(seen, self.max_bytes)}, status_code=413)
                raise BodyTooLarge(_too_large(seen, self.max_bytes))
            return message

        async def guarded_send(message):
            # The form parser turns any error while reading into its own 400; the real reason is the size.
            if refused is None:
                return await send(message)
            if message["type"] == "http.response.start":
                await refused(scope, receive, send)

        return await self.app(scope, counting_receive, guarded_send)


def _too_large(size: int, limit: int) -> str:
    return f"request body of {size} bytes or more exceeds the limit of {limit} bytes"


def _read_upload(upload: UploadFile, limits: ServiceLimits) -> bytes:
    declared = (upload.content_type or "").split(";")[0].strip().lower()
    if declared and not declared.startswith(DECLARED_TYPES_OK):
        raise HTTPException(415, f"upload {upload.filename!r} is declared as {declared!r}, not an image: send a PNG, "
                                 "JPEG or DICOM file (image/png, image/jpeg, application/dicom)")
    data = upload.file.read(limits.max_upload_bytes + 1)
    if len(data) > limits.max_upload_bytes:
        raise HTTPException(413, f"upload {upload.filename!r} exceeds {limits.max_upload_bytes} bytes")
    if not data:
        raise HTTPException(400, f"upload {upload.filename!r} is empty")
    kind = sniff(data[:132])
    if kind not in UPLOAD_FORMATS:
        raise HTTPException(415, f"upload {upload.filename!r} is not a PNG, JPEG, TIFF, WebP, BMP or DICOM image "
                                 f"(its content starts with {data[:8]!r})")
    return data


def _decode(model, data: bytes, name: str, limits: ServiceLimits) -> Image.Image:
    prep = model.preprocessing
    prep = dataclasses.replace(prep, limits=ImageLimits(prep.limits.min_side,
                                                        min(prep.limits.max_pixels, limits.max_pixels),
                                                        min(prep.limits.max_file_bytes, limits.max_upload_bytes)))
    try:
        return load_image(data, prep, name)
    except ImageRejected as rejected:
        status = STATUS_BY_REASON.get(rejected.reason, 422)
        raise HTTPException(status, f"{rejected.reason}: {rejected.detail}") from None
    except Exception as exc:  # noqa: BLE001 - untrusted bytes: any decoder failure is the client's file
        # neither the file name nor the decoder's message: either could carry what the file holds
        log.warning("an upload could not be decoded (%s)", type(exc).__name__)
        raise HTTPException(422, f"{name} could not be decoded ({type(exc).__name__}: {exc})") from None


def _embed_upload(model, upload: UploadFile, limits: ServiceLimits) -> tuple[np.ndarray, str]:
    data = _read_upload(upload, limits)
    name = upload.filename or "upload"
    pixels = model.transform(_decode(model, data, name, limits))
    return model.encode_image_tensors(pixels.unsqueeze(0)), sniff(data[:132]) or "?"


def _check_texts(texts: list[str], limits: ServiceLimits) -> list[str]:
    if len(texts) > limits.max_texts:
        raise HTTPException(413, f"{len(texts)} texts exceed the limit of {limits.max_texts} per request")
    for text in texts:
        if not text.strip():
            raise HTTPException(400, "text must not be empty")
        if len(text) > limits.max_text_chars:
            raise HTTPException(413, f"text of {len(text)} characters exceeds {limits.max_text_chars}")
    return texts


def _check_zero_shot_request(task: str | None, labels: list[str] | None, prompts: list[str] | None,
                             head: str | None, limits: ServiceLimits) -> None:
    """Refuse over-long names, too many or too long labels and templates, and templates that are not
    plain ``{}`` templates: cheap checks, before anything is tokenized, decoded or encoded."""
    for what, name in (("task", task), ("head", head)):
        if name is not None and len(name) > limits.max_label_chars:
            raise HTTPException(413, f"a {what} name of {len(name)} characters exceeds the limit of "
                                     f"{limits.max_label_chars} characters (max_label_chars)")
    if labels:
        if len(labels) > limits.max_labels:
            raise HTTPException(413, f"{len(labels)} labels exceed the limit of {limits.max_labels} (max_labels)")
        for position, label in enumerate(labels):
            if len(label) > limits.max_label_chars:
                raise HTTPException(413, f"label {position} has {len(label)} characters, more than the limit of "
                                         f"{limits.max_label_chars} (max_label_chars)")
    if prompts:
        if len(prompts) > limits.max_prompts:
            raise HTTPException(413, f"{len(prompts)} prompt templates exceed the limit of {limits.max_prompts} "
                                     "(max_prompts)")
        for position, template in enumerate(prompts):
            if len(template) > limits.max_prompt_chars:
                raise HTTPException(413, f"prompt template {position} has {len(template)} characters, more than "
                                         f"the limit of {limits.max_prompt_chars} (max_prompt_chars)")
            try:
                template_fields(template)
            except TemplateError as exc:
                raise HTTPException(422, str(exc)) from None


def _split_values(values: list[str] | None) -> list[str] | None:
    """Form lists: repeated fields, or one comma-separated field."""
    if not values:
        return None
    if len(values) == 1 and "," in values[0]:
        values = values[0].split(",")
    return [value.strip() for value in values if value.strip()] or None


def _check_k(k: int, limits: ServiceLimits) -> int:
    if not 1 <= k <= limits.max_k:
        raise HTTPException(422, f"k must be between 1 and {limits.max_k}, got {k}")
    return k


def _readable_validation(exc: RequestValidationError) -> str:
    problems, about_file = [], False
    for error in exc.errors():
        location = [str(part) for part in error.get("loc", ()) if part != "body"]
        about_file = about_file or "file" in location
        problems.append(f"{'.'.join(location) or 'request'}: {error.get('msg', 'invalid')}")
    hint = (" Uploads go as multipart/form-data with the image in a field named 'file' (curl -F file=@scan.dcm ...)."
            if about_file else "")
    return "; ".join(problems) + "." + hint


def create_app(model, index: SearchIndex | None = None, heads: dict[str, ProbeHead] | None = None,
               limits: ServiceLimits | None = None, web: WebConfig | None = None, token: str | None = None,
               cors_origins: list[str] | tuple[str, ...] = ()) -> FastAPI:
    """The FastAPI application around a loaded :class:`~clip_med.inference.model.ClipMedModel`.

    ``token``: when set, every request needs it (:mod:`clip_med.inference.auth`); ``web``: the page and
    the archive's images; ``cors_origins``: origins CORS allows (none: CORS off).
    """
    limits, heads, web = limits or ServiceLimits(), dict(heads or {}), web or WebConfig()
    for head in heads.values():
        model.load_head(head)
    if index is not None:
        index.check_model(model.fingerprint, model.dim)
    app = FastAPI(title="clip_med", version="0.1.0",
                  description="Zero-shot and probe classification, embeddings and search with a clip_med model, "
                              "and browsing of the embedded archive (items, thumbnails, similar items)."
                              + (" Every request needs the access token (Authorization: Bearer <token>)."
                                 if token else ""))
    app.add_middleware(BodyLimit, max_bytes=limits.max_upload_bytes + MULTIPART_OVERHEAD)
    app.add_middleware(AccessGuard, token=token)
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "X-Clip-Med"])
    catalog = Catalog(index) if index is not None else None
    _add_error_handlers(app)
    _add_classification_routes(app, model, index, heads, limits, token)
    _add_series_routes(app, model, heads, limits)
    _add_embedding_routes(app, model, catalog, limits)
    _add_browse_routes(app, model, catalog, heads, limits, web, index)
    if web.enabled:
        _add_page_routes(app)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(BodyTooLarge)
    async def body_too_large(request: Request, exc: BodyTooLarge):
        return JSONResponse({"detail": str(exc)}, status_code=413)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        return JSONResponse({"detail": _readable_validation(exc)}, status_code=422)

    @app.exception_handler(ArchiveError)
    @app.exception_handler(BrowseError)
    async def archive_problem(request: Request, exc: ArchiveError | BrowseError):
        return JSONResponse({"detail": exc.message}, status_code=exc.status)


@contextlib.contextmanager
def _classification_errors() -> Iterator[None]:
    """A classification request's own mistakes as HTTP errors: too many prompts 413, bad labels, prompts,
    head or image 422 (the message says which)."""
    try:
        yield
    except PromptLimit as exc:
        raise HTTPException(413, str(exc)) from None
    except (ValueError, KeyError) as exc:
        raise HTTPException(422, str(exc).strip("'\"")) from None


def _checked_request(model, task: Optional[str], labels: Optional[list[str]], prompts: Optional[list[str]],
                     head: Optional[str], heads: dict[str, ProbeHead], limits: ServiceLimits):
    """(labels, prompts, the chosen head or None), with bad labels or prompts refused before anything is decoded."""
    labels, prompts = _split_values(labels), prompts or None
    _check_zero_shot_request(task, labels, prompts, head, limits)
    chosen = _resolve_head(head, heads)
    if chosen is None:
        model.zero_shot_classifier(task or "modality", labels, prompts, max_prompts=limits.max_prompt_texts)
    return labels, prompts, chosen


def _add_classification_routes(app: FastAPI, model, index: SearchIndex | None, heads: dict[str, ProbeHead],
                               limits: ServiceLimits, token: str | None = None) -> None:
    @app.get("/health", summary="Model, index and limits")
    def health() -> dict[str, Any]:
        return {"status": "ok", "model": model.name, "checkpoint": str(model.info.path), "step": model.info.step,
                "device": str(model.device), "dim": model.dim, "tasks": {task: model.task_labels(task)
                                                                          for task in taxonomy.TASKS},
                "heads": {name: {"task": head.task, "labels": head.labels} for name, head in heads.items()},
                "index": {"size": len(index)} if index is not None else None, "limits": dataclasses.asdict(limits),
                "auth": token is not None}

    @app.post("/classify", summary="Classify one uploaded image (PNG, JPEG or DICOM)")
    def classify(file: UploadFile = File(..., description="the image: PNG, JPEG, TIFF, WebP, BMP or DICOM"),
                 task: Optional[str] = Form(None, description="modality | anatomy | a name of your own with labels"),
                 labels: Optional[list[str]] = Form(None, description="your classes (repeat, or comma-separated)"),
                 prompts: Optional[list[str]] = Form(None, description="templates with one {} for the label"),
                 head: Optional[str] = Form(None, description=f"a loaded probe head: {', '.join(heads) or 'none'}"),
                 top: int = Form(3, ge=1, le=100)) -> dict[str, Any]:
        with _classification_errors():
            labels, prompts, chosen = _checked_request(model, task, labels, prompts, head, heads, limits)
            embedding, kind = _embed_upload(model, file, limits)
            task_name, names, probs, method = model.classify_embeddings(embedding, task, labels, prompts, chosen)
        order = np.argsort(-probs[0], kind="stable")[:top]
        return {"input": file.filename, "format": kind, "task": task_name, "method": method, "labels": names,
                "prediction": names[int(order[0])], "probabilities": dict(zip(names, map(float, probs[0]))),
                "top": [{"label": names[i], "probability": float(probs[0][i])} for i in order]}


ZIP_MAGIC = b"PK\x03\x04"


def _series_uploads(files: list[UploadFile], limits: ServiceLimits) -> tuple[list[tuple[str, bytes]], list[dict]]:
    """(name, bytes) of each image of a series request: the uploaded files, or the members of one zip
    upload (folders, hidden files and DICOMDIR left out; other files that are not images listed as skipped)."""
    if len(files) == 1 and files[0].file.read(4) == ZIP_MAGIC:
        files[0].file.seek(0)
        return _zip_members(files[0], limits)
    if files:
        files[0].file.seek(0)
    if len(files) > limits.max_series_images:
        raise HTTPException(413, f"{len(files)} images exceed the limit of {limits.max_series_images} per series "
                                 "(max_series_images)")
    return [(upload.filename or f"upload {index}", _read_upload(upload, limits)) for index, upload in
            enumerate(files)], []


def _zip_members(upload: UploadFile, limits: ServiceLimits) -> tuple[list[tuple[str, bytes]], list[dict]]:
    import zipfile

    data = upload.file.read(limits.max_upload_bytes + 1)
    if len(data) > limits.max_upload_bytes:
        raise HTTPException(413, f"upload {upload.filename!r} exceeds {limits.max_upload_bytes} bytes")
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = [info for info in archive.infolist() if not info.is_dir()]
    except zipfile.BadZipFile as exc:
        raise HTTPException(422, f"upload {upload.filename!r} is not a readable zip file ({exc})") from None
    images: list[tuple[str, bytes]] = []
    skipped: list[dict] = []
    total = 0
    for info in members:
        name = info.filename
        base = name.rsplit("/", 1)[-1]
        if not base or base.startswith(".") or name.startswith("__MACOSX/") or base.upper() == "DICOMDIR":
            continue
        if len(images) >= limits.max_series_images:
            raise HTTPException(413, f"the zip holds more than {limits.max_series_images} images (max_series_images)")
        try:
            with archive.open(info) as handle:  # read at most what is left of the budget: sizes in a zip can lie
                content = handle.read(min(limits.max_upload_bytes, limits.max_series_bytes - total) + 1)
        except (zipfile.BadZipFile, NotImplementedError, RuntimeError, OSError) as exc:
            raise HTTPException(422, f"zip member {name!r} cannot be read ({exc})") from None
        total += len(content)
        if len(content) > limits.max_upload_bytes or total > limits.max_series_bytes:
            raise HTTPException(413, f"the zip's images exceed {limits.max_series_bytes} bytes uncompressed "
                                     f"(max_series_bytes), or one exceeds {limits.max_upload_bytes} (max_upload_bytes)")
        if sniff(content[:132]) not in UPLOAD_FORMATS:
            skipped.append({"input": name, "reason": SkipReason.NOT_AN_IMAGE,
                            "detail": "not a PNG, JPEG, TIFF, WebP, BMP or DICOM image"})
            continue
        images.append((name, content))
    return images, skipped


def _add_series_routes(app: FastAPI, model, heads: dict[str, ProbeHead], limits: ServiceLimits) -> None:
    @app.post("/classify/series", summary="One prediction for a series or case: several images, or one zip of them")
    def classify_series(files: list[UploadFile] = File(..., description="the images of one series or case "
                                                       "(repeat the field), or one zip of them (a DICOM series)"),
                        task: Optional[str] = Form(None, description="modality | anatomy | your own with labels"),
                        labels: Optional[list[str]] = Form(None, description="your classes"),
                        prompts: Optional[list[str]] = Form(None, description="templates with one {} for the label"),
                        head: Optional[str] = Form(None, description="a loaded probe head"),
                        top: int = Form(3, ge=1, le=100)) -> dict[str, Any]:
        with _classification_errors():
            labels, prompts, chosen = _checked_request(model, task, labels, prompts, head, heads, limits)
            images, skipped = _series_uploads(files, limits)
            if not images:
                raise HTTPException(422, "the request holds no image (PNG, JPEG, TIFF, WebP, BMP or DICOM)")
            pixels = [model.transform(_decode(model, data, name, limits)) for name, data in images]
            embeddings = np.concatenate([model.encode_image_tensors(torch.stack(pixels[start:start + 32]))
                                         for start in range(0, len(pixels), 32)])
            task_name, names, pooled, per_image, method = model.classify_series_embeddings(embeddings, task, labels,
                                                                                           prompts, chosen)
        order = np.argsort(-pooled, kind="stable")[:top]
        return {"task": task_name, "method": method, "labels": names, "pooling": POOLING, "images": len(images),
                "prediction": names[int(order[0])], "probabilities": dict(zip(names, map(float, pooled))),
                "top": [{"label": names[i], "probability": float(pooled[i])} for i in order],
                "per_image": [{"input": name, "format": sniff(data[:132]), "prediction": names[int(row.argmax())],
                               "probabilities": dict(zip(names, map(float, row)))}
                              for (name, data), row in zip(images, per_image)],
                "skipped": skipped}


def _add_embedding_routes(app: FastAPI, model, catalog: Catalog | None, limits: ServiceLimits) -> None:
    @app.post("/embed", summary="L2-normalised embedding of an uploaded image or of texts")
    def embed(file: Optional[UploadFile] = File(None), text: Optional[list[str]] = Form(None)) -> dict[str, Any]:
        if (file is None) == (not text):
            raise HTTPException(400, "send exactly one of: an image in 'file', or one or more 'text' fields")
        if file is not None:
            vectors, kind = _embed_upload(model, file, limits)
        else:
            assert text is not None  # no file, so the check above saw texts
            vectors, kind = model.embed_texts(_check_texts(text, limits)), "text"
        return {"kind": "image" if kind != "text" else "text", "format": kind, "model": model.name, "dim": model.dim,
                "embeddings": vectors.tolist()}

    def _search(embed: Callable[[], np.ndarray], k: int, query: str, offset: int = 0,
                filters: dict[str, Optional[str]] | None = None) -> dict[str, Any]:
        # The index, k, offset and filters are checked before the query is embedded (embed() checks its own input).
        found = _need_catalog(catalog)
        k, offset, checked = _check_k(k, limits), _check_offset(offset, limits), _check_filters(filters, limits)
        found.allowed(checked)  # an unknown filter column is refused here, before any model work
        total, hits = found.search(embed(), k, offset, checked)
        return {"query": query, "index_size": len(found), "total": total, "offset": offset, "k": k,
                "filters": checked, "results": hits}

    @app.get("/search", summary="Text -> image search (filters and paging optional)")
    def search_text(text: str = Query(..., min_length=1), k: int = Query(10),
                    offset: int = Query(0, description="results to skip (paging)"),
                    modality: Optional[str] = Query(None, description=FILTER_HELP),
                    anatomy: Optional[str] = Query(None, description=FILTER_HELP),
                    split: Optional[str] = Query(None, description=FILTER_HELP),
                    source: Optional[str] = Query(None, description=FILTER_HELP)) -> dict[str, Any]:
        filters: dict[str, Optional[str]] = {"modality": modality, "anatomy": anatomy, "split": split,
                                              "source": source}
        return _search(lambda: model.embed_texts(_check_texts([text], limits)), k, text, offset, filters)

    @app.post("/search", summary="Text or image -> image search (an image in 'file', or a 'text' field)")
    def search_post(file: Optional[UploadFile] = File(None), text: Optional[str] = Form(None),
                    k: int = Form(10), offset: int = Form(0, description="results to skip (paging)"),
                    modality: Optional[str] = Form(None, description=FILTER_HELP),
                    anatomy: Optional[str] = Form(None, description=FILTER_HELP),
                    split: Optional[str] = Form(None, description=FILTER_HELP),
                    source: Optional[str] = Form(None, description=FILTER_HELP)) -> dict[str, Any]:
        if (file is None) == (text is None):
            raise HTTPException(400, "send exactly one of: an image in 'file', or a 'text' field")
        filters: dict[str, Optional[str]] = {"modality": modality, "anatomy": anatomy, "split": split, "source": source}
        if file is not None:
            upload: UploadFile = file
            return _search(lambda: _embed_upload(model, upload, limits)[0], k, f"image {upload.filename}", offset,
                           filters)
        assert text is not None  # exactly one of file and text, checked above
        return _search(lambda: model.embed_texts(_check_texts([text], limits)), k, text, offset, filters)


FILTER_HELP = "keep only rows with exactly this value (compared with the table, never used as a path)"


def _need_catalog(catalog: Catalog | None) -> Catalog:
    if catalog is None:
        raise HTTPException(404, "no search index is loaded: start the service with index=<embedding folder>")
    return catalog


def _check_offset(offset: int, limits: ServiceLimits) -> int:
    if not 0 <= offset <= limits.max_offset:
        raise HTTPException(422, f"offset must be between 0 and {limits.max_offset}, got {offset}")
    return offset


def _check_filters(filters: dict[str, Optional[str]] | None, limits: ServiceLimits) -> dict[str, str]:
    checked: dict[str, str] = {}
    for name, value in (filters or {}).items():
        if name not in FILTERS:
            raise HTTPException(422, f"unknown filter {name!r}; filters: {', '.join(FILTERS)}")
        if value is None or value == "":
            continue
        if len(value) > limits.max_label_chars:
            raise HTTPException(413, f"the {name} filter has {len(value)} characters, more than the limit of "
                                     f"{limits.max_label_chars} (max_label_chars)")
        checked[name] = value
    return checked


def _add_browse_routes(app: FastAPI, model, catalog: Catalog | None, heads: dict[str, ProbeHead],
                       limits: ServiceLimits, web: WebConfig, index: Any) -> None:
    archive = None
    if index is not None:
        archive = ShardArchive(getattr(index, "folder", None), getattr(index, "info", None),
                               ImageLimits(max_pixels=limits.max_pixels), web.shard_cache)
    thumbnails = BytesCache(web.thumbnail_cache_items, web.thumbnail_cache_bytes)
    images = BytesCache(web.image_cache_items, web.image_cache_bytes)

    def item_id() -> Any:
        return Path(..., ge=0, description="the row's position in the index (a search hit's 'position')")

    def _row(position: int) -> dict[str, Any]:
        return _need_catalog(catalog).raw_row(position)

    def _picture(position: int, cache: BytesCache, side: int, image_format: str) -> Response:
        row = _row(position)
        assert archive is not None  # a catalog means an index, and with it an archive
        shard, key = str(row.get("shard") or ""), str(row.get("key") or "")
        archive.locate(shard)  # a shard that moved or changed is refused even when its picture is cached
        data = cache.get_or_make((position, side, image_format),
                                 lambda: encode(archive.image(shard, key), side, image_format))
        return Response(data, media_type=MEDIA_TYPES[image_format], headers={"cache-control": "private, max-age=3600"})

    @app.get("/facets", summary="The filter values of the index, with their row counts")
    def facets() -> dict[str, Any]:
        found = _need_catalog(catalog)
        return {"index_size": len(found), "filters": found.facets()}

    @app.get("/items/{item_id}", summary="One archive item: every metadata column of its row")
    def item(item_id: int = item_id()) -> dict[str, Any]:
        row = _need_catalog(catalog).row(item_id)
        return {**row, "thumbnail": f"/items/{item_id}/thumbnail", "image": f"/items/{item_id}/image",
                "similar": f"/items/{item_id}/similar"}

    @app.get("/items/{item_id}/thumbnail", summary="The item's image from its shard, shrunk (JPEG)",
             response_class=Response, responses={200: {"content": {"image/jpeg": {}}},
                                                 410: {"description": "the shard moved or changed since embedding"}})
    def thumbnail(item_id: int = item_id()) -> Response:
        return _picture(item_id, thumbnails, web.thumbnail_side, "JPEG")

    @app.get("/items/{item_id}/image", summary="The item's image from its shard (PNG, at most web.image_max_side)",
             response_class=Response, responses={200: {"content": {"image/png": {}}},
                                                 410: {"description": "the shard moved or changed since embedding"}})
    def image(item_id: int = item_id()) -> Response:
        return _picture(item_id, images, web.image_max_side, "PNG")

    @app.get("/items/{item_id}/similar", summary="More like this: image -> image search from an archive item")
    def similar(item_id: int = item_id(), k: int = Query(10), offset: int = Query(0),
                modality: Optional[str] = Query(None, description=FILTER_HELP),
                anatomy: Optional[str] = Query(None, description=FILTER_HELP),
                split: Optional[str] = Query(None, description=FILTER_HELP),
                source: Optional[str] = Query(None, description=FILTER_HELP)) -> dict[str, Any]:
        found = _need_catalog(catalog)
        k, offset = _check_k(k, limits), _check_offset(offset, limits)
        filters = _check_filters({"modality": modality, "anatomy": anatomy, "split": split, "source": source},
                                 limits)
        total, hits = found.similar(found.check_position(item_id), k, offset, filters)
        return {"query": f"item {item_id}", "item": item_id, "index_size": len(found), "total": total,
                "offset": offset, "k": k, "filters": filters, "results": hits}

    @app.post("/analyze", summary="Classify an upload with zero-shot and every loaded head, and find its neighbours")
    def analyze(file: UploadFile = File(..., description="the image: PNG, JPEG, TIFF, WebP, BMP or DICOM"),
                k: int = Form(12), modality: Optional[str] = Form(None, description=FILTER_HELP),
                anatomy: Optional[str] = Form(None, description=FILTER_HELP),
                split: Optional[str] = Form(None, description=FILTER_HELP),
                source: Optional[str] = Form(None, description=FILTER_HELP)) -> dict[str, Any]:
        k = _check_k(k, limits)
        filters = _check_filters({"modality": modality, "anatomy": anatomy, "split": split, "source": source},
                                 limits)
        if catalog is not None:
            catalog.allowed(filters)
        embedding, kind = _embed_upload(model, file, limits)
        results = []
        for name, head in [*((task, None) for task in taxonomy.TASKS), *heads.items()]:
            task, labels, probs, method = model.classify_embeddings(embedding, None if head else name, head=head)
            order = np.argsort(-probs[0], kind="stable")
            results.append({"name": name if head is None else f"head {name}", "task": task, "method": method,
                            "prediction": labels[int(order[0])],
                            "probabilities": [{"label": labels[i], "probability": float(probs[0][i])}
                                              for i in order]})
        neighbours = None
        if catalog is not None:
            total, hits = catalog.search(embedding, k, 0, filters)
            neighbours = {"index_size": len(catalog), "total": total, "offset": 0, "k": k, "filters": filters,
                          "results": hits}
        return {"input": file.filename, "format": kind, "classifications": results, "neighbours": neighbours}


WEB_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
             "app.css": "text/css; charset=utf-8"}


def _web_files() -> dict[str, bytes]:
    folder = resources.files("clip_med.inference") / "web"
    return {name: (folder / name).read_bytes() for name in WEB_FILES}


def _add_page_routes(app: FastAPI) -> None:
    files = _web_files()  # read once; a request only ever picks one of these by its exact name

    @app.get("/", include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse(files["index.html"], headers={"cache-control": "no-cache"})

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        if name not in files:
            raise HTTPException(404, "no such page file")
        return Response(files[name], media_type=WEB_FILES[name], headers={"cache-control": "no-cache"})


def _resolve_head(name: str | None, heads: dict[str, ProbeHead]) -> ProbeHead | None:
    if not name:
        return None
    if name not in heads:
        raise HTTPException(422, f"no probe head named {name!r}; loaded heads: {', '.join(heads) or 'none'} "
                                 "(start the service with +heads.<name>=<file>)")
    return heads[name]


def build_service(cfg: ServeConfig) -> FastAPI:
    token = resolve_token(cfg.auth)
    check_bind(cfg.host, token)  # before the model is loaded: a refusal is immediate
    model = load_model(cfg)
    try:
        heads = {name: ProbeHead.load(path) for name, path in cfg.heads.items()}
        index = SearchIndex.open(cfg.index) if cfg.index else None
    except (HeadError, IndexFolderError) as exc:
        raise ValueError(f"cannot start the service: {exc}") from None
    return create_app(model, index, heads, cfg.limits, cfg.web, token, cfg.cors_origins)
