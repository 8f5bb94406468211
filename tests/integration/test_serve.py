"""``pipeline.py serve`` end to end: the real server (uvicorn in a subprocess on a free port) called over HTTP gives
``predict``'s numbers, through PyTorch and through ``--onnx``; hostile uploads get a 4xx naming the file and the
reason and leave nothing behind; the token, the bind address, concurrent clients, and the page in Chromium.

Nothing is downloaded: the backbone is timm's tiny randomly initialised test model at 32 px.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from test_cli import SMALL, assert_ok, extract_args, invoke, read_csv

from pipeline import cli

from conftest import ROOT, make_image_tree

ALPHA = "0.2"  # 10 held-out rows: the smallest p-value is 1/11, so decisions can go both ways


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A 40-train / 30-test image tree per class (2 classes), calibrated sanf and knn runs (10 held-out rows), each
    exported to ONNX, and predict's CSV of the 60 test images for each."""
    work = tmp_path_factory.mktemp("serve")
    tree = make_image_tree(work / "data", per_split={"train": 40, "test": 30})
    cache_dir, runs_dir = work / "cache", work / "runs"
    assert_ok(invoke(*extract_args(tree, cache_dir, backbone=SMALL)))
    runs, images = {}, sorted((tree / "test").rglob("*.png"))
    for method, extra in (("sanf", ("--epochs", "2", "--hidden", "16")), ("knn", ())):
        assert_ok(invoke("fit", "--cache-dir", str(cache_dir), "--runs-dir", str(runs_dir), "--normal", "blue",
                         "--method", method, "--val-fraction", "0.25", "--device", "cpu", *extra))
        (run,) = [p for p in runs_dir.iterdir() if p.is_dir() and f"__{method}__" in p.name]
        onnx = work / f"{method}.onnx"
        assert_ok(invoke("export", str(run), "--out", str(onnx), "--alpha", ALPHA, "--check-images",
                         str(images[0])))
        out = work / f"{method}.csv"
        assert_ok(invoke("predict", str(run), *map(str, images), "--out", str(out), "--alpha", ALPHA,
                         "--num-workers", "0", "--device", "cpu"))
        runs[method] = {"run": run, "onnx": onnx, "csv": read_csv(out)[1]}
    return {"work": work, "images": images, "runs": runs}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(run: Path, *extra: str, tmpdir: Path | None = None):
    """``pipeline.py serve RUN`` in a subprocess, ready (``/health``), stopped at the end; yields its base URL."""
    port = free_port()
    env = {**os.environ, **({"TMPDIR": str(tmpdir)} if tmpdir else {})}
    env.pop("SANF_AD_TOKEN", None)
    proc = subprocess.Popen([sys.executable, "pipeline.py", "serve", str(run), "--port", str(port), "--alpha", ALPHA,
                             "--device", "cpu", *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, "the server did not get ready"
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def post(url: str, paths: list[Path], headers=None) -> httpx.Response:
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in paths]
    return httpx.post(f"{url}/predict", files=files, headers=headers, timeout=60)


@pytest.mark.parametrize("runtime", ["pytorch", "onnx"])
@pytest.mark.parametrize("method", ["sanf", "knn"])
def test_the_service_answers_what_predict_writes(served, method, runtime):
    """60 images in requests of 7: every item's decision equals predict's, the scores and p-values within float
    rounding, named by the upload's file name, with the threshold of the run's calibration."""
    entry = served["runs"][method]
    extra = ("--onnx", str(entry["onnx"])) if runtime == "onnx" else ()
    expected = {Path(r["path"]).name + Path(r["path"]).parent.name: r for r in entry["csv"]}
    with server(entry["run"], *extra) as url:
        model = httpx.get(f"{url}/model").json()
        assert model["method"] == method and model["normal_name"] == "blue" and model["calibration_rows"] == 10
        assert model["runtime"] == ("onnxruntime" if runtime == "onnx" else "pytorch")
        items = []
        images = served["images"]
        for start in range(0, len(images), 7):
            response = post(url, images[start:start + 7])
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["alpha"] == float(ALPHA) and body["threshold"] == model["calibration"]["threshold"]
            items += [(p, item) for p, item in zip(images[start:start + 7], body["items"], strict=True)]
    assert len(items) == 60
    flagged = 0
    for path, item in items:
        row = expected[path.name + path.parent.name]
        assert item["file"] == path.name and item["error"] == ""
        assert list(item) == ["file", "score", *model["scores"], "p_value", "anomalous", "error"]
        for key in ("score", *model["scores"], "p_value"):
            assert item[key] == pytest.approx(float(row[key]), rel=1e-4, abs=1e-5), (path, key)
        assert item["anomalous"] == int(row["anomalous"])
        flagged += item["anomalous"]
        threshold = model["calibration"]["threshold"]
        assert bool(item["anomalous"]) == (item["score"] > threshold)  # the page's threshold line is the decision's
    assert 0 < flagged < 60  # decisions go both ways: the comparison means something


def _hostile(tmp: Path) -> dict[str, tuple[bytes, int, str]]:
    """name -> (bytes, expected status, a word of the reason)."""
    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(png, "PNG")
    bomb = io.BytesIO()
    Image.new("1", (10000, 9000)).save(bomb, "PNG")  # 90 M pixels > PIL's 89.5 M limit, a few KB on the wire
    big = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (400, 400, 3), dtype=np.uint8)).save(big, "PNG")
    wide = io.BytesIO()
    Image.new("1", (8000, 6000)).save(wide, "PNG")  # 48 M pixels: under PIL's limit, over the server's 40 M
    thin = io.BytesIO()
    Image.new("1", (2_000_000, 1)).save(thin, "PNG")  # 2 M pixels, but over 2,000 M once resized to 32 px high
    return {"notes.png": (b"this is not an image at all", 422, "not an image"),
            "wide.png": (wide.getvalue(), 413, "more than the server decodes"),
            "thin.png": (thin.getvalue(), 413, "px on its shorter side it would have"),
            "cut.png": (png.getvalue()[:len(png.getvalue()) // 2], 422, "truncated"),
            "bomb.png": (bomb.getvalue(), 422, "decompression bomb"),
            "big.png": (big.getvalue(), 413, "--max-upload-mb")}


def test_hostile_uploads_get_a_4xx_naming_the_file_and_the_server_goes_on(served, tmp_path):
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    good = served["images"][0]
    with server(served["runs"]["knn"]["run"], "--max-upload-mb", "0.2", tmpdir=tmpdir) as url:
        for name, (data, status, reason) in _hostile(tmp_path).items():
            files = [("files", (good.name, good.read_bytes(), "image/png")), ("files", (name, data, "image/png"))]
            response = httpx.post(f"{url}/predict", files=files, timeout=60)
            assert response.status_code == status, (name, response.text)
            detail = response.json()["detail"]
            assert detail["file"] == name and reason in detail["reason"], detail
            assert httpx.get(f"{url}/health").json()["ready"] is True
        assert post(url, [good]).status_code == 200  # still serving
        huge = httpx.post(f"{url}/predict", files=[("files", ("huge.png", b"0" * (20 * 1024 * 1024), "image/png"))],
                          timeout=120)  # beyond what a request may carry: refused before it is read
        assert huge.status_code == 413 and "larger than the server accepts" in huge.json()["detail"]["reason"]
        assert httpx.get(f"{url}/health").status_code == 200

        def chunks():  # a chunked body (no Content-Length) beyond the request limit
            yield b'--b\r\nContent-Disposition: form-data; name="files"; filename="c.png"\r\n\r\n'
            for _ in range(30):
                yield b"0" * (1024 * 1024)
            yield b"\r\n--b--\r\n"

        chunked = httpx.post(f"{url}/predict", content=chunks(), timeout=120,
                             headers={"Content-Type": "multipart/form-data; boundary=b"})
        assert chunked.status_code == 413 and "larger than the server accepts" in chunked.json()["detail"]["reason"]
        empty = httpx.post(f"{url}/predict", timeout=60)
        assert empty.status_code == 422 and "no images" in empty.json()["detail"]["reason"]
        for n in (65, 66):  # one over the limit, and more: the same 413
            many = httpx.post(f"{url}/predict", files=[("files", (f"{i}.png", b"x", "image/png")) for i in range(n)],
                              timeout=60)
            assert many.status_code == 413, many.text
            assert many.json()["detail"]["reason"] == "more than 64 files; at most 64 per request"
        assert httpx.get(f"{url}/health").status_code == 200
    assert list(tmpdir.iterdir()) == []  # no temporary file left


def test_with_a_token_requests_without_it_get_401(served):
    good = served["images"][:1]
    with server(served["runs"]["knn"]["run"], "--token", "s3cret") as url:
        assert post(url, good).status_code == 401
        assert post(url, good, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(f"{url}/model").status_code == 401
        assert httpx.post(f"{url}/predict", timeout=60).status_code == 401  # refused before the body is looked at
        assert post(url, good, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert post(url, good, headers={"Authorization": "bearer s3cret"}).status_code == 200  # the scheme's case
        assert httpx.get(f"{url}/health").status_code == 200  # for load balancers: no token


def _other_address() -> str | None:
    """An address of this machine that is not loopback, or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent: this only picks the outgoing interface
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_without_host_the_server_is_not_reachable_on_other_interfaces(served):
    address = _other_address()
    if address is None:
        pytest.skip("this machine has no network interface besides loopback")
    with server(served["runs"]["knn"]["run"]) as url:
        port = int(url.rsplit(":", 1)[1])
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://{address}:{port}/health", timeout=5)
        assert httpx.get(f"{url}/health").status_code == 200


def test_concurrent_clients_are_served_in_shared_forwards_without_errors(served):
    """8 clients, 200 requests of one image: no error, each answer the image's own, fewer forwards than requests."""
    images = served["images"]
    with server(served["runs"]["knn"]["run"], "--max-batch", "8") as url:
        alone = {p.name + p.parent.name: post(url, [p]).json()["items"][0]["score"] for p in images[:20]}
        before = httpx.get(f"{url}/health").json()["forwards"]

        def one(i: int):
            path = images[i % 20]
            response = post(url, [path])
            return path, response.status_code, response.json()

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, range(200)))
        forwards = httpx.get(f"{url}/health").json()["forwards"] - before
    assert all(status == 200 for _, status, _ in results)
    for path, _, body in results:
        assert body["items"][0]["score"] == pytest.approx(alone[path.name + path.parent.name], rel=1e-4, abs=1e-5)
    assert forwards < 200


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium)")
def test_the_page_shows_the_decisions_the_api_gives(served, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    chosen = [served["images"][0], served["images"][-1]]  # a blue (normal) and a red image
    with server(served["runs"]["sanf"]["run"]) as url:
        api = {item["file"]: item for item in post(url, chosen).json()["items"]}
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            try:
                page = browser.new_page(viewport={"width": 1000, "height": 800})
                page.goto(url)
                page.wait_for_selector("#model:has-text('held-out normal images')")
                page.set_input_files("#files", [str(p) for p in chosen])
                page.wait_for_function("document.querySelectorAll('tr.result').length === 2")
                rows = page.eval_on_selector_all("tr.result", "rows => rows.map(r => [r.querySelector('.file')"
                                                 ".textContent, r.querySelector('.decision').textContent, "
                                                 "r.querySelector('.score').textContent])")
                shot = os.environ.get("SANF_AD_SCREENSHOT")
                page.screenshot(path=shot or str(tmp_path / "page.png"), full_page=True)
            finally:
                browser.close()
    assert [r[0] for r in rows] == [p.name for p in chosen]
    for file, decision, score in rows:
        assert decision == ("anomalous" if api[file]["anomalous"] else "normal")
        assert float(score) == pytest.approx(api[file]["score"], rel=1e-5)


def test_serve_refuses_a_folder_that_is_not_a_run_in_one_line(tmp_path):
    result = invoke("serve", str(tmp_path))
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"Error: run {tmp_path}: cannot read run.json ([Errno 2] No such "
                                                  f"file or directory: '{tmp_path}/run.json')"]


@pytest.mark.parametrize("args, env, message", [
    ((), {"SANF_AD_TOKEN": ""}, "Error: --token must not be empty; got SANF_AD_TOKEN='' (unset it to serve without "
                                "a token)"),  # an unset secret in a deployment: not an open service
    (("--host", ""), {}, "Error: --host must name an interface (127.0.0.1: this machine only, 0.0.0.0: every "
                         "interface); got ''"),  # the empty host would bind every interface
    (("--max-upload-mb", "1e308"), {}, "Error: --max-upload-mb must be at most 4096 (MiB per file); got 1e+308"),
])
def test_serve_settings_that_would_open_or_break_the_service_are_refused_in_one_line(served, args, env, message):
    result = CliRunner().invoke(cli, ["serve", str(served["runs"]["knn"]["run"]), "--port", str(free_port()), *args],
                                env=env)
    assert result.exit_code == 2 and result.output.strip().splitlines() == [message], result.output


def test_a_run_that_cannot_be_loaded_stops_the_server_with_one_line(served):
    """--onnx of another run: the server does not stay up answering 503 forever; it exits 2 saying why."""
    port = free_port()
    done = subprocess.run([sys.executable, "pipeline.py", "serve", str(served["runs"]["knn"]["run"]), "--onnx",
                           str(served["runs"]["sanf"]["onnx"]), "--port", str(port), "--device", "cpu"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("Error: --onnx ")
    assert "was exported from another run" in done.stderr


def test_a_port_in_use_is_refused_in_one_line(served):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = invoke("serve", str(served["runs"]["knn"]["run"]), "--port", str(port))
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"Error: --host 127.0.0.1 --port {port}: cannot listen there "
                                                  "(Address already in use); choose another --port"]
