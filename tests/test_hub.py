"""Hub names when the Hub cannot be reached: one line at once (no retries), the HF cache still answering."""

import os
import socket
import subprocess
import sys

import datasets.config
import pandas as pd
import pytest
from huggingface_hub import constants

from lenx import data, hub

UNREACHABLE = "http://127.0.0.1:9"  # the discard port: nothing listens, the connection is refused at once


@pytest.fixture
def no_hub(monkeypatch):
    """Online by the environment, with an endpoint that refuses connections (and no proxy in between)."""
    for var in [k for k in os.environ if "proxy" in k.lower()]:
        monkeypatch.delenv(var)
    monkeypatch.setattr(constants, "ENDPOINT", UNREACHABLE)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    hub.unreachable.cache_clear()
    yield
    hub.unreachable.cache_clear()


def test_probe_tells_a_listening_endpoint_from_a_refusing_one(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert hub.reachable()
    for var in [k for k in os.environ if "proxy" in k.lower()]:
        monkeypatch.delenv(var)
    monkeypatch.setattr(constants, "ENDPOINT", UNREACHABLE)
    assert not hub.reachable()
    monkeypatch.setattr(constants, "ENDPOINT", "https://no-such-host.invalid")
    assert not hub.reachable()


def test_probe_goes_to_the_proxy_when_one_is_set(monkeypatch):
    monkeypatch.setattr(constants, "ENDPOINT", "https://huggingface.co")
    for var in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    assert hub.probe_address() == ("huggingface.co", 443)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert hub.probe_address() == ("proxy.example", 3128)
    monkeypatch.setenv("NO_PROXY", "huggingface.co")
    assert hub.probe_address() == ("huggingface.co", 443)


def test_unreachable_hub_turns_offline_mode_on_inside_only(no_hub):
    assert hub.offline_reason() == "unreachable"
    with hub.offline_unless_reachable() as reason:
        assert reason == "unreachable"
        assert constants.HF_HUB_OFFLINE and datasets.config.HF_HUB_OFFLINE
    assert not constants.HF_HUB_OFFLINE and not datasets.config.HF_HUB_OFFLINE


def test_offline_by_environment_is_not_probed(monkeypatch):
    monkeypatch.setattr(constants, "ENDPOINT", UNREACHABLE)
    monkeypatch.setattr(hub, "reachable", lambda *a, **k: pytest.fail("probed although offline by the environment"))
    hub.unreachable.cache_clear()
    assert constants.HF_HUB_OFFLINE  # conftest sets HF_HUB_OFFLINE=1
    assert hub.offline_reason() == "environment"
    with hub.offline_unless_reachable() as reason:
        assert reason == "environment"


def test_local_dataset_still_loads_with_the_hub_unreachable(no_hub, tmp_path, monkeypatch):
    """The load_dataset path under the forced offline mode: what is on disk (or in the cache) still loads."""
    monkeypatch.setenv("LENX_CACHE", str(tmp_path / "cache"))
    one = tmp_path / "one"
    one.mkdir()
    pd.DataFrame({"text": [f"document {i}" for i in range(40)]}).to_parquet(one / "data.parquet")
    corpus = data.load_hub("one", data.HubDataset(str(one), None))
    assert sum(len(docs) for docs in corpus.splits.values()) == 40


@pytest.mark.parametrize("args, needles", [
    (["eval", "--model", "gpt2", "--max-len", "64"], ["cannot load model 'gpt2'"]),
    (["train", "--pe", "nope", "--dataset", "wikitext-2"],
     ["cannot load dataset 'wikitext-2'", "local copy as the dataset (--dataset, or train.dataset in a sweep config"]),
    (["train", "--pe", "nope", "--tokenizer", "gpt2"], ["cannot load tokenizer 'gpt2'"]),
])
def test_hub_names_without_a_hub_fail_in_one_line_without_retries(args, needles, tmp_path):
    """Not offline by the environment, and the endpoint refuses: huggingface_hub would retry with back-off and
    log each retry; lenx probes once, loads from the (empty) cache, and prints one line."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE") and "proxy" not in k.lower()}
    env.update(HF_ENDPOINT=UNREACHABLE, HF_HOME=str(tmp_path / "hf"), HF_DATASETS_CACHE=str(tmp_path / "ds"))
    proc = subprocess.run([sys.executable, "-m", "lenx", *args, "--out", str(tmp_path / "out")], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert all(n in proc.stderr for n in needles) and "the Hub cannot be reached" in proc.stderr, proc.stderr
