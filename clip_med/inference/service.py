"""The HTTP service (FastAPI): classify, embed and search with one loaded model.

Endpoints: ``POST /classify``, ``POST /embed``, ``GET|POST /search``, ``GET /health``; the OpenAPI
schema is at ``/openapi.json`` and interactive docs at ``/docs``.

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

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image

from clip_med.core.bounds import bounded
from clip_med.core.templates import TemplateError, template_fields
from clip_med.data.images import ImageLimits, ImageRejected
from clip_med.data.record import SkipReason
from clip_med.eval.probe_head import HeadError, ProbeHead
from clip_med.eval.zero_shot import PromptLimit
from clip_med.inference.evaluation import ModelOptions
from clip_med.inference.index import IndexFolderError, SearchIndex
from clip_med.inference.inputs import load_image, sniff
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


@dataclass
class ServeConfig(ModelOptions):
    index: Optional[str] = None  # an embedding folder from python -m clip_med.embed (enables /search)
    heads: dict[str, str] = field(default_factory=dict)  # name -> probe head file, used as /classify head=<name>
    host: str = "127.0.0.1"
    port: int = 8000
    limits: ServiceLimits = field(default_factory=ServiceLimits)
    log_level: str = "info"


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
        log.warning("upload %s could not be decoded: %s: %s", name, type(exc).__name__, exc)
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
               limits: ServiceLimits | None = None) -> FastAPI:
    """The FastAPI application around a loaded :class:`~clip_med.inference.model.ClipMedModel`."""
    limits, heads = limits or ServiceLimits(), dict(heads or {})
    for head in heads.values():
        model.load_head(head)
    if index is not None:
        index.check_model(model.fingerprint, model.dim)
    app = FastAPI(title="clip_med", version="0.1.0",
                  description="Zero-shot and probe classification, embeddings and search with a clip_med model.")
    app.add_middleware(BodyLimit, max_bytes=limits.max_upload_bytes + MULTIPART_OVERHEAD)
    _add_error_handlers(app)
    _add_classification_routes(app, model, index, heads, limits)
    _add_embedding_routes(app, model, index, limits)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(BodyTooLarge)
    async def body_too_large(request: Request, exc: BodyTooLarge):
        return JSONResponse({"detail": str(exc)}, status_code=413)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        return JSONResponse({"detail": _readable_validation(exc)}, status_code=422)


def _add_classification_routes(app: FastAPI, model, index: SearchIndex | None, heads: dict[str, ProbeHead],
                               limits: ServiceLimits) -> None:
    @app.get("/health", summary="Model, index and limits")
    def health() -> dict[str, Any]:
        return {"status": "ok", "model": model.name, "checkpoint": str(model.info.path), "step": model.info.step,
                "device": str(model.device), "dim": model.dim, "tasks": {task: model.task_labels(task)
                                                                          for task in taxonomy.TASKS},
                "heads": {name: {"task": head.task, "labels": head.labels} for name, head in heads.items()},
                "index": {"size": len(index)} if index is not None else None, "limits": dataclasses.asdict(limits)}

    @app.post("/classify", summary="Classify one uploaded image (PNG, JPEG or DICOM)")
    def classify(file: UploadFile = File(..., description="the image: PNG, JPEG, TIFF, WebP, BMP or DICOM"),
                 task: Optional[str] = Form(None, description="modality | anatomy | a name of your own with labels"),
                 labels: Optional[list[str]] = Form(None, description="your classes (repeat, or comma-separated)"),
                 prompts: Optional[list[str]] = Form(None, description="templates with one {} for the label"),
                 head: Optional[str] = Form(None, description=f"a loaded probe head: {', '.join(heads) or 'none'}"),
                 top: int = Form(3, ge=1, le=100)) -> dict[str, Any]:
        labels, prompts = _split_values(labels), prompts or None
        _check_zero_shot_request(task, labels, prompts, head, limits)
        chosen = _resolve_head(head, heads)
        try:
            if chosen is None:  # refuse bad labels or prompts before decoding anything
                model.zero_shot_classifier(task or "modality", labels, prompts, max_prompts=limits.max_prompt_texts)
            embedding, kind = _embed_upload(model, file, limits)
            task_name, names, probs, method = model.classify_embeddings(embedding, task, labels, prompts, chosen)
        except PromptLimit as exc:
            raise HTTPException(413, str(exc)) from None
        except (ValueError, KeyError) as exc:
            raise HTTPException(422, str(exc).strip("'\"")) from None
        order = np.argsort(-probs[0], kind="stable")[:top]
        return {"input": file.filename, "format": kind, "task": task_name, "method": method, "labels": names,
                "prediction": names[int(order[0])], "probabilities": dict(zip(names, map(float, probs[0]))),
                "top": [{"label": names[i], "probability": float(probs[0][i])} for i in order]}


def _add_embedding_routes(app: FastAPI, model, index: SearchIndex | None, limits: ServiceLimits) -> None:
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

    def _search(embed: Callable[[], np.ndarray], k: int, query: str) -> dict[str, Any]:
        # The index and k are checked before the query is embedded (embed() checks its own input first).
        if index is None:
            raise HTTPException(404, "no search index is loaded: start the service with index=<embedding folder>")
        k = _check_k(k, limits)
        hits = index.search(embed(), k)[0]
        return {"query": query, "index_size": len(index), "results": [hit.to_dict() for hit in hits]}

    @app.get("/search", summary="Text -> image search")
    def search_text(text: str = Query(..., min_length=1), k: int = Query(10)) -> dict[str, Any]:
        return _search(lambda: model.embed_texts(_check_texts([text], limits)), k, text)

    @app.post("/search", summary="Text or image -> image search (an image in 'file', or a 'text' field)")
    def search_post(file: Optional[UploadFile] = File(None), text: Optional[str] = Form(None),
                    k: int = Form(10)) -> dict[str, Any]:
        if (file is None) == (text is None):
            raise HTTPException(400, "send exactly one of: an image in 'file', or a 'text' field")
        if file is not None:
            upload: UploadFile = file
            return _search(lambda: _embed_upload(model, upload, limits)[0], k, f"image {upload.filename}")
        assert text is not None  # exactly one of file and text, checked above
        return _search(lambda: model.embed_texts(_check_texts([text], limits)), k, text)


def _resolve_head(name: str | None, heads: dict[str, ProbeHead]) -> ProbeHead | None:
    if not name:
        return None
    if name not in heads:
        raise HTTPException(422, f"no probe head named {name!r}; loaded heads: {', '.join(heads) or 'none'} "
                                 "(start the service with +heads.<name>=<file>)")
    return heads[name]


def build_service(cfg: ServeConfig) -> FastAPI:
    from clip_med.inference.model import load

    model = load(cfg.checkpoint, cfg.model_name, cfg.device)
    try:
        heads = {name: ProbeHead.load(path) for name, path in cfg.heads.items()}
        index = SearchIndex.open(cfg.index) if cfg.index else None
    except (HeadError, IndexFolderError) as exc:
        raise ValueError(f"cannot start the service: {exc}") from None
    return create_app(model, index, heads, cfg.limits)
