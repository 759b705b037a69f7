"""push: real huggingface_hub client code against a local Hub (tests/hub_server.py); files arrive byte for byte,
the token never shows, and offline / refused-token / no-token paths end in one line."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from huggingface_hub import constants

import adaptermerge
from adaptermerge.errors import PublishError, UsageError, ValidationFailed
from adaptermerge_cli.main import cli
from tests.helpers import make_adapter, tiny_llama
from tests.hub_server import LocalHub

TOKEN = "hf_test_SECRET_token_0123456789"


@pytest.fixture(autouse=True)
def hub_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No real Hub, no user token cache: HF_HOME and the token file in tmp, a dummy HF_TOKEN, online mode for
    huggingface_hub (conftest sets HF_HUB_OFFLINE for everything else)."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf_home" / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A combined adapter as adaptermerge writes it: weights, config, card and recipe."""
    d = tmp_path_factory.mktemp("push")
    a = make_adapter(d / "a", tiny_llama, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return adaptermerge.save_combined(adaptermerge.combine([a]), d / "out")


def assert_arrived(hub: LocalHub, repo: str, folder: Path, branch: str = "main") -> None:
    got = hub.files(repo, branch)
    local = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert got == local  # every file, byte for byte, nothing else


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_push_regular_files_through_the_default_pipeline(folder: Path) -> None:
    with LocalHub(TOKEN) as hub:
        r = adaptermerge.push(folder, "me/merged", endpoint=hub.url, message="first")
        assert_arrived(hub, "me/merged", folder)
        calls = [c for c in hub.state.requests if c[1] != "/api/validate-yaml"]
        assert calls == [
            ("POST", "/api/repos/create"),
            ("POST", "/api/models/me/merged/preupload/main"),
            ("POST", "/api/models/me/merged/commit/main"),
        ]
        assert hub.state.repos["me/merged"].commits[0]["summary"] == "first"
        assert r.commit_oid == hub.state.repos["me/merged"].commits[0]["oid"] and not r.dry_run
        assert r.token_source == "HF_TOKEN" and TOKEN not in json.dumps(r.to_dict())
        # pushing again to the existing repo commits again (create_repo exist_ok)
        adaptermerge.push(folder, "me/merged", endpoint=hub.url)
        assert len(hub.state.repos["me/merged"].commits) == 2


def test_push_large_files_through_lfs_to_a_new_branch(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # with hf_xet installed the Hub's "lfs" answer sends files to Xet storage, which the local Hub does not speak;
    # without it huggingface_hub takes the LFS batch + PUT path, which it does
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    with LocalHub(TOKEN, lfs_suffixes=(".safetensors",)) as hub:
        adaptermerge.push(folder, "org/adapter", endpoint=hub.url, revision="v2", private=True)
        assert_arrived(hub, "org/adapter", folder, branch="v2")
        assert hub.state.repos["org/adapter"].private and hub.files("org/adapter", "main") == {}
        st = (folder / "adapter_model.safetensors").read_bytes()
        assert list(hub.state.lfs.values()) == [st]  # the weights went by LFS PUT, byte for byte
        paths = [p for _, p in hub.state.requests]
        assert "/api/models/org/adapter/branch/v2" in paths and "/org/adapter.git/info/lfs/objects/batch" in paths


def test_refused_token_is_one_line_and_never_shown(folder: Path) -> None:
    with LocalHub("hf_the_right_one") as hub:
        with pytest.raises(PublishError) as e:
            adaptermerge.push(folder, "me/x", endpoint=hub.url)
        assert "401" in str(e.value) and "\n" not in str(e.value) and TOKEN not in str(e.value)
        assert hub.state.repos == {}
        before = len(hub.state.requests)
        res = CliRunner().invoke(cli, ["push", str(folder), "me/x"], env={"HF_ENDPOINT": hub.url})
        # HF_ENDPOINT is honoured; create_repo(exist_ok=True) asks repo_info after a 401 before giving up
        assert hub.state.requests[before:] == [("POST", "/api/repos/create"), ("GET", "/api/models/me/x")]
    assert res.exit_code == 1 and TOKEN not in res.output and "401" in res.stderr


def test_unreachable_hub_and_offline_mode(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(PublishError, match="cannot reach the Hub") as e:
        adaptermerge.push(folder, "me/x", endpoint=f"http://127.0.0.1:{free_port()}")
    assert TOKEN not in str(e.value) and "\n" not in str(e.value)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PublishError, match="HF_HUB_OFFLINE"):
        adaptermerge.push(folder, "me/x", endpoint=f"http://127.0.0.1:{free_port()}")


def test_no_token_anywhere(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_TOKEN")
    with LocalHub(TOKEN) as hub:
        with pytest.raises(PublishError, match="no Hugging Face token"):
            adaptermerge.push(folder, "me/x", endpoint=hub.url)
        assert hub.state.requests == []


def test_dry_run_lists_files_and_card_without_network(folder: Path) -> None:
    with LocalHub(TOKEN) as hub:
        r = adaptermerge.push(folder, "me/x", endpoint=hub.url, dry_run=True)
        res = CliRunner().invoke(cli, ["push", str(folder), "me/x", "--dry-run"], env={"HF_ENDPOINT": hub.url})
        res_json = CliRunner().invoke(cli, ["push", str(folder), "me/x", "--dry-run", "--json"])
        assert hub.state.requests == []
    sizes = {p.name: p.stat().st_size for p in folder.iterdir()}
    assert dict(r.files) == sizes and r.total_bytes == sum(sizes.values()) and r.dry_run
    assert r.card["library_name"] == "peft" and "adaptermerge" in r.card["tags"]
    assert res.exit_code == 0 and TOKEN not in res.output and "from HF_TOKEN (not shown)" in res.stdout
    assert all(name in res.stdout for name in sizes) and "--- README.md ---" in res.stdout
    d = json.loads(res_json.stdout)
    assert d["dry_run"] and {f["path"]: f["size"] for f in d["files"]} == sizes and TOKEN not in res_json.output


def test_require_valid_refuses_a_failing_folder(folder: Path, tmp_path: Path) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    bad = shutil.copytree(folder, tmp_path / "bad")
    sd = load_file(str(bad / "adapter_model.safetensors"))
    next(iter(sd.values())).view(-1)[0] = float("nan")
    save_file(sd, str(bad / "adapter_model.safetensors"))
    with LocalHub(TOKEN) as hub:
        with pytest.raises(ValidationFailed, match="adapter.finite"):
            adaptermerge.push(bad, "me/x", endpoint=hub.url, require_valid=True)
        adaptermerge.push(folder, "me/x", endpoint=hub.url, require_valid=True)
        assert sorted(hub.files("me/x")) == sorted(p.name for p in folder.iterdir())


def test_bad_card_and_bad_repo_id_are_refused_before_any_request(folder: Path, tmp_path: Path) -> None:
    import shutil

    broken = shutil.copytree(folder, tmp_path / "broken")
    (broken / "README.md").write_text("---\nlibrary_name: [peft\n---\n# x\n")
    with LocalHub(TOKEN) as hub:
        with pytest.raises(PublishError, match="metadata does not parse"):
            adaptermerge.push(broken, "me/x", endpoint=hub.url)
        with pytest.raises(UsageError, match="not a Hub repo id"):
            adaptermerge.push(folder, "me/x/y", endpoint=hub.url)
        assert hub.state.requests == []


def test_cli_push_in_a_fresh_process_never_prints_the_token(folder: Path, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_TOKEN": TOKEN,
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_VERBOSITY": "debug",  # even huggingface_hub's debug log must not carry it
    }
    with LocalHub(TOKEN) as hub:
        env["HF_ENDPOINT"] = hub.url
        p = subprocess.run(
            [sys.executable, "-m", "adaptermerge_cli", "push", str(folder), "me/sub", "--message", "from cli"],
            capture_output=True, text=True, timeout=300, env=env,
        )  # fmt: skip
        assert p.returncode == 0, p.stderr
        assert_arrived(hub, "me/sub", folder)
    assert TOKEN not in p.stdout and TOKEN not in p.stderr
    assert "uploaded 4 files" in p.stdout and "commit:" in p.stdout
