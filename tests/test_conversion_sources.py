"""Official names -> URLs, downloads into the cache (no network: urlopen is replaced), and the push to the Hub
(huggingface_hub's client replaced by a recorder: the exact calls, and none after a failed verification)."""

import hashlib
import io
import urllib.error
from types import SimpleNamespace

import pytest
import yaml

import conversion.converter
import conversion.hub
import conversion.sources
from conversion import ConversionError, convert
from conversion.cli import main
from conversion.sources import official_url, parse_augreg_name
from conversion.testing import write_random_npz


AUGREG = "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_224"
BASE = "https://storage.googleapis.com/vit_models"


@pytest.mark.parametrize(
    "name, collection, url",
    [
        ("ViT-B_16", "imagenet21k", f"{BASE}/imagenet21k/ViT-B_16.npz"),
        ("imagenet21k/ViT-L_32", "imagenet21k", f"{BASE}/imagenet21k/ViT-L_32.npz"),
        ("imagenet21k/ViT-H_14.npz", "imagenet21k", f"{BASE}/imagenet21k/ViT-H_14.npz"),
        (
            "imagenet21k+imagenet2012/ViT-B_16-224",
            "imagenet21k+imagenet2012",
            f"{BASE}/imagenet21k%2Bimagenet2012/ViT-B_16-224.npz",
        ),
        (f"{BASE}/imagenet21k%2Bimagenet2012/ViT-L_16.npz", "imagenet21k+imagenet2012", None),
        (AUGREG, "augreg", f"{BASE}/augreg/{AUGREG}.npz"),
        (f"augreg/{AUGREG}.npz", "augreg", f"{BASE}/augreg/{AUGREG}.npz"),
        ("S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0", "augreg", None),
    ],
)
def test_official_names_resolve_to_public_urls(name, collection, url):
    found = official_url(name)
    assert found is not None and found[0] == collection
    if url:
        assert found[2] == url


@pytest.mark.parametrize("name", ["ViT-B_17", "imagenet2012/ViT-B_16", "imagenet21k/ViT-B_16-224", "B_16-i21k"])
def test_unknown_names_do_not_resolve(name):
    assert official_url(name) is None


def test_augreg_hyper_parameters_are_parsed_from_the_name():
    fields = parse_augreg_name(AUGREG + ".npz")
    assert fields == {
        "model": "B_16",
        "pretrain_dataset": "imagenet-21k",
        "epochs": "300",
        "lr": "0.001",
        "aug": "medium1",
        "wd": "0.1",
        "dropout": "0.0",
        "stochastic_depth": "0.0",
        "finetune_dataset": "imagenet-1k",
        "finetune_steps": "20k",
        "finetune_lr": "0.01",
        "finetune_resolution": "224",
    }
    assert parse_augreg_name("ViT-B_16.npz") is None


class FakeResponse(io.BytesIO):
    def __init__(self, data):
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data))}


def test_official_name_is_downloaded_once_into_the_cache_with_its_sha256(tmp_path, monkeypatch):
    payload = write_random_npz(tmp_path / "served.npz", num_classes=1000).read_bytes()
    requested = []

    def urlopen(url, timeout=None):
        requested.append(url)
        return FakeResponse(payload)

    monkeypatch.setattr(conversion.sources.urllib.request, "urlopen", urlopen)
    cache = tmp_path / "cache"
    folder = convert("imagenet21k+imagenet2012/ViT-B_16-224", tmp_path / "out", cache_dir=cache, log=None)
    assert requested == [f"{BASE}/imagenet21k%2Bimagenet2012/ViT-B_16-224.npz"]
    cached = cache / "imagenet21k+imagenet2012" / "ViT-B_16-224.npz"
    digest = hashlib.sha256(payload).hexdigest()
    assert cached.read_bytes() == payload
    assert (cache / "imagenet21k+imagenet2012" / "ViT-B_16-224.npz.sha256").read_text().split()[0] == digest
    meta = yaml.safe_load((folder / "README.md").read_text().split("---\n")[1])
    assert meta["source_url"] == requested[0] and meta["source_sha256"] == digest
    assert meta["datasets"] == ["imagenet-21k", "imagenet-1k"]

    def offline(url, timeout=None):
        raise AssertionError("the cached file must be used")

    monkeypatch.setattr(conversion.sources.urllib.request, "urlopen", offline)
    convert("imagenet21k+imagenet2012/ViT-B_16-224", tmp_path / "again", cache_dir=cache, verify=False, log=None)


def test_offline_download_names_the_url_and_where_to_put_the_file(tmp_path, monkeypatch, capsys):
    def offline(url, timeout=None):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(conversion.sources.urllib.request, "urlopen", offline)
    cache = tmp_path / "cache"
    code = main(["ViT-L_16", str(tmp_path / "out"), "--cache-dir", str(cache)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"{BASE}/imagenet21k/ViT-L_16.npz" in err and str(cache / "imagenet21k" / "ViT-L_16.npz") in err
    assert not (tmp_path / "out").exists() and not cache.exists()  # not even the cache's empty folders


def test_truncated_download_is_discarded(tmp_path, monkeypatch):
    class Short(FakeResponse):
        def __init__(self):
            super().__init__(b"PK\x03\x04" + b"\x00" * 10)
            self.headers = {"Content-Length": "1000"}

    monkeypatch.setattr(conversion.sources.urllib.request, "urlopen", lambda url, timeout=None: Short())
    with pytest.raises(ConversionError, match="received 14 of 1000 bytes"):
        convert("ViT-B_32", tmp_path / "out", cache_dir=tmp_path / "cache", log=None)
    assert not list((tmp_path / "cache").rglob("*.npz*"))


class RecordingHub:
    """Stands in for huggingface_hub.HfApi: records every call, never touches the network."""

    calls: list = []

    def __init__(self, *args, **kwargs):
        RecordingHub.calls.append(("HfApi", args, kwargs))

    def __getattr__(self, name):
        def record(*args, **kwargs):
            RecordingHub.calls.append((name, args, kwargs))
            return SimpleNamespace(commit_url=f"https://huggingface.co/{kwargs.get('repo_id')}/commit/abc")

        return record


@pytest.fixture
def hub(monkeypatch):
    RecordingHub.calls = []
    monkeypatch.setattr(conversion.hub, "HfApi", RecordingHub)
    return RecordingHub


def test_push_to_hub_creates_the_repo_and_uploads_the_verified_folder(tmp_path, hub):
    npz = write_random_npz(tmp_path / "vit.npz")
    folder = convert(npz, tmp_path / "out", push_to_hub="someone/vit-tiny", private=True, revision="v1", log=None)
    assert hub.calls == [
        ("HfApi", (), {}),
        ("create_repo", (), {"repo_id": "someone/vit-tiny", "repo_type": "model", "private": True, "exist_ok": True}),
        ("create_branch", (), {"repo_id": "someone/vit-tiny", "repo_type": "model", "branch": "v1", "exist_ok": True}),
        (
            "upload_folder",
            (),
            {
                "repo_id": "someone/vit-tiny",
                "repo_type": "model",
                "folder_path": str(folder),
                "revision": "v1",
                "commit_message": "Upload out converted by hf-vit-convert",
            },
        ),
    ]


def test_push_without_revision_creates_no_branch(tmp_path, hub):
    npz = write_random_npz(tmp_path / "vit.npz")
    code = main([str(npz), str(tmp_path / "out"), "--push-to-hub", "someone/vit", "--quiet"])
    assert code == 0
    assert [name for name, _, _ in hub.calls] == ["HfApi", "create_repo", "upload_folder"]
    assert hub.calls[1][2]["private"] is False and hub.calls[2][2]["revision"] is None


def test_failed_verification_uploads_nothing(tmp_path, hub, monkeypatch, capsys):
    npz = write_random_npz(tmp_path / "vit.npz")
    real = conversion.converter.flax_vit_forward

    def wrong_reference(*args, **kwargs):
        features, logits = real(*args, **kwargs)
        return features, logits + 1.0

    monkeypatch.setattr(conversion.converter, "flax_vit_forward", wrong_reference)
    code = main([str(npz), str(tmp_path / "out"), "--push-to-hub", "someone/vit"])
    assert code == 2 and "Verification failed" in capsys.readouterr().err
    assert hub.calls == [] and not (tmp_path / "out").exists()


def test_failed_upload_keeps_the_folder_and_says_so(tmp_path, monkeypatch, capsys):
    class Unauthorized(RecordingHub):
        def create_repo(self, **kwargs):
            raise PermissionError("401 Unauthorized")

    monkeypatch.setattr(conversion.hub, "HfApi", Unauthorized)
    npz = write_random_npz(tmp_path / "vit.npz")
    code = main([str(npz), str(tmp_path / "out"), "--push-to-hub", "someone/vit", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "401 Unauthorized" in err and "hf auth login" in err
    assert (tmp_path / "out" / "model.safetensors").is_file()
