"""``metakit serve``: the HTTP API (predictions, label mapping, bad input), the static page, the CLI."""
from __future__ import annotations

import base64
import http.client
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

import metakit
from metakit.algorithms import Learner
from metakit.config import Config
from metakit.data.transforms import OMNIGLOT_TRANSFORM
from metakit.engine import CheckpointError
from metakit.engine.checkpoint import save
from metakit.serve import make_server
from metakit.serve.server import check_learner

CANVAS = 280


# ---- drawings, as the page sends them: black strokes on a white 280x280 canvas, PNG data URLs
def canvas(*shapes) -> Image.Image:
    """``shapes``: rectangles ``(x0, y0, x1, y1)`` inked black on white paper."""
    im = Image.new("RGB", (CANVAS, CANVAS), "white")
    d = ImageDraw.Draw(im)
    for box in shapes:
        d.rectangle(box, fill="black")
    return im


def data_url(im: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


HORIZONTAL = (40, 125, 240, 155)  # a bar across the middle
VERTICAL = (125, 40, 155, 240)  # a bar down the middle
DIAGONAL_BOXES = ((40, 40, 100, 100), (180, 180, 240, 240))


def shifted(box, dx, dy):
    return (box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy)


# ---- learners
class PixelProtoNet(metakit.ProtoNet):
    """ProtoNet's own prototypes and distances (eq. 1, 2) with the identity embedding f(x) = x.

    Nearest class mean in pixel space: deterministic, and a slightly shifted bar is much nearer
    its own class's drawing than a perpendicular bar.
    """

    def embed(self, x):
        return x.flatten(-3)  # [..., C*H*W]


def pixel_protonet():
    learner = PixelProtoNet(metakit.ProtoNet.Options(hidden=1))
    learner.transform = dict(OMNIGLOT_TRANSFORM)
    return learner.eval()


class Stub(Learner):
    """Records what ``adapt`` was given and answers fixed logits: tests the label mapping and softmax."""

    def __init__(self, logits, fail=False):
        super().__init__()
        self.fixed, self.fail, self.calls = torch.tensor(logits), fail, []
        self.transform = {"size": 8, "channels": 1, "invert": True, "resample": "box"}

    def adapt(self, support_x, support_y):
        if self.fail:
            raise RuntimeError("the stub is broken on purpose")
        self.calls.append((support_x.clone(), support_y.clone()))

        def predict(query_x):
            self.calls.append(query_x.clone())
            return self.fixed[None].expand(query_x.shape[0], -1)  # [M, N]
        return predict


# ---- servers
@pytest.fixture
def serve():
    """``serve(learner_or_path) -> (base_url, server)``: a server on a free port, shut down after the test."""
    started = []

    def start(learner, **kwargs):
        server = make_server(learner, "127.0.0.1", 0, log_requests=False, **kwargs)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        started.append((server, thread))
        return server.url.rstrip("/"), server

    yield start
    for server, thread in started:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def request(base, method, path, body=None, headers=None):
    """(status, headers, parsed JSON or raw bytes) over a fresh connection."""
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=20)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        ctype = resp.getheader("Content-Type", "")
        return resp.status, resp, (json.loads(data) if ctype.startswith("application/json") else data)
    finally:
        conn.close()


def post(base, payload, path="/api/predict", content_type="application/json"):
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return request(base, "POST", path, body, {"Content-Type": content_type})


def support(*pairs):
    return [{"label": label, "image": data_url(im) if isinstance(im, Image.Image) else im} for label, im in pairs]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """An untrained ProtoNet (Conv4, 8 filters) saved as a real checkpoint with the Omniglot transform."""
    torch.manual_seed(0)
    learner = metakit.ProtoNet(metakit.ProtoNet.Options(hidden=8))
    config = Config(name="tiny-serve", algorithm="protonet", model=metakit.ProtoNet.Options(hidden=8))
    return save(tmp_path_factory.mktemp("ckpt") / "tiny.pt", learner, config, dict(OMNIGLOT_TRANSFORM))


# ---- predictions
def test_checkpoint_predict_probabilities_sum_to_one(serve, tiny_checkpoint):
    base, _ = serve(tiny_checkpoint)
    status, _, info = request(base, "GET", "/api/info")
    assert status == 200
    assert info["algorithm"] == "protonet" and info["dataset"] == "omniglot"
    assert info["image_size"] == 28 and info["transform"]["invert"] is True
    assert info["ways"] is None  # a ProtoNet takes any number of classes

    payload = {"support": support(("alpha", canvas(HORIZONTAL)), ("beta", canvas(VERTICAL)),
                                  ("gamma", canvas(*DIAGONAL_BOXES)), ("beta", canvas(shifted(VERTICAL, 8, 0)))),
               "query": data_url(canvas(shifted(HORIZONTAL, 0, 6)))}
    status, _, result = post(base, payload)
    assert status == 200, result
    probs = result["probabilities"]
    assert list(probs) == ["alpha", "beta", "gamma"] == result["classes"]
    assert math.isclose(sum(probs.values()), 1.0, abs_tol=1e-9)
    assert all(0.0 <= p <= 1.0 for p in probs.values())
    assert result["predicted"] == max(probs, key=probs.get)


def test_shifted_drawing_is_recognised(serve):
    base, _ = serve(pixel_protonet())
    bars = support(("horizontal", canvas(HORIZONTAL)), ("vertical", canvas(VERTICAL)))
    for query, expected in ((shifted(HORIZONTAL, 6, 10), "horizontal"), (shifted(VERTICAL, -10, 5), "vertical"),
                            (shifted(HORIZONTAL, -8, -9), "horizontal")):
        status, _, result = post(base, {"support": bars, "query": data_url(canvas(query))})
        assert status == 200, result
        assert result["predicted"] == expected
        assert result["probabilities"][expected] > 0.99  # squared distances in pixels: a wide margin


def test_several_drawings_per_class_and_transparent_png(serve):
    base, _ = serve(pixel_protonet())
    transparent = Image.new("RGBA", (CANVAS, CANVAS), (0, 0, 0, 0))  # a canvas never painted white
    ImageDraw.Draw(transparent).rectangle(VERTICAL, fill=(0, 0, 0, 255))
    payload = {"support": support(("h", canvas(HORIZONTAL)), ("v", transparent), ("h", canvas(shifted(HORIZONTAL, 0, 20)))),
               "query": data_url(canvas(shifted(VERTICAL, 4, 0)), "JPEG")}
    status, _, result = post(base, payload)
    assert status == 200, result
    assert result["predicted"] == "v"


def test_label_mapping_and_softmax(serve):
    stub = Stub([0.0, 2.0, 1.0])
    base, _ = serve(stub)
    payload = {"support": support(("alpha", canvas(HORIZONTAL)), ("beta", canvas(VERTICAL)),
                                  (" alpha ", canvas(*DIAGONAL_BOXES)), ("gamma", canvas(HORIZONTAL))),
               "query": data_url(canvas(VERTICAL))}
    status, _, result = post(base, payload)
    assert status == 200, result
    (support_x, support_y), query_x = stub.calls
    assert support_y.tolist() == [0, 1, 0, 2]  # labels numbered in order of first appearance, stripped
    assert support_x.shape == (4, 1, 8, 8) and support_x.dtype == torch.float32
    assert 0.0 <= float(support_x.min()) and float(support_x.max()) <= 1.0
    assert query_x.shape == (1, 1, 8, 8)
    # ink is 1, paper 0: the vertical bar (x 125..155 of 280) inks the middle two columns, not the corner
    assert float(query_x[0, 0, 4, 3] + query_x[0, 0, 4, 4]) > 0.85 and float(query_x[0, 0, 0, 0]) == 0.0
    expected = torch.softmax(torch.tensor([0.0, 2.0, 1.0], dtype=torch.float64), 0).tolist()
    assert result["predicted"] == "beta"
    assert list(result["probabilities"]) == ["alpha", "beta", "gamma"]
    assert list(result["probabilities"].values()) == pytest.approx(expected, abs=1e-12)


# ---- bad input: a 4xx with a JSON error each, and the server keeps answering
def _png_of_size(w, h):
    return data_url(Image.new("L", (w, h), 255))


def _bad_requests():
    good_support = support(("a", canvas(HORIZONTAL)), ("b", canvas(VERTICAL)))
    query = data_url(canvas(HORIZONTAL))
    ok = {"support": good_support, "query": query}
    png = base64.b64decode(query.split(",", 1)[1])
    truncated = "data:image/png;base64," + base64.b64encode(png[: len(png) // 2]).decode()
    return [
        ("malformed JSON", b'{"support": [', "application/json", 400),
        ("not UTF-8", b"\xff\xfe{}", "application/json", 400),
        ("JSON array", b"[1, 2]", "application/json", 400),
        ("missing query", {"support": good_support}, "application/json", 400),
        ("missing support", {"query": query}, "application/json", 400),
        ("support not a list", {**ok, "support": "a"}, "application/json", 400),
        ("one class", {**ok, "support": support(("a", canvas(HORIZONTAL)), ("a", canvas(VERTICAL)))},
         "application/json", 400),
        ("no classes", {**ok, "support": []}, "application/json", 400),
        ("item without image", {**ok, "support": good_support[:1] + [{"label": "b"}]}, "application/json", 400),
        ("empty label", {**ok, "support": good_support[:1] + [{"label": "  ", "image": query}]},
         "application/json", 400),
        ("label not a string", {**ok, "support": good_support[:1] + [{"label": 3, "image": query}]},
         "application/json", 400),
        ("query not a data URL", {**ok, "query": "hello"}, "application/json", 400),
        ("query a number", {**ok, "query": 7}, "application/json", 400),
        ("bad base64", {**ok, "query": "data:image/png;base64,!!!not base64!!!"}, "application/json", 400),
        ("not an image", {**ok, "query": "data:image/png;base64," + base64.b64encode(b"just text").decode()},
         "application/json", 400),
        ("truncated PNG", {**ok, "query": truncated}, "application/json", 400),
        ("image too large", {**ok, "query": _png_of_size(1100, 16)}, "application/json", 413),
        ("support image too large", {**ok, "support": good_support + support(("c", _png_of_size(16, 2000)))},
         "application/json", 413),
        ("wrong content type", ok, "text/plain", 415),
        ("form content type", b"support=1", "application/x-www-form-urlencoded", 415),
        ("body too large", b'{"query": "' + b"A" * (2 * 1024 * 1024 + 10) + b'"}', "application/json", 413),
    ]


def test_bad_requests_get_4xx_and_server_keeps_running(serve):
    base, _ = serve(pixel_protonet())
    good = {"support": support(("a", canvas(HORIZONTAL)), ("b", canvas(VERTICAL))),
            "query": data_url(canvas(shifted(VERTICAL, 3, 3)))}
    for name, payload, ctype, expected in _bad_requests():
        status, _, body = post(base, payload, content_type=ctype)
        assert status == expected, (name, status, body)
        assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"], name
        status, _, result = post(base, good)  # still serving, and still right
        assert status == 200 and result["predicted"] == "b", name


def test_missing_length_and_wrong_methods(serve):
    base, _ = serve(pixel_protonet())
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.putrequest("POST", "/api/predict")
    conn.putheader("Content-Type", "application/json")
    conn.endheaders()  # no Content-Length, no body
    resp = conn.getresponse()
    assert resp.status == 411 and "error" in json.loads(resp.read())
    conn.close()
    assert request(base, "GET", "/api/predict")[0] == 405
    assert request(base, "POST", "/", b"{}", {"Content-Type": "application/json"})[0] == 405
    assert request(base, "POST", "/api/elsewhere", b"{}", {"Content-Type": "application/json"})[0] == 404
    assert request(base, "GET", "/api/info")[0] == 200


def test_model_error_is_500_and_server_keeps_running(serve):
    stub = Stub([0.0, 1.0], fail=True)
    base, _ = serve(stub)
    payload = {"support": support(("a", canvas(HORIZONTAL)), ("b", canvas(VERTICAL))),
               "query": data_url(canvas(HORIZONTAL))}
    status, _, body = post(base, payload)
    assert status == 500 and "broken on purpose" in body["error"]
    stub.fail = False
    status, _, body = post(base, payload)
    assert status == 200 and body["predicted"] == "b"


def test_wrong_number_of_scores_is_an_error_not_a_crash(serve):
    base, _ = serve(Stub([0.0, 1.0, 2.0, 3.0, 4.0]))  # a fixed 5-way head, asked about 2 classes
    payload = {"support": support(("a", canvas(HORIZONTAL)), ("b", canvas(VERTICAL))),
               "query": data_url(canvas(HORIZONTAL))}
    status, _, body = post(base, payload)
    assert status == 400 and "2 classes" in body["error"]


def test_fixed_head_learner_needs_exactly_its_ways(serve):
    stub = Stub([0.0, 1.0, 2.0])
    stub.ways = 3  # as MAML's head of train.ways outputs
    base, _ = serve(stub)
    assert request(base, "GET", "/api/info")[2]["ways"] == 3
    two = support(("a", canvas(HORIZONTAL)), ("b", canvas(VERTICAL)))
    status, _, body = post(base, {"support": two, "query": data_url(canvas(HORIZONTAL))})
    assert status == 400 and "exactly 3 classes" in body["error"] and not stub.calls
    three = two + support(("c", canvas(*DIAGONAL_BOXES)))
    status, _, body = post(base, {"support": three, "query": data_url(canvas(HORIZONTAL))})
    assert status == 200 and body["predicted"] == "c"


def test_regression_checkpoint_refused():
    stub = Stub([0.0])
    stub.task = "regression"
    with pytest.raises(CheckpointError, match="classification"):
        check_learner(stub)
    stub = Stub([0.0])
    stub.transform = {}
    with pytest.raises(CheckpointError, match="transform"):
        check_learner(stub)


# ---- the page
def test_static_files_and_unknown_paths(serve):
    base, _ = serve(pixel_protonet())
    static = Path(metakit.__file__).parent / "serve" / "static"
    for path, name, ctype in (("/", "index.html", "text/html"), ("/app.js", "app.js", "text/javascript"),
                              ("/style.css", "style.css", "text/css")):
        status, resp, body = request(base, "GET", path)
        assert status == 200 and resp.getheader("Content-Type").startswith(ctype)
        assert body == (static / name).read_bytes()
        assert "default-src 'self'" in resp.getheader("Content-Security-Policy")
    page = (static / "index.html").read_text()
    assert "http://" not in page and "https://" not in page  # no external assets
    assert 'src="/app.js"' in page and 'href="/style.css"' in page
    for path in ("/nope", "/static/app.js", "/../pyproject.toml", "/api", "/app.js/x"):
        status, _, body = request(base, "GET", path)
        assert status == 404 and "error" in body, path
    assert request(base, "GET", "/")[0] == 200


# ---- the command
def test_cli_serve_prints_url_and_stops_cleanly(tiny_checkpoint):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "metakit", "serve", str(tiny_checkpoint), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert "http://127.0.0.1:" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        base = re.search(r"http://127\.0\.0\.1:\d+", line).group(0)
        assert request(base, "GET", "/")[0] == 200
        proc.send_signal(signal.SIGTERM)  # as Ctrl-C (SIGINT may be ignored in a background job)
        assert proc.wait(timeout=20) == 0
        assert "stopped" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_serve_missing_checkpoint(tmp_path):
    result = subprocess.run([sys.executable, "-m", "metakit", "serve", str(tmp_path / "missing.pt")],
                            check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "not found" in result.stderr


def test_concurrent_requests_share_the_model(serve):
    base, _ = serve(pixel_protonet())
    bars = support(("horizontal", canvas(HORIZONTAL)), ("vertical", canvas(VERTICAL)))
    queries = [(shifted(HORIZONTAL, i, -i), "horizontal") if i % 2 else (shifted(VERTICAL, -i, i), "vertical")
               for i in range(8)]
    results = [None] * len(queries)

    def ask(i):
        results[i] = post(base, {"support": bars, "query": data_url(canvas(queries[i][0]))})

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(queries))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert [(r[0], r[2]["predicted"]) for r in results] == [(200, expected) for _, expected in queries]
