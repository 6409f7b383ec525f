"""A local drawing page for one-shot classification, served by the standard library's HTTP server.

Routes::

    GET  /              the page (static/index.html), /app.js, /style.css: package files, nothing external
    GET  /api/info      {"algorithm", "dataset", "transform", "image_size", "channels", "ways", "limits"}
                        ("ways": the exact number of classes a fixed-head learner needs, else null)
    POST /api/predict   {"support": [{"label": "alpha", "image": "data:image/png;base64,..."}, ...],
                         "query": "data:image/png;base64,..."}
                        -> {"predicted": "alpha", "probabilities": {"alpha": 0.93, ...}, "classes": [...]}

Each class is a label of the user's; one or more drawings per label. The support set is
``support_x [N*K, C, S, S]`` in [0, 1] (converted by the checkpoint's transform), ``support_y``
numbers the labels in order of first appearance, and the probabilities are the softmax of the
learner's logits. Bad requests get a 4xx with ``{"error": "..."}``; a model failure a 500 with
its message; the server keeps serving either way. One lock serialises use of the model.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import re
import signal
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
from PIL import Image

from ..data.transforms import apply_transform, make_transform
from ..engine.checkpoint import CheckpointError
from ..predict import one_query_at_a_time

STATIC = Path(__file__).parent / "static"
PAGES = {"/": "index.html", "/index.html": "index.html", "/app.js": "app.js", "/style.css": "style.css"}
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8"}
# Everything the page needs comes from this server; drawings travel as data: URLs.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
                               "frame-ancestors 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
IMAGE_FORMATS = {"PNG", "JPEG", "GIF", "WEBP", "BMP"}
DATA_URL = re.compile(r"data:image/[a-z0-9.+-]+;base64,", re.IGNORECASE)


class Limits:
    """What one request may hold: body bytes, image side in pixels, classes, support drawings, label length."""

    def __init__(self, body: int = 2 * 1024 * 1024, side: int = 1024, classes: int = 50, support: int = 200,
                 label: int = 100) -> None:
        self.body, self.side, self.classes, self.support, self.label = body, side, classes, support, label

    def to_dict(self) -> dict:
        return {"max_body_bytes": self.body, "max_image_side": self.side, "max_classes": self.classes,
                "max_support": self.support, "max_label_length": self.label}


class RequestError(Exception):
    """A request the server refuses: ``status`` (4xx) and a message for the person who sent it."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def learner_transform(learner) -> dict:
    """The learner's input transform; rebuilt from its config for checkpoints saved without one."""
    transform = dict(getattr(learner, "transform", None) or {})
    config = getattr(learner, "config", None)
    if not transform and config is not None and config.data.dataset != "sinusoid":
        d = config.data
        transform = make_transform(size=d.image_size, channels=d.channels if d.dataset == "folder" else 1,
                                   invert=d.invert if d.dataset == "folder" else True)
    return transform


def check_learner(learner) -> dict:
    """Refuse, before serving, a learner that cannot classify pictures; returns its transform."""
    if getattr(learner, "task", "classification") != "classification":
        raise CheckpointError("metakit serve needs an image classification checkpoint (e.g. "
                              "checkpoints/omniglot/protonet_1shot.pt); this one is for regression")
    transform = learner_transform(learner)
    if "size" not in transform or "channels" not in transform:
        raise CheckpointError("this checkpoint holds no image transform (size, channels); "
                              "serve a checkpoint trained on Omniglot or on an image folder")
    return transform


def decode_image(value, limits: Limits, what: str) -> Image.Image:
    """A ``data:image/...;base64,`` URL -> a loaded PIL image, or a :class:`RequestError` naming ``what``."""
    if not isinstance(value, str):
        raise RequestError(400, f"{what} must be a data URL string (data:image/png;base64,...)")
    match = DATA_URL.match(value)
    if not match:
        raise RequestError(400, f"{what} is not an image data URL: it must start with data:image/png;base64,")
    try:
        raw = base64.b64decode(value[match.end():], validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, f"{what}: the base64 data is malformed") from None
    try:
        image = Image.open(io.BytesIO(raw))
    except Exception:
        raise RequestError(400, f"{what}: the data is not an image PIL can read") from None
    if image.format not in IMAGE_FORMATS:
        raise RequestError(400, f"{what}: {image.format} images are not accepted; send PNG "
                                f"(or {', '.join(sorted(IMAGE_FORMATS - {'PNG'}))})")
    width, height = image.size  # from the header, before decoding any pixel
    if width > limits.side or height > limits.side:
        raise RequestError(413, f"{what} is {width}x{height} pixels; at most {limits.side}x{limits.side} "
                                "is accepted (the model sees it at a few dozen pixels anyway)")
    if width < 1 or height < 1:
        raise RequestError(400, f"{what} is empty ({width}x{height} pixels)")
    try:
        image.load()
    except Exception:
        raise RequestError(400, f"{what}: the image data is truncated or damaged") from None
    return image


def parse_predict(body: bytes, limits: Limits) -> tuple[list[str], list[Image.Image], list[int], Image.Image]:
    """The predict request -> (class labels in order, support images, their class numbers, query image)."""
    try:
        request = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(400, f"the body is not valid JSON ({exc})") from None
    if not isinstance(request, dict):
        raise RequestError(400, 'the body must be a JSON object {"support": [...], "query": "data:image/png;..."}')
    for key in ("support", "query"):
        if key not in request:
            raise RequestError(400, f'missing field "{key}": send {{"support": [{{"label": ..., "image": ...}}, '
                                    '...], "query": "data:image/png;base64,..."}')
    support = request["support"]
    if not isinstance(support, list):
        raise RequestError(400, '"support" must be a list of {"label": ..., "image": ...} objects')
    if len(support) > limits.support:
        raise RequestError(413, f"{len(support)} support drawings; at most {limits.support} are accepted")
    labels: list[str] = []
    index: dict[str, int] = {}
    images, ys = [], []
    for i, item in enumerate(support):
        if not isinstance(item, dict) or "label" not in item or "image" not in item:
            raise RequestError(400, f'support[{i}] must be an object with "label" and "image"')
        label = item["label"]
        if not isinstance(label, str) or not label.strip():
            raise RequestError(400, f"support[{i}]: the label must be a non-empty string")
        label = label.strip()
        if len(label) > limits.label:
            raise RequestError(400, f"support[{i}]: the label is longer than {limits.label} characters")
        if label not in index:
            index[label] = len(labels)
            labels.append(label)
        images.append(decode_image(item["image"], limits, f"support[{i}] ({label})"))
        ys.append(index[label])
    if len(labels) < 2:
        raise RequestError(400, f"add at least 2 classes to predict (got {len(labels)}): "
                                "a prediction chooses between classes")
    if len(labels) > limits.classes:
        raise RequestError(413, f"{len(labels)} classes; at most {limits.classes} are accepted")
    query = decode_image(request["query"], limits, "query")
    return labels, images, ys, query


class Predictor:
    """The learner, its transform and the lock that lets one request at a time use it."""

    def __init__(self, learner) -> None:
        self.learner = learner
        self.transform = check_learner(learner)
        self.lock = threading.Lock()
        # Gradient-based learners (MAML, ...) have a classifier head of train.ways outputs: a task
        # must have exactly that many classes. Metric-based ones take any number (``ways`` None).
        ways = getattr(learner, "ways", None)
        self.ways = ways if isinstance(ways, int) and not isinstance(ways, bool) else None

    def tensor(self, image: Image.Image) -> torch.Tensor:
        return apply_transform(image, self.transform).float().div_(255)  # [C, S, S] in [0, 1]

    def info(self) -> dict:
        config = getattr(self.learner, "config", None)
        return {"algorithm": config.algorithm if config is not None else getattr(self.learner, "name", None),
                "dataset": config.data.dataset if config is not None else None,
                "transform": self.transform, "image_size": self.transform["size"],
                "channels": self.transform["channels"], "ways": self.ways}

    def predict(self, labels: list[str], images: list[Image.Image], ys: list[int], query: Image.Image) -> dict:
        if self.ways is not None and len(labels) != self.ways:
            raise RequestError(400, f"this checkpoint's {getattr(self.learner, 'name', 'learner')} tells exactly "
                                    f"{self.ways} classes apart (its train.ways); the request has {len(labels)}")
        support_x = torch.stack([self.tensor(im) for im in images])  # [N*K, C, S, S]
        support_y = torch.tensor(ys, dtype=torch.long)  # [N*K]
        query_x = self.tensor(query)[None]  # [1, C, S, S]
        grad = torch.enable_grad() if getattr(self.learner, "grad_at_test", False) else torch.no_grad()
        with self.lock, grad:
            with one_query_at_a_time(self.learner):  # a lone query is normalised with the support set
                logits = self.learner.adapt(support_x, support_y)(query_x)  # [1, N]
        logits = logits.detach().reshape(-1) if logits.dim() == 2 and logits.shape[0] == 1 else logits.detach()
        if logits.dim() != 1 or logits.numel() != len(labels):
            raise RequestError(400, f"the model gave {tuple(logits.shape)} scores for {len(labels)} classes: "
                                    "this checkpoint may classify a fixed number of classes (its train.ways)")
        probs = torch.softmax(logits.double(), 0)
        if not torch.isfinite(probs).all():
            raise RuntimeError("the model's scores are not finite (NaN or infinity)")
        values = [float(p) for p in probs]
        best = max(range(len(labels)), key=values.__getitem__)
        return {"predicted": labels[best], "probabilities": dict(zip(labels, values)), "classes": labels}


class Handler(BaseHTTPRequestHandler):
    server_version = "metakit"
    protocol_version = "HTTP/1.1"
    timeout = 30  # seconds a slow or silent client may hold a connection

    server: DrawingServer

    def version_string(self) -> str:
        return self.server_version

    # ---- responses
    def send(self, status: int, body: bytes, content_type: str, extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in {**SECURITY_HEADERS, **(extra or {})}.items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_json(self, status: int, obj, extra: dict | None = None) -> None:
        self.send(status, json.dumps(obj).encode(), "application/json", extra)

    def send_error_json(self, status: int, message: str, extra: dict | None = None) -> None:
        self.send_json(status, {"error": message}, extra)

    def log_message(self, format, *args):
        if self.server.log_requests:
            super().log_message(format, *args)

    def log_request(self, code="-", size="-"):
        # Only failures: the page asks for a prediction at every stroke.
        if isinstance(code, HTTPStatus):
            code = code.value
        if self.server.log_requests and isinstance(code, int) and code >= 400:
            super().log_request(code, size)

    # ---- routes
    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path in PAGES:
            name = PAGES[path]
            self.send(200, self.server.static[name], CONTENT_TYPES[Path(name).suffix])
        elif path == "/api/info":
            self.send_json(200, {**self.server.predictor.info(), "limits": self.server.limits.to_dict()})
        elif path == "/api/predict":
            self.send_error_json(405, "use POST for /api/predict", {"Allow": "POST"})
        else:
            self.send_error_json(404, f"no such page: {path}")

    do_HEAD = do_GET

    def do_POST(self):
        path = self.path.split("?", 1)[0]
        if path != "/api/predict":
            if path in PAGES or path == "/api/info":
                self.close_connection = True  # the body, if any, is not read
                self.send_error_json(405, f"use GET for {path}", {"Allow": "GET, HEAD"})
            else:
                self.close_connection = True
                self.send_error_json(404, f"no such page: {path}")
            return
        try:
            body = self.read_body()
            result = self.server.predictor.predict(*parse_predict(body, self.server.limits))
        except RequestError as exc:
            self.send_error_json(exc.status, str(exc))
        except Exception as exc:  # the model failed: say so, keep serving
            self.log_error("predict failed: %s: %s", type(exc).__name__, exc)
            self.send_error_json(500, f"the model failed: {type(exc).__name__}: {exc}")
        else:
            self.send_json(200, result)

    def read_body(self) -> bytes:
        ctype = self.headers.get("Content-Type", "")
        if ctype.split(";", 1)[0].strip().lower() != "application/json":
            self.discard_body()
            raise RequestError(415, f"send JSON with Content-Type: application/json (got {ctype or 'none'})")
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise RequestError(411, "send the body with a Content-Length, not chunked")
        length = self.content_length()
        if length > self.server.limits.body:
            self.discard_body()
            raise RequestError(413, f"the body is {length} bytes; at most {self.server.limits.body} are accepted")
        body = self.rfile.read(length)
        if len(body) < length:
            self.close_connection = True
            raise RequestError(400, f"the body ended after {len(body)} of {length} bytes")
        return body

    def content_length(self) -> int:
        value = self.headers.get("Content-Length")
        if value is None:
            self.close_connection = True
            raise RequestError(411, "a Content-Length header is required")
        try:
            length = int(value)
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            raise RequestError(400, f"bad Content-Length {value!r}")
        return length

    def discard_body(self) -> None:
        """Read and drop a refused body (up to 8x the limit) so the client sees our answer, then close."""
        self.close_connection = True
        try:
            left = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            return
        if left < 0 or left > 8 * self.server.limits.body:
            return
        while left > 0:
            chunk = self.rfile.read(min(left, 65536))
            if not chunk:
                return
            left -= len(chunk)


class DrawingServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, predictor: Predictor, limits: Limits, log_requests: bool) -> None:
        self.predictor, self.limits, self.log_requests = predictor, limits, log_requests
        self.static = {name: (STATIC / name).read_bytes() for name in set(PAGES.values())}
        super().__init__(address, Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port}/"


def make_server(learner, host: str = "127.0.0.1", port: int = 0, *, limits: Limits | None = None,
                log_requests: bool = True) -> DrawingServer:
    """A server (not yet serving) for ``learner`` or a checkpoint path; ``port=0`` picks a free port.

    Call ``serve_forever()`` on it (e.g. in a thread), then ``shutdown()`` and ``server_close()``.
    """
    if isinstance(learner, (str, Path)):
        from ..engine.checkpoint import load
        learner = load(learner)
    learner.eval()
    return DrawingServer((host, port), Predictor(learner), limits or Limits(), log_requests)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def cmd_serve(args) -> int:
    """``metakit serve CHECKPOINT [--port P] [--host H]``: serve until Ctrl-C (or SIGTERM)."""
    from ..engine.checkpoint import load

    learner = load(args.checkpoint)
    try:
        server = make_server(learner, args.host, args.port)
    except OSError as exc:
        print(f"metakit serve: error: cannot listen on {args.host}:{args.port} ({exc.strerror or exc}); "
              "choose another port with --port", file=sys.stderr)
        return 2
    info = server.predictor.info()
    print(f"serving {info['algorithm']} ({args.checkpoint}) at {server.url}  (Ctrl-C to stop)", flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"note: bound to {args.host}, so other machines can reach this page", flush=True)
    try:  # a service manager's SIGTERM stops the server as Ctrl-C does
        signal.signal(signal.SIGTERM, _interrupt)
    except ValueError:  # not the main thread
        pass
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", flush=True)
    finally:
        server.server_close()
    return 0
