"""The shared downloader against a real HTTP server on 127.0.0.1 serving files the tests make."""

import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import torch

from ddpm_seg import cli
from ddpm_seg.commands import download
from ddpm_seg.config import load_experiment
from guided_diffusion.checkpoint import read_model_flags
from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = bytes(range(256)) * 1200  # 307200 bytes: several reads, cut in the middle of one


class ServerState:
    """What the local server serves and what it saw; tests change it between requests."""

    def __init__(self):
        self.files = {}  # request path (with query) -> body
        self.requests = []  # (path, Range header or None)
        self.cut_once = set()  # paths whose next response stops halfway through the body
        self.ignore_range = False


def make_handler(state):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            byte_range = self.headers.get("Range")
            state.requests.append((self.path, byte_range))
            data = state.files.get(self.path)
            if data is None:
                self.send_error(404)
                return
            start = 0
            if byte_range and not state.ignore_range:
                start = int(byte_range.removeprefix("bytes=").rstrip("-"))
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.path in state.cut_once:
                state.cut_once.discard(self.path)
                body = body[: len(body) // 2]  # promised the whole body, then the connection closes
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    return Handler


@pytest.fixture
def server():
    state = ServerState()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield state
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def make_tar(members):
    """A .tar.gz in memory; members: name -> bytes (a file) or ("symlink", target)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            if isinstance(content, tuple):
                info.type, info.linkname = tarfile.SYMTYPE, content[1]
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


@pytest.fixture
def table(tmp_path):
    """A table like the packaged one: a checkpoint with an alternative source, and an archive."""
    entries = {
        "ckpt": {"urls": ["https://primary.invalid/models/ckpt.pt", "https://alt.invalid/alt/ckpt.pt?dl=1"],
                 "dest": "checkpoints/ckpt.pt", "sha256": None},
        "archive": {"urls": ["https://primary.invalid/datasets.tar.gz"], "dest": "datasets/datasets.tar.gz",
                    "extract_to": "datasets", "sha256": None},
    }
    path = tmp_path / "downloads.json"
    path.write_text(json.dumps(entries))
    return path


def run(args, table, root, base_url, capsys):
    rc = download.main(list(args) + ["--table", str(table), "--root", str(root), "--base-url", base_url])
    return rc, capsys.readouterr().err


def test_interrupted_transfer_resumes_with_range(server, table, tmp_path, capsys):
    server.files["/models/ckpt.pt"] = DATA
    server.cut_once.add("/models/ckpt.pt")
    dest, part = tmp_path / "checkpoints/ckpt.pt", tmp_path / "checkpoints/ckpt.pt.part"

    rc, err = run(["ckpt"], table, tmp_path, server.url, capsys)
    assert rc == 1 and f"stopped at {len(DATA) // 2} of {len(DATA)} bytes" in err
    assert not dest.exists() and part.stat().st_size == len(DATA) // 2

    rc, err = run(["ckpt"], table, tmp_path, server.url, capsys)
    assert rc == 0, err
    assert server.requests[-1] == ("/models/ckpt.pt", f"bytes={len(DATA) // 2}-")
    assert dest.read_bytes() == DATA and not part.exists()


def test_server_ignoring_range_restarts_cleanly(server, table, tmp_path, capsys):
    server.files["/models/ckpt.pt"] = DATA
    server.ignore_range = True
    part = tmp_path / "checkpoints/ckpt.pt.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"stale bytes that must not stay in front")

    rc, err = run(["ckpt"], table, tmp_path, server.url, capsys)
    assert rc == 0, err
    assert server.requests[-1][1] == f"bytes={len(b'stale bytes that must not stay in front')}-"
    assert (tmp_path / "checkpoints/ckpt.pt").read_bytes() == DATA and not part.exists()


def test_whole_part_left_before_rename_is_fetched_again(server, table, tmp_path, capsys):
    # A run killed between the last byte and the rename leaves a complete part: the server answers 416.
    server.files["/models/ckpt.pt"] = DATA
    part = tmp_path / "checkpoints/ckpt.pt.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(DATA)

    rc, err = run(["ckpt"], table, tmp_path, server.url, capsys)
    assert rc == 0, err
    assert server.requests == [("/models/ckpt.pt", f"bytes={len(DATA)}-"), ("/models/ckpt.pt", None)]
    assert (tmp_path / "checkpoints/ckpt.pt").read_bytes() == DATA


def test_wrong_checksum_leaves_nothing(server, table, tmp_path, capsys):
    server.files["/models/ckpt.pt"] = DATA
    entries = json.loads(table.read_text())
    entries["ckpt"]["sha256"] = "0" * 64
    table.write_text(json.dumps(entries))

    rc, err = run(["ckpt"], table, tmp_path, server.url, capsys)
    assert rc == 1
    assert f"expected {'0' * 64}, got {hashlib.sha256(DATA).hexdigest()}" in err
    assert not (tmp_path / "checkpoints/ckpt.pt").exists()
    assert not (tmp_path / "checkpoints/ckpt.pt.part").exists()


def test_404_on_every_source_names_urls_and_status(server, table, tmp_path, capsys):
    rc, err = run(["ckpt"], table, tmp_path, server.url, capsys)
    assert rc == 1
    assert f"{server.url}/models/ckpt.pt answered HTTP 404" in err
    assert f"{server.url}/alt/ckpt.pt?dl=1 answered HTTP 404" in err
    assert not (tmp_path / "checkpoints").exists()  # no empty folder is left behind either


def test_alternative_source_used_when_primary_fails(server, table, tmp_path, capsys, monkeypatch):
    server.files["/alt/ckpt.pt?dl=1"] = DATA
    monkeypatch.setenv(download.BASE_URL_ENV, server.url)  # the environment override, not --base-url
    rc = download.main(["ckpt", "--table", str(table), "--root", str(tmp_path)])
    assert rc == 0, capsys.readouterr().err
    assert [path for path, _ in server.requests] == ["/models/ckpt.pt", "/alt/ckpt.pt?dl=1"]
    assert (tmp_path / "checkpoints/ckpt.pt").read_bytes() == DATA


def test_unreachable_network_names_each_url(table, tmp_path, capsys):
    with socket.socket() as s:  # a loopback port with nothing listening: connections are refused at once
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    rc, err = run(["ckpt"], table, tmp_path, dead, capsys)
    assert rc == 1
    assert f"cannot reach {dead}/models/ckpt.pt" in err and f"cannot reach {dead}/alt/ckpt.pt?dl=1" in err
    assert "check the network connection" in err


def test_unknown_name_lists_valid_ones_and_exits_2(table, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["ddpm-seg", "download", "ckpt", "nope", "--table", str(table),
                                      "--root", str(tmp_path), "--base-url", "http://127.0.0.1:9"])
    assert cli.entry() == 2
    err = capsys.readouterr().err
    assert err == "ddpm-seg download: error: unknown download(s) 'nope'; valid names: ckpt, archive\n"
    assert os.listdir(tmp_path) == ["downloads.json"]  # nothing was fetched, not even the valid name


def test_archive_is_extracted_then_removed_and_not_fetched_again(server, table, tmp_path, capsys):
    archive = make_tar({"bedroom_28/real/train/0.npy": b"zero", "bedroom_28/real/test/1.npy": b"one"})
    server.files["/datasets.tar.gz"] = archive

    rc, err = run(["archive"], table, tmp_path, server.url, capsys)
    assert rc == 0, err
    assert (tmp_path / "datasets/bedroom_28/real/train/0.npy").read_bytes() == b"zero"
    assert (tmp_path / "datasets/bedroom_28/real/test/1.npy").read_bytes() == b"one"
    assert sorted(os.listdir(tmp_path / "datasets")) == [".datasets.tar.gz.sha256", "bedroom_28"]
    marker = (tmp_path / "datasets/.datasets.tar.gz.sha256").read_text()
    assert marker.split()[0] == hashlib.sha256(archive).hexdigest()

    rc, err = run(["archive"], table, tmp_path, server.url, capsys)
    assert rc == 0 and "already extracted" in err and len(server.requests) == 1


@pytest.mark.parametrize("members", [{"../evil.txt": b"x"}, {"/tmp/evil.txt": b"x"},
                                     {"ok.txt": b"x", "link": ("symlink", "/etc/passwd")}])
def test_unsafe_archive_is_refused_and_leaves_nothing(tmp_path, members):
    archive = tmp_path / "bad.tar.gz"
    archive.write_bytes(make_tar(members))
    into = tmp_path / "out" / "datasets"
    with pytest.raises(ValueError, match="bad.tar.gz: member"):
        download.extract_tar(str(archive), str(into))
    assert os.listdir(into) == []  # neither the member nor the temporary folder is left


def test_extraction_refuses_to_overwrite(tmp_path):
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(make_tar({"cat_15/x.txt": b"new"}))
    (tmp_path / "out/cat_15").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="cat_15"):
        download.extract_tar(str(archive), str(tmp_path / "out"))
    assert os.listdir(tmp_path / "out") == ["cat_15"] and os.listdir(tmp_path / "out/cat_15") == []


def test_record_then_verify(server, table, tmp_path, capsys):
    server.files["/models/ckpt.pt"] = DATA
    rc, err = run(["ckpt", "--record"], table, tmp_path, server.url, capsys)
    assert rc == 0, err
    recorded = json.loads(table.read_text())["ckpt"]["sha256"]
    assert recorded == hashlib.sha256(DATA).hexdigest()

    # A tampered local copy is reported and kept for inspection.
    dest = tmp_path / "checkpoints/ckpt.pt"
    dest.write_bytes(DATA[:-1] + b"\0")
    rc, err = run(["ckpt"], table, tmp_path, server.url, capsys)
    assert rc == 1 and f"expected {recorded}" in err and dest.exists()

    # A source that now serves other bytes fails verification against the recorded sum.
    dest.unlink()
    server.files["/models/ckpt.pt"] = DATA[::-1]
    rc, err = run(["ckpt"], table, tmp_path, server.url, capsys)
    assert rc == 1 and f"expected {recorded}, got {hashlib.sha256(DATA[::-1]).hexdigest()}" in err
    assert not dest.exists() and not (tmp_path / "checkpoints/ckpt.pt.part").exists()


def test_list_names_every_resource(table, capsys):
    assert download.main(["--list", "--table", str(table)]) == 0
    out = capsys.readouterr().out
    assert "ckpt" in out and "checkpoints/ckpt.pt" in out and "archive" in out and "datasets" in out


def test_packaged_table_has_the_official_sources():
    table = download.load_table()
    yandex = "https://storage.yandexcloud.net/yandex-research/ddpm-segmentation"
    names = ["lsun_bedroom", "ffhq", "lsun_cat", "lsun_horse"]
    datasets = ["bedroom_28", "ffhq_34", "cat_15", "horse_21"]
    expected = {"datasets", "pixel_classifiers"}
    expected |= {f"{b}/{n}" for b in ("ddpm", "mae", "swav", "swav_w2") for n in names}
    expected |= {f"synthetic/{g}/{d}" for g in ("ddpm", "gan") for d in datasets}
    expected |= {"deeplab/resnet101", "deeplab/resnet50", "ddpm/imagenet_256_uncond"}
    expected |= {"alae/ffhq", "alae/bedroom", "alae/celeba-hq256", "alae/celeba", "vdvae/ffhq256",
                 "gan_encoder/ffhq", "gan_encoder/horse", "dinov2/vitl14", "dinov2/vitl14_reg4", "dinov2/vitl14_timm"}
    expected |= {f"stylegan2/{n}" for n in ("ffhq", "cat", "horse", "vgg16", "lpips_vgg")}
    assert set(table) == expected
    assert table["vdvae/ffhq256"]["urls"] == [
        "https://openaipublic.blob.core.windows.net/very-deep-vaes-assets/vdvae-assets/ffhq256-iter-1700000-model-ema.th"]
    assert table["alae/bedroom"]["urls"] == ["https://alaeweights.s3.us-east-2.amazonaws.com/bedroom/model_final.pth"]
    assert table["stylegan2/horse"]["urls"] == [
        "https://nvlabs-fi-cdn.nvidia.com/stylegan2/networks/stylegan2-horse-config-f.pkl"]
    assert table["dinov2/vitl14"]["urls"] == ["https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth"]
    assert table["deeplab/resnet101"]["urls"] == ["https://download.pytorch.org/models/resnet101-63fe2227.pth"]
    assert table["datasets"]["urls"] == [f"{yandex}/datasets.tar.gz"]
    openai = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021"
    assert table["ddpm/lsun_cat"]["urls"] == [f"{yandex}/models/ddpm_checkpoints/lsun_cat.pt", f"{openai}/lsun_cat.pt"]
    assert table["ddpm/ffhq"]["urls"] == [f"{yandex}/models/ddpm_checkpoints/ffhq.pt"]
    assert table["swav_w2/lsun_horse"] == {"urls": [f"{yandex}/models/swav_w2_checkpoints/lsun_horse.pth"],
                                           "dest": "checkpoints/swav_w2/lsun_horse.pth", "sha256": None}
    assert table["synthetic/gan/cat_15"]["urls"] == [f"{yandex}/synthetic-datasets/gan/cat_15.tar.gz"]
    assert table["synthetic/gan/cat_15"]["extract_to"] == "synthetic-datasets/gan"
    dropbox = "https://www.dropbox.com/s/kap229jvmhfwh7i/pixel_classifiers.tar?dl=1"
    assert table["pixel_classifiers"]["urls"] == [dropbox]


def test_adm_imagenet_download_writes_its_model_flags(server, tmp_path, capsys, reference_dir):
    entry = download.load_table()["ddpm/imagenet_256_uncond"]
    assert entry["urls"] == ["https://openaipublic.blob.core.windows.net/diffusion/jul-2021/256x256_diffusion_uncond.pt"]
    table = tmp_path / "downloads.json"
    table.write_text(json.dumps({"adm": entry}))
    server.files["/diffusion/jul-2021/256x256_diffusion_uncond.pt"] = DATA
    rc, _ = run(["adm"], table, tmp_path, server.url, capsys)
    assert rc == 0
    checkpoint = tmp_path / "checkpoints/adm_imagenet/256x256_diffusion_uncond.pt"
    assert checkpoint.read_bytes() == DATA
    # train-interpreter and sweep read the flags beside the checkpoint: the LSUN models' architecture.
    flags = read_model_flags(str(checkpoint))
    assert flags == entry["model_flags"]
    with torch.device("meta"):
        model, diffusion = create_model_and_diffusion(**{**model_and_diffusion_defaults(), **flags})
    with open(os.path.join(reference_dir, "guided_diffusion_lsun256_state_dict.txt")) as f:
        expected = f.read().splitlines()[1:]
    assert [f"{k}\t{','.join(map(str, v.shape))}" for k, v in model.state_dict().items()] == expected
    assert diffusion.num_timesteps == 1000
    # The example config for one's own data reads it like the paper's LSUN configs read theirs.
    example = load_experiment(os.path.join(REPO, "experiments", "custom", "adm_imagenet.json"))
    horse = load_experiment(os.path.join(REPO, "experiments", "horse_21", "ddpm.json"))
    assert example.model_path == entry["dest"]
    assert [getattr(example, k) for k in ("dim", "steps", "blocks")] == [getattr(horse, k) for k in ("dim", "steps", "blocks")]


SCRIPTS = [
    ("datasets/download_datasets.sh", None, "datasets"),
    ("checkpoints/pixel_classifiers/download.sh", None, "pixel_classifiers"),
    ("checkpoints/ddpm/download_checkpoint.sh", "lsun_cat", "ddpm/lsun_cat"),
    ("checkpoints/mae/download_checkpoint.sh", "ffhq", "mae/ffhq"),
    ("checkpoints/swav/download_checkpoint.sh", "lsun_horse", "swav/lsun_horse"),
    ("checkpoints/swav_w2/download_checkpoint.sh", "lsun_bedroom", "swav_w2/lsun_bedroom"),
    ("checkpoints/deeplab/download_checkpoint.sh", "resnet101", "deeplab/resnet101"),
    ("checkpoints/alae/download_checkpoint.sh", "bedroom", "alae/bedroom"),
    ("checkpoints/vdvae/download_checkpoint.sh", "ffhq256", "vdvae/ffhq256"),
    ("checkpoints/gan_encoder/download_checkpoint.sh", "horse", "gan_encoder/horse"),
    ("checkpoints/dinov2/download_checkpoint.sh", "vitl14", "dinov2/vitl14"),
    ("checkpoints/stylegan2/download_checkpoint.sh", "cat", "stylegan2/cat"),
    ("synthetic-datasets/ddpm/download_synthetic_dataset.sh", "bedroom_28", "synthetic/ddpm/bedroom_28"),
    ("synthetic-datasets/gan/download_synthetic_dataset.sh", "horse_21", "synthetic/gan/horse_21"),
]


@pytest.mark.parametrize("script,arg,resource", SCRIPTS)
def test_scripts_call_the_shared_downloader(tmp_path, script, arg, resource):
    # A stand-in `ddpm-seg` that prints its arguments shows what each script asks the downloader for.
    stub = tmp_path / "ddpm-seg"
    stub.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    stub.chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    args = ([arg] if arg else []) + ["--record"]
    done = subprocess.run(["bash", os.path.join(REPO, script), *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["download", resource, "--root", REPO, "--record"]
    if arg:
        missing = subprocess.run(["bash", os.path.join(REPO, script)], env=env,
                                 capture_output=True, text=True, timeout=30)
        assert missing.returncode != 0 and "usage:" in missing.stderr and arg in missing.stderr
