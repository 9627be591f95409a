"""`contrastive serve`: an index directory behind a JSON API (FastAPI) and a search page, for a browser.

    POST /search      text, image (upload or base64) or an indexed image's key, minus/plus texts with weights,
                      k, modality image|text -> ranked hits (key, score, caption, image URL, attributes),
                      ranked by eval/search.py's encode_query and rank, as `contrastive search` ranks them
    GET  /image/KEY   the image's bytes, read from its shard at the offset `contrastive index` recorded
    GET  /health      liveness;  GET /info: model, number of vectors, index type, limits
    GET  /            the page (eval/web/: plain HTML, JS and CSS)

Every mistake a client can make is answered with a 4xx and one line of JSON, {"error": "..."}; the service
goes on serving. The model and the index are loaded once, when the app is made.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import io
import ipaddress
import json
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Union
from urllib.parse import quote, unquote

from fastapi import Request  # at module level: FastAPI resolves the handlers' string annotations here
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from contrastive.errors import UserError

WEB_DIR = Path(__file__).resolve().parent / "web"
TOKEN_COOKIE = "contrastive_token"  # the page sets it, so that <img> requests carry the token too


@dataclass
class Limits:
    """What one request may ask for (stated in /info and in each error that enforces them)."""

    max_k: int = 100
    max_upload_bytes: int = 10 * 2**20
    max_image_pixels: int = 40_000_000  # a small file can still decode to gigabytes (a "decompression bomb")
    max_terms: int = 16
    max_text_chars: int = 1000

    @property
    def max_body_bytes(self) -> int:
        """A request body: the image as base64 (4/3 of its bytes) plus room for the rest of the query."""
        return self.max_upload_bytes * 4 // 3 + 2**16


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class Term(BaseModel):
    """One plus or minus text; its weight multiplies its embedding. A plain string is a term of weight 1."""

    model_config = ConfigDict(extra="forbid")
    text: str
    weight: float = Field(default=1.0, ge=-10, le=10, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value):
        return {"text": value} if isinstance(value, str) else value


class SearchRequest(BaseModel):
    """The query: compose_query (eval/search.py) says how the parts add up."""

    model_config = ConfigDict(extra="forbid")
    text: Union[str, list[str], None] = None
    image: Union[str, None] = None  # base64, or a data: URL
    image_key: Union[str, None] = None  # the key of an indexed image: its stored embedding is the query image
    minus: list[Term] = []
    plus: list[Term] = []
    weight: float = Field(default=1.0, ge=-10, le=10, allow_inf_nan=False)
    k: int = 10
    modality: Literal["image", "text"] = "image"


def _one_line(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "query"
    more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return f"{where}: {first['msg']}{more}"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


class SearchService:
    """The loaded index and model, and the query logic the endpoints share (no HTTP in here)."""

    def __init__(self, index_dir: str | Path, *, model: str | None = None, limits: Limits | None = None,
                 concurrent_queries: int = 1, threads_per_query: int | None = None):
        from contrastive.loading import load_for_inference
        from contrastive.eval.image_store import ImageStore
        from contrastive.eval.index import move_to_gpu
        from contrastive.eval.search import Gallery

        self.limits = limits or Limits()
        self.gallery = Gallery(index_dir)
        self.model_path = model or self.gallery.params.extra.get("model")
        if not self.model_path:
            raise UserError(f"{self.gallery.dir}/index.json names no model; pass --model")
        if not Path(self.model_path).exists():
            raise UserError(f"the model {self.model_path} does not exist (named in {self.gallery.dir}/index.json); "
                            f"pass --model")
        self.bundle, self.model_info = load_for_inference(self.model_path)
        move_to_gpu(self.bundle)
        self.gallery.check_model(self.bundle.model)
        self.images = ImageStore(self.gallery.dir, self.gallery.params.count)
        indexes = [self.gallery.index]
        if self.gallery.has_text_index:
            indexes.append(self.gallery.text_index)  # loaded now, not in the first caption query
        # create_app runs queries on this many threads (torch and faiss release the GIL while they work), and
        # `contrastive serve` gives each query one thread of its own (see run_cli).
        self.concurrent_queries = concurrent_queries
        # faiss's GPU indexes must not be searched from two threads at once (its CPU indexes may); no CPU test
        # reaches this branch: it follows faiss's documentation.
        on_gpu = any("Gpu" in type(index).__name__ for index in indexes)
        self._search_lock = threading.Lock() if on_gpu else contextlib.nullcontext()
        self._threads_per_query = threads_per_query
        self._thread_configured = threading.local()
        # Metadata as plain lists: a hit's record in microseconds (a pandas row lookup costs ~0.1 ms).
        meta = self.gallery.metadata
        self._captions = meta["caption"].tolist() if "caption" in meta.columns else [None] * len(meta)
        self._attributes = {c: meta[c].tolist() for c in meta.columns if c not in ("image_path", "caption")}

    def info(self) -> dict:
        p = self.gallery.params
        text = None
        if self.gallery.has_text_index:
            text = {k: p.extra.get("text_index", {}).get(k) for k in ("type", "factory", "nprobe")}
        return {"model": str(self.model_path), "model_step": self.model_info.get("step"),
                "num_vectors": p.count, "dim": p.dim,
                "index": {"type": p.type, "factory": p.factory, "nprobe": p.nprobe,
                          "measured_recall": p.measured_recall},
                "text_index": text, "images_with_location": int(self.images.available and
                                                                (self.images.offsets >= 0).sum()),
                "limits": {"max_k": self.limits.max_k, "max_upload_bytes": self.limits.max_upload_bytes,
                           "max_terms": self.limits.max_terms}}

    def decode_image(self, data: bytes):
        """A PIL RGB image of uploaded bytes (as eval/search.py's read_image converts a file), or an ApiError."""
        from PIL import Image, UnidentifiedImageError

        if len(data) > self.limits.max_upload_bytes:
            raise ApiError(413, f"the image is {len(data)} bytes; the limit is {self.limits.max_upload_bytes}")
        if not data:
            raise ApiError(400, "the image upload is empty")
        try:
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                if width * height > self.limits.max_image_pixels:
                    raise ApiError(413, f"the image is {width}x{height} pixels; the limit is "
                                        f"{self.limits.max_image_pixels} pixels")
                return img.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
            raise ApiError(415, f"the upload is not an image this service can read ({type(e).__name__})") from None

    def search(self, request: SearchRequest, image_bytes: bytes | None = None) -> dict:
        """Rank a validated query; every client mistake is an ApiError."""
        import numpy as np

        from contrastive.eval.search import encode_query, rank

        lim = self.limits
        if not 1 <= request.k <= lim.max_k:
            raise ApiError(400, f"k must be between 1 and {lim.max_k}, got {request.k}")
        texts = [request.text] if isinstance(request.text, str) else list(request.text or [])
        texts = [t for t in texts if t.strip()]
        plus, minus = [t for t in request.plus if t.text.strip()], [t for t in request.minus if t.text.strip()]
        for name, group in (("text", texts), ("plus", plus), ("minus", minus)):
            if len(group) > lim.max_terms:
                raise ApiError(400, f"{name}: at most {lim.max_terms} texts, got {len(group)}")
        too_long = [t for t in texts + [t.text for t in plus + minus] if len(t) > lim.max_text_chars]
        if too_long:
            raise ApiError(400, f"a text is {len(too_long[0])} characters; the limit is {lim.max_text_chars}")
        if request.image is not None and image_bytes is not None:
            raise ApiError(400, "give the image once: as an upload or as base64, not both")
        if request.image:
            image_bytes = _from_base64(request.image)
        if image_bytes is not None and request.image_key:
            raise ApiError(400, "give an image or an image_key, not both")
        if not (texts or plus or minus or image_bytes is not None or request.image_key):
            raise ApiError(400, "empty query: give text, an image, an image_key, or plus/minus texts")
        if request.modality == "text" and not self.gallery.has_text_index:
            raise ApiError(400, "this index has no caption index (build it with `contrastive index --text`)")
        image = self.decode_image(image_bytes) if image_bytes is not None else None
        exclude_row, image_D = None, None
        if request.image_key:
            exclude_row = self.gallery.row_of(request.image_key)
            if exclude_row is None:
                raise ApiError(404, f"no indexed image has the key {request.image_key!r}")
            image_D = self.gallery.embedding_rows([exclude_row])[0]
        start = time.perf_counter()
        self._configure_thread()
        try:
            query_D, image_D = encode_query(
                self.bundle, dim=self.gallery.params.dim, texts=texts, plus=[t.text for t in plus],
                minus=[t.text for t in minus], image=image, image_D=image_D, weight=request.weight,
                plus_weights=np.array([t.weight for t in plus]), minus_weights=np.array([t.weight for t in minus]))
        except UserError as e:  # the plus and minus texts cancel out
            raise ApiError(400, str(e)) from None
        with self._search_lock:
            hits, excluded = rank(self.gallery, query_D, k=request.k, modality=request.modality, image_D=image_D,
                                  exclude_row=exclude_row)
        return {"modality": request.modality, "results": [self.hit(i + 1, row, score) for i, (row, score)
                                                          in enumerate(hits)],
                "excluded_as_query_image": excluded, "took_ms": round(1000 * (time.perf_counter() - start), 2)}

    def _configure_thread(self) -> None:
        """Set this thread's torch and faiss thread counts: OpenMP keeps them per calling thread, so a count
        set in the main thread does not reach the server's worker threads (faiss ran on 2 there)."""
        if self._threads_per_query is None or getattr(self._thread_configured, "done", False):
            return
        import faiss
        import torch

        torch.set_num_threads(self._threads_per_query)
        faiss.omp_set_num_threads(self._threads_per_query)
        self._thread_configured.done = True

    def hit(self, rank_: int, row: int, score: float) -> dict:
        key = self.gallery.keys[row]
        attributes = {}
        for name, column in self._attributes.items():
            value = column[row]
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                attributes[name] = value.item() if hasattr(value, "item") else value
        return {"rank": rank_, "key": key, "score": score, "caption": self._captions[row],
                "image_url": f"image/{quote(key, safe='/')}" if self.images.locate(row) else None,
                "attributes": attributes}


def _from_base64(text: str) -> bytes:
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "image: not valid base64 (send the file as a multipart upload or base64 text)") from None


def create_app(service: SearchService, *, token: str | None = None):
    """The ASGI app around a loaded SearchService; with `token`, every endpoint but / and /health needs it
    (Authorization: Bearer TOKEN, or the page's cookie)."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, Response
    from fastapi.staticfiles import StaticFiles
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    app = FastAPI(title="contrastive search", docs_url=None, redoc_url=None, openapi_url=None)
    lim = service.limits
    # Queries wait in this pool's FIFO queue and run on `concurrent_queries` threads. On a thread per request
    # (anyio's pool of 40) 16 clients' queries contend for the GIL each time torch hands it back, and on 2
    # cores text queries at 16 clients had a p99 4x their p50.
    queries = ThreadPoolExecutor(max_workers=service.concurrent_queries, thread_name_prefix="query")

    def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return error(exc.status, exc.message, headers)

    @app.exception_handler(HTTPException)
    async def _http_error(request, exc: HTTPException):  # unknown routes, wrong methods, multipart errors
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        first = exc.errors()[0]
        return error(422, f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}")

    @app.exception_handler(Exception)
    async def _internal_error(request, exc: Exception):
        return error(500, f"internal error ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")

    def authorize(request: Request) -> None:
        if token is None:
            return
        given = request.headers.get("authorization", "")
        given = given[7:] if given.lower().startswith("bearer ") else unquote(request.cookies.get(TOKEN_COOKIE, ""))
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise ApiError(401, "this service needs a token: send Authorization: Bearer TOKEN")

    async def read_body(request: Request) -> bytes:
        """The body, refused (413) as soon as it passes the limit, without reading the rest."""
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > lim.max_body_bytes:
            raise ApiError(413, f"the request is {declared} bytes; the limit is {lim.max_body_bytes} "
                                f"(images up to {lim.max_upload_bytes} bytes)")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > lim.max_body_bytes:
                raise ApiError(413, f"the request passes the limit of {lim.max_body_bytes} bytes "
                                    f"(images up to {lim.max_upload_bytes} bytes)")
            chunks.append(chunk)
        return b"".join(chunks)

    def parse_query(raw) -> SearchRequest:
        try:
            query = json.loads(raw) if isinstance(raw, (str, bytes)) else raw
        except ValueError as e:
            raise ApiError(400, f"malformed JSON: {e}") from None
        if not isinstance(query, dict):
            raise ApiError(400, "the query must be a JSON object")
        try:
            return SearchRequest.model_validate(query)
        except ValidationError as e:
            raise ApiError(422, _one_line(e)) from None

    @app.post("/search")
    async def search(request: Request):
        authorize(request)
        body = await read_body(request)
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        image_bytes = None
        if content_type == "multipart/form-data":
            request._body = body  # parse the body already read (and size-checked) above
            form = await request.form(max_files=1, max_fields=8, max_part_size=lim.max_body_bytes)
            unknown = set(form.keys()) - {"query", "image"}
            if unknown:
                raise ApiError(400, f"unknown form field {sorted(unknown)[0]!r}; send 'query' (JSON) and 'image'")
            upload = form.get("image")
            if upload is not None and not isinstance(upload, str):
                image_bytes = await upload.read()
            query = parse_query(form.get("query") or "{}")
        elif content_type in ("application/json", ""):
            query = parse_query(body)
        else:
            raise ApiError(415, f"send application/json or multipart/form-data, not {content_type}")
        return await asyncio.get_running_loop().run_in_executor(queries, service.search, query, image_bytes)

    @app.get("/image/{key:path}")
    async def image(key: str, request: Request):
        authorize(request)
        row = service.gallery.row_of(key)
        if row is None:
            raise ApiError(404, f"no indexed image has the key {key!r}")
        found = await run_in_threadpool(service.images.read, row)
        if found is None:
            raise ApiError(404, f"the image of {key!r} cannot be read: this index records no location for it, "
                                f"or its shard has changed since indexing (rebuild with `contrastive index`)")
        data, media_type, etag = found
        headers = {"ETag": etag, "Cache-Control": "private, max-age=3600"}
        if etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
            return Response(status_code=304, headers=headers)
        return Response(data, media_type=media_type, headers=headers)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/info")
    async def info(request: Request):
        authorize(request)
        return service.info()

    @app.get("/")
    async def page():
        return FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")
    return app


def run_cli(args) -> None:
    """`contrastive serve`: load once, warn about a non-loopback address, serve until interrupted."""
    import os
    import sys

    import uvicorn

    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be in 0..65535, got {args.port}")
    if args.max_k <= 0 or args.max_upload_mb <= 0:
        raise UserError("--max-k and --max-upload-mb must be > 0")
    token = args.token or os.environ.get("CONTRASTIVE_TOKEN") or None
    limits = Limits(max_k=args.max_k, max_upload_bytes=int(args.max_upload_mb * 2**20))
    if args.concurrent_queries <= 0:
        raise UserError(f"--concurrent-queries must be > 0, got {args.concurrent_queries}")
    # One thread per query, several queries at once: one query is too small to split over cores, and torch's
    # and faiss's thread teams waiting on each other (and on the HTTP side) cost 10-100x on a busy machine
    # (2 cores: one text embedding 0.8 ms on one thread, 92 ms on two while other work ran).
    service = SearchService(args.index, model=args.model, limits=limits, concurrent_queries=args.concurrent_queries,
                            threads_per_query=1)
    app = create_app(service, token=token)
    if not is_loopback(args.host):
        print(f"warning: serving on {args.host}, not a loopback address: other machines can reach this service"
              + ("" if token else "; anyone who can reach it can search the index and read its images "
                                  "(set --token)"), file=sys.stderr)
    info = service.info()
    print(f"serving {info['num_vectors']} vectors ({info['index']['factory']}"
          f"{', captions too' if info['text_index'] else ''}) with the model {info['model']} "
          f"on http://{args.host}:{args.port}/" + (" (token required)" if token else ""), flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
