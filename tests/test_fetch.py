"""`mta data fetch lamp` against a local HTTP server (the real host is unreachable here)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from mta.data.fetch import download, fetch_lamp, lamp_urls
from mta.data.readers import load_dataset
from mta.errors import MtaError


class Server:
    """Serves ``files`` (path -> bytes) with Range support; can cut a response short."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.cut_after: int | None = None  # send only this many bytes, then close
        self.ranges: list[str | None] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # keep test output clean
                pass

            def do_GET(self):
                outer.ranges.append(self.headers.get("Range"))
                body = outer.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start = 0
                rng = self.headers.get("Range")
                if rng:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(body):
                        self.send_response(416)
                        self.end_headers()
                        return
                    self.send_response(206)
                else:
                    self.send_response(200)
                part = body[start:]
                self.send_header("Content-Length", str(len(part)))
                self.end_headers()
                if outer.cut_after is not None:
                    self.wfile.write(part[: outer.cut_after])
                    self.wfile.flush()
                    outer.cut_after = None
                    self.connection.shutdown(2)
                    return
                self.wfile.write(part)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def lamp_server(lamp_official: Path):
    q = (lamp_official / "dev_questions.json").read_bytes()
    o = (lamp_official / "dev_outputs.json").read_bytes()
    srv = Server({"/LaMP_2/new/dev/dev_questions.json": q, "/LaMP_2/new/dev/dev_outputs.json": o,
                  "/LaMP_4/dev/dev_questions.json": b"[not json"})
    yield srv
    srv.close()


def test_urls():
    assert lamp_urls(3, "train", base="http://h") == [
        "http://h/LaMP_3/train/train_questions.json", "http://h/LaMP_3/train/train_outputs.json"]
    assert lamp_urls(2, "dev", "time", base="http://h")[0] == \
        "http://h/time/LaMP_2/new/dev/dev_questions.json"
    with pytest.raises(MtaError, match="--task must be one of"):
        lamp_urls(6, "dev")
    with pytest.raises(MtaError, match="test golds are not public"):
        lamp_urls(2, "test")


def test_fetch_then_read(tmp_path, lamp_server):
    paths = fetch_lamp(2, "dev", tmp_path / "out", base=lamp_server.url)
    assert [p.name for p in paths] == ["dev_questions.json", "dev_outputs.json"]
    assert load_dataset(tmp_path / "out").task == "lamp2"
    # a second run is a no-op: no request is made
    n = len(lamp_server.ranges)
    fetch_lamp(2, "dev", tmp_path / "out", base=lamp_server.url)
    assert len(lamp_server.ranges) == n


def test_interrupted_download_resumes(tmp_path, lamp_server):
    url = lamp_server.url + "/LaMP_2/new/dev/dev_questions.json"
    dest = tmp_path / "dev_questions.json"
    lamp_server.cut_after = 100
    with pytest.raises(MtaError, match="rerun to resume"):
        download(url, dest)
    part = dest.with_name(dest.name + ".part")
    assert not dest.exists() and part.stat().st_size == 100
    download(url, dest)
    assert lamp_server.ranges[-1] == "bytes=100-"
    expected = lamp_server.files["/LaMP_2/new/dev/dev_questions.json"]
    assert dest.read_bytes() == expected and not part.exists()


def test_invalid_json_is_never_visible(tmp_path, lamp_server):
    dest = tmp_path / "out" / "dev_questions.json"
    with pytest.raises(MtaError, match="not valid JSON"):
        download(lamp_server.url + "/LaMP_4/dev/dev_questions.json", dest)
    assert not list(dest.parent.iterdir())


def test_http_error_and_unreachable(tmp_path, lamp_server):
    with pytest.raises(MtaError, match="HTTP 404"):
        download(lamp_server.url + "/missing.json", tmp_path / "x.json")
    with pytest.raises(MtaError, match="cannot connect"):
        download("http://127.0.0.1:9/x.json", tmp_path / "y.json", timeout=2)


def test_cli_fetch(tmp_path, lamp_server):
    from mta.cli.main import main

    rc = main(["data", "fetch", "lamp", "--task", "2", "--split", "dev", "--out",
               str(tmp_path / "o"), "--base-url", lamp_server.url])
    assert rc == 0
    assert json.loads((tmp_path / "o" / "dev_outputs.json").read_text())["task"] == "LaMP_2"
