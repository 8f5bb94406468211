"""A fitted run behind HTTP: the FastAPI app of ``pipeline.py serve``.

The app loads the run once into a :class:`~flow.deploy.predict.Predictor` (the code behind ``predict``: backbone,
preprocessing, feature transform, detector and calibration, or the ONNX graph of ``export``), warms it with one
forward pass, and only then reports ready. Endpoints:

- ``POST /predict``: one or more images as multipart form files (field ``files``) -> ``{"alpha", "threshold",
  "items": [...]}``, one item per file with the fields of a ``predict`` CSV row (``file`` for the upload's name,
  ``score``, every score of the method, ``p_value``, ``anomalous``, ``error``).
- ``GET /health``: ``{"ready": true, ...}`` (200) once the run is loaded and warm, with the requests, images and
  forwards (gathered batches) served so far; ``{"ready": false}`` (503) before.
- ``GET /model``: what the run is (backbone and weights, features, method, normal class, calibration rows, alpha,
  when it was fitted) and the histogram of its held-out normal scores, which the page draws.
- ``GET /``: a small page (static HTML and JavaScript) to drop images on and see their scores and decisions.
- ``GET /docs``: FastAPI's OpenAPI page.

Concurrent requests are gathered by a :class:`MicroBatcher` into one backbone forward (up to ``max_batch`` images,
waiting at most ``max_wait_ms`` after the first). Uploads are decoded in memory (no temporary file of ours) by the
image reader of ``predict`` (:func:`extract.datasets.images.read_image`), with PIL's decompression-bomb warning
raised as an error; one that is not an image, is truncated, is larger than ``max_upload_mb`` or is a bomb fails the
request with a 4xx JSON error naming the file and the reason, and the server goes on serving. With a ``token``,
``/predict`` and ``/model`` need ``Authorization: Bearer <token>`` (401 without it); ``/health`` and the page do not.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import io
import math
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse
from PIL import Image
from starlette.datastructures import UploadFile as StarletteUpload

from extract.datasets.images import ImageReadError, read_image
from flow.deploy.predict import Predictor
from flow.detectors.calibration import DEFAULT_ALPHA, check_alpha

STATIC = Path(__file__).with_name("static")
MIB = 1024 * 1024


#: the largest --max-upload-mb (MiB per file)
MAX_UPLOAD_MB = 4096


@dataclass(frozen=True)
class ServeConfig:
    """How :func:`create_app` serves a run.

    Attributes:
        alpha: the significance level of the decisions (a calibrated run), in (0, 1).
        max_batch: the most images gathered into one backbone forward.
        max_wait_ms: how long the first request of a batch waits for others.
        max_upload_mb: the largest upload accepted, per file, in MiB.
        max_files: the most files in one request.
        max_pixels: the most pixels of one decoded image (a smaller cap than PIL's decompression-bomb limit: a
            decoded image is held until its batch runs).
        max_request_pixels: the most pixels of the decoded images of one request.
        token: the bearer token ``/predict`` and ``/model`` require (None: none): printable ASCII without spaces at
            either end (HTTP header values can carry nothing else).

    Raises:
        ValueError: a value out of range, named with what is allowed.
    """

    alpha: float = DEFAULT_ALPHA
    max_batch: int = 32
    max_wait_ms: float = 10.0
    max_upload_mb: float = 20.0
    max_files: int = 64
    max_pixels: int = 40_000_000
    max_request_pixels: int = 160_000_000
    token: str | None = None

    def __post_init__(self) -> None:
        check_alpha(self.alpha)
        for name, low, high in (("max_batch", 1, 4096), ("max_files", 1, 4096), ("max_pixels", 1, 2**40),
                                ("max_request_pixels", 1, 2**42)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer in {low}..{high}; got {value!r}")
        for name in ("max_wait_ms", "max_upload_mb"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0 and name == "max_upload_mb" or value < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number > 0; got {value!r}")
        if self.max_upload_mb > MAX_UPLOAD_MB:  # its bytes are counted in integers: 1e308 MiB does not fit
            raise ValueError(f"--max-upload-mb must be at most {MAX_UPLOAD_MB} (MiB per file); got "
                             f"{self.max_upload_mb!r}")
        if self.token is not None:
            if not self.token.strip():
                raise ValueError("--token must not be empty")
            if self.token != self.token.strip() or not self.token.isascii() or not self.token.isprintable():
                raise ValueError("--token must be printable ASCII without spaces at either end (what an HTTP "
                                 "header carries); got a token with other characters")


class UploadError(Exception):
    """An upload that cannot be scored: the HTTP status, the file's name and the reason."""

    def __init__(self, status: int, file: str, reason: str) -> None:
        super().__init__(f"{file}: {reason}")
        self.status, self.file, self.reason = status, file, reason


def decode_upload(name: str, data: bytes, max_pixels: int = ServeConfig.max_pixels,
                  resize_side: int | None = None) -> Image.Image:
    """The image in an upload's bytes, read as ``predict`` reads a file (:func:`extract.datasets.images.read_image`),
    with PIL's decompression-bomb warning (more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels) raised as an error and
    images of more than ``max_pixels`` pixels refused before they are decoded, as are those that would have more
    once the preprocessing resizes their shorter side to ``resize_side`` pixels (a 1 x 1,000,000 image is small, but
    resized to 224 px on its shorter side it is 224 x 224,000,000).

    Raises:
        UploadError: naming the file: 413 for more than ``max_pixels`` pixels, decoded or resized; 422 for not an
            image, truncated, a decompression bomb, or an image that cannot be read otherwise (a 32-bit one).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:  # the header alone: a huge image is refused before it is decoded
            with Image.open(io.BytesIO(data)) as probe:
                width, height = probe.size
        except Exception:  # not readable as an image (or a bomb): read_image says why
            width = height = 0
        if width * height > max_pixels:
            raise UploadError(413, name, f"{width} x {height} pixels, more than the server decodes "
                                         f"({max_pixels:,} pixels per image)")
        if resize_side and min(width, height) > 0:
            resized = resize_side * math.ceil(resize_side * max(width, height) / min(width, height))
            if resized > max_pixels:
                raise UploadError(413, name, f"{width} x {height} pixels: resized to {resize_side} px on its shorter "
                                             f"side it would have {resized:,} pixels, more than the server decodes "
                                             f"({max_pixels:,} pixels per image)")
        try:
            return read_image(io.BytesIO(data), name)
        except ImageReadError as err:
            text = str(err).removeprefix(f"cannot read image {name}: ")
            if "decompression bomb" in text.lower():
                reason = f"a decompression bomb ({text})"
            elif "truncated" in text.lower() or not data:
                reason = f"truncated ({text or 'an empty file'})"
            elif "cannot identify image file" in text:
                reason = f"not an image ({text})"
            else:
                reason = f"cannot be read ({text})"
            raise UploadError(422, name, reason) from None


class MicroBatcher:
    """Gathers the images of concurrent requests into one call of ``predict_rows`` (a worker thread), up to
    ``max_batch`` images, waiting at most ``max_wait_s`` after the first; each request gets its own rows back."""

    def __init__(self, predict_rows: Callable[[list], list[dict]], max_batch: int, max_wait_s: float) -> None:
        self.predict_rows = predict_rows
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.queue: asyncio.Queue = asyncio.Queue()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sanf-ad-predict")
        self.batches = 0
        self.requests = 0
        self.images = 0

    async def submit(self, images: list) -> list[dict]:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((images, future))
        return await future

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            count = len(items[0][0])
            deadline = loop.time() + self.max_wait_s
            while count < self.max_batch:
                try:
                    item = await asyncio.wait_for(self.queue.get(), max(0.0, deadline - loop.time()))
                except asyncio.TimeoutError:
                    break
                items.append(item)
                count += len(item[0])
            images = [image for batch, _ in items for image in batch]
            try:
                rows = await loop.run_in_executor(self.executor, self.predict_rows, images)
            except Exception as err:  # the requests of this batch fail with it; the server goes on
                for _, future in items:
                    if not future.done():
                        future.set_exception(err)
                continue
            self.batches += 1
            self.requests += len(items)
            self.images += len(images)
            start = 0
            for batch, future in items:
                if not future.done():
                    future.set_result(rows[start:start + len(batch)])
                start += len(batch)


def calibration_summary(scores: np.ndarray | None, alpha: float, bins: int = 30) -> dict | None:
    """The held-out normal scores as the page draws them: a histogram and the decision threshold at ``alpha``
    (an image is flagged when its score is above it: p <= alpha, docs/method.md eq. (36)-(37)); None without."""
    if scores is None:
        return None
    ordered = np.sort(np.asarray(scores, dtype=np.float64))
    n = len(ordered)
    allowed = math.floor(alpha * (n + 1) + 1e-9) - 1  # at most this many held-out scores >= a flagged score
    threshold = float(ordered[n - 1 - allowed]) if allowed >= 0 else None
    counts, edges = np.histogram(ordered, bins=bins)
    return {"n": n, "counts": counts.tolist(), "edges": edges.tolist(), "threshold": threshold}


class _BodyLimit:
    """ASGI middleware: a request body larger than ``limit`` bytes is refused with 413 before it is read (by its
    Content-Length) or as soon as it passes the limit (a chunked body), so that nothing of it is spooled to disk."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await _send_json(send, 413, {"detail": {"file": None, "reason": _too_large(self.limit)}})
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                scope.setdefault("state", {})["body_too_large"] = True  # the form parser wraps what it meets
                raise _TooLarge()
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await _send_json(send, 413, {"detail": {"file": None, "reason": _too_large(self.limit)}})


class _TooLarge(Exception):
    pass


def _too_large(limit: int) -> str:
    return f"the request is larger than the server accepts ({limit / MIB:.1f} MiB: 64 files of --max-upload-mb)"


async def _send_json(send, status: int, body: dict) -> None:
    response = JSONResponse(body, status_code=status)
    await send({"type": "http.response.start", "status": status, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


def create_app(run: str | Path, onnx: str | Path | None = None, config: ServeConfig = ServeConfig(),
               device: str = "auto", weights: str | None = None, log: Callable[[str], None] = print,
               on_failure: Callable[[BaseException], None] | None = None) -> FastAPI:
    """The service of one run folder (see the module's docstring). The run is loaded and warmed in a thread when the
    app starts; ``/health`` says when it is ready.

    Args:
        run: a run folder (any method).
        onnx: serve through this ONNX graph (``export`` of ``run``) instead of PyTorch.
        config: the service's settings.
        device: ``auto``, ``cpu`` or ``cuda`` (the PyTorch path).
        weights: the backbone's weights file, if it moved since extraction (as ``predict --weights``).
        log: where status lines go.
        on_failure: called with the error when the run cannot be loaded (:func:`flow.api.serve` stops the server
            then); without it, ``/health`` and ``/predict`` answer 503 with the reason.
    """
    state: dict = {"predictor": None, "error": None, "calibration": None}
    body_limit = int(config.max_upload_mb * MIB) * config.max_files + MIB  # the files and the form's own bytes

    def load() -> None:
        try:
            start = time.perf_counter()
            predictor = Predictor(run, device=device, onnx=onnx, weights=weights, log=log)
            size = predictor.encoder.size
            predictor.predict([np.zeros((*size, 3), dtype=np.uint8)], alpha=config.alpha)  # warm: one forward
            calibration = predictor.calibration[predictor.primary_score] if predictor.calibrated else None
            state["calibration"] = calibration_summary(calibration, config.alpha)
            state["resize_side"] = predictor.encoder.resize_side()
            state["predictor"] = predictor
            log(f"serving {Path(run).name} ({predictor.record['method']}, "
                f"{'onnxruntime' if onnx else 'PyTorch'}): ready after {time.perf_counter() - start:.1f} s")
        except Exception as err:  # reported by /health and /predict, or the server stops (on_failure)
            state["error"] = f"{type(err).__name__}: {err}"
            if on_failure is not None:
                on_failure(err)
            else:
                log(f"cannot serve {run}: {state['error']}")

    def predict_rows(images: list) -> list[dict]:
        predictor: Predictor = state["predictor"]
        return predictor.predict(images, alpha=config.alpha, batch_size=config.max_batch).rows()

    batcher_box: dict = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=load, name="sanf-ad-load", daemon=True).start()
        batcher = MicroBatcher(predict_rows, config.max_batch, config.max_wait_ms / 1000)
        batcher_box["batcher"] = batcher
        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()
        batcher.executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="SANF-AD", summary="Anomaly scores, p-values and decisions of a fitted run",
                  lifespan=lifespan)

    def authorise(request: Request) -> None:
        if config.token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode("latin-1", "replace"),
                                                                  config.token.encode()):
            raise HTTPException(401, detail={"file": None, "reason": "missing or wrong bearer token"},
                                headers={"WWW-Authenticate": "Bearer"})

    def predictor_or_503() -> Predictor:
        if state["predictor"] is None:
            reason = f"the run could not be loaded: {state['error']}" if state["error"] else "loading the run"
            raise HTTPException(503, detail={"file": None, "reason": reason})
        return state["predictor"]

    @app.exception_handler(UploadError)
    async def upload_error(request: Request, err: UploadError):
        return JSONResponse({"detail": {"file": err.file, "reason": err.reason}}, status_code=err.status)

    @app.get("/health")
    async def health():
        """Whether the run is loaded and warm."""
        if state["predictor"] is not None:
            batcher = batcher_box["batcher"]
            return {"ready": True, "run": Path(run).name, "requests": batcher.requests, "images": batcher.images,
                    "forwards": batcher.batches}
        return JSONResponse({"ready": False, "error": state["error"]}, status_code=503)

    @app.get("/model")
    async def model(request: Request):
        """What the run is, and its held-out normal scores (histogram and threshold at alpha)."""
        authorise(request)
        predictor = predictor_or_503()
        record, features = predictor.record, predictor.features
        return {"run": Path(run).name, "method": record["method"], "backbone": features.get("backbone"),
                "weights": features.get("weights_source"), "weights_sha256": features.get("weights_sha256"),
                "dataset": record.get("dataset"), "normal_class": record["normal_class"],
                "normal_name": record["normal_name"], "feature_transform": record.get("feature_transform"),
                "scores": predictor.names, "primary_score": predictor.primary_score,
                "calibration_rows": predictor.num_calibration, "alpha": config.alpha, "fitted": record.get("created"),
                "runtime": "onnxruntime" if onnx else "pytorch", "max_batch": config.max_batch,
                "max_upload_mb": config.max_upload_mb, "calibration": state["calibration"]}

    @app.post("/predict", openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {
        "schema": {"type": "object", "required": ["files"], "properties": {"files": {
            "type": "array", "items": {"type": "string", "format": "binary"}}}}}}}})
    async def predict(request: Request):
        """Score the uploaded images (multipart form files in the field ``files``): one item per file, in order."""
        authorise(request)  # before the body is read: an anonymous upload is not even parsed
        predictor = predictor_or_503()
        try:
            form = await request.form(max_files=config.max_files, max_fields=16)
        except Exception as err:
            if request.scope.get("state", {}).get("body_too_large"):
                raise HTTPException(413, detail={"file": None, "reason": _too_large(body_limit)}) from None
            if str(getattr(err, "detail", err)).startswith("Too many files"):  # Starlette stops at max_files + 1
                raise HTTPException(413, detail={"file": None, "reason": f"more than {config.max_files} files; at "
                                                                          f"most {config.max_files} per request"}) \
                    from None
            raise HTTPException(400, detail={"file": None, "reason": f"cannot parse the multipart body: "
                                                                      f"{getattr(err, 'detail', err)}"}) from None
        files = [f for f in form.getlist("files") if isinstance(f, StarletteUpload)]
        if not files:
            await form.close()
            raise HTTPException(422, detail={"file": None, "reason": "no images: send them as multipart form files "
                                                                     "in the field 'files'"})
        loop = asyncio.get_running_loop()
        images, names, pixels = [], [], 0
        limit = int(config.max_upload_mb * MIB)
        try:
            for upload in files:
                name = upload.filename or f"file {len(names)}"
                data = await upload.read(limit + 1)
                if len(data) > limit:
                    raise UploadError(413, name, f"larger than --max-upload-mb {config.max_upload_mb:g} MiB")
                image = await loop.run_in_executor(None, decode_upload, name, data, config.max_pixels,
                                                   state.get("resize_side"))
                pixels += image.width * image.height
                if pixels > config.max_request_pixels:
                    raise UploadError(413, name, f"the request's images exceed {config.max_request_pixels:,} pixels "
                                                 "in all; send fewer per request")
                images.append(image)
                names.append(name)
        finally:
            await form.close()
        rows = await batcher_box["batcher"].submit(images)
        items = [{"file": name, "score": row.get("score"), **{key: row.get(key) for key in predictor.names},
                  "p_value": row.get("p_value"), "anomalous": row.get("anomalous"),
                  "error": row["error"].replace(row["path"], name)}
                 for name, row in zip(names, rows, strict=True)]
        summary = state["calibration"]
        return {"alpha": config.alpha, "threshold": summary["threshold"] if summary else None, "items": items}

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    app.add_middleware(_BodyLimit, limit=body_limit)
    return app


__all__ = ["MicroBatcher", "ServeConfig", "UploadError", "calibration_summary", "create_app", "decode_upload"]
