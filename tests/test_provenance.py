"""Provenance that cannot lie: the attention route that ran, the text a cell was scored on (stdlib is the running
Python's), a hub model's revision; and a resumed run reads the text it began with."""

import json
import shutil

import pandas as pd
import pytest

from lenx.attention import backend_taken
from lenx.cli import main
from lenx.data.corpora import load_spec

from .test_training import stop_training_at

TINY = ["--train-len", "16", "--batch-size", "4", "--layers", "1", "--d-model", "32", "--heads", "2", "--steps", "4",
        "--save-every", "2"]


def lenx(*args) -> int:
    return main([str(a) for a in args])


def one_line_error(capsys, code, *needles):
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("lenx: error: "), err
    for n in needles:
        assert n in err, err


@pytest.mark.parametrize("routes, asked, recorded", [
    ({"stored"}, "flex", "sdpa"),  # flex off CUDA ran the sdpa routes
    ({"blocked"}, "flex", "sdpa"),  # and for a bias without a score_mod, sdpa's blocked fallback
    ({"flex"}, "flex", "flex"),
    ({"separable", "blocked"}, "sdpa", "sdpa"),
    ({"blocked"}, "blocked", "blocked"),
    ({"materialized"}, "materialized", "materialized"),
    (set(), "sdpa", "sdpa"),  # nothing recorded (an HF model, a compiled one): what was asked
])
def test_the_backend_recorded_is_the_one_whose_routes_ran(routes, asked, recorded):
    assert backend_taken(routes, asked) == recorded


@pytest.mark.parametrize("pe", ["shaw", "fire"])
def test_a_flex_run_that_falls_back_records_the_route_it_took(pe, tmp_path, text_dataset):
    """On a CPU --attn-backend flex runs the sdpa routes (FlexAttention is CUDA's): run.json and every row say so."""
    run, out = tmp_path / pe, tmp_path / "res"
    assert lenx("train", "--pe", pe, *TINY, "--dataset", text_dataset, "--out", run) == 0
    info = json.loads((run / "run.json").read_text())
    assert info["attn_backend"] == "sdpa" and info["attn_route"] and "flex" not in info["attn_route"]
    assert lenx("eval", run, "--lengths", "16,128", "--tokens", "128", "--attn-backend", "flex", "--out", out,
                "--probe", "passkey", "--probe-trials", "2", "--probe-depths", "0.5") == 0
    for table in ("results", "probes"):
        df = pd.read_parquet(out / f"{table}.parquet")
        df = df[df["note"].fillna("") == ""]  # scored (a probe that does not fit its window runs no forward)
        assert len(df), table
        assert set(df["attn_backend"]) == {"sdpa"}, table
        assert df["attn_route"].notna().all() and not df["attn_route"].str.contains("flex").any(), table


def test_stdlib_cells_of_another_python_are_not_reused(tmp_path, capsys, monkeypatch, text_dataset):
    """stdlib is the running interpreter's standard library: under another Python (here: its files seen as another
    set) a finished stdlib cell is refused in one line, not silently reused."""
    from lenx.data import corpora

    run, out = tmp_path / "rope", tmp_path / "res"
    assert lenx("train", "--pe", "rope", *TINY, "--dataset", text_dataset, "--out", run) == 0
    cell = ["eval", run, "--dataset", "stdlib", "--lengths", "16", "--tokens", "32", "--out", out]
    assert lenx(*cell) == 0
    assert lenx(*cell) == 0  # the same Python: the cell stands
    files = corpora.stdlib_files

    def another_python():
        root, found = files()
        return root, found[: len(found) // 2]

    monkeypatch.setattr(corpora, "stdlib_files", another_python)
    load_spec.cache_clear()
    try:
        capsys.readouterr()
        one_line_error(capsys, lenx(*cell), "other text", "standard library of another Python", "another --out")
    finally:
        load_spec.cache_clear()


def test_a_resumed_run_refuses_text_that_changed_since_it_began(tmp_path, capsys, monkeypatch, text_dataset):
    run = tmp_path / "run"
    args = ("train", "--pe", "alibi", *TINY, "--dataset", text_dataset, "--out", run)
    stop_training_at(monkeypatch, 3)
    assert lenx(*args) == 130
    monkeypatch.undo()
    (text_dataset / "doc00.txt").write_text("an edited document " * 50)
    load_spec.cache_clear()
    capsys.readouterr()
    one_line_error(capsys, lenx(*args), "began on other text", "--overwrite")
    assert json.loads((run / "latest.json").read_text())["step"] == 2  # its checkpoint kept


def test_a_hub_models_cells_record_its_revision_and_an_update_is_not_mixed_in(tmp_path, capsys, monkeypatch,
                                                                           text_dataset):
    """A hub name is read from the HF cache (built here: models--org--name/snapshots/<sha>, refs/main); its rows'
    weights_id is the snapshot's commit, and after the cache moves to another commit the old cells are refused."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from .test_hf import hf_tokenizer  # noqa: F401  (a fixture function, called directly below)

    tok = hf_tokenizer.__wrapped__(None)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                      eos_token_id=tok.eos_token_id, bos_token_id=None)
    cache = tmp_path / "hub"
    repo = cache / "models--lenx-test--tiny-llama"
    first, second = "a" * 40, "b" * 40
    snap = repo / "snapshots" / first
    LlamaForCausalLM(cfg).save_pretrained(snap)
    assert isinstance(tok, PreTrainedTokenizerFast)
    tok.save_pretrained(snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(first)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "res"
    cell = ["eval", "--model", "lenx-test/tiny-llama", "--dataset", text_dataset, "--lengths", "16", "--tokens", "32",
            "--out", out]
    assert lenx(*cell) == 0, capsys.readouterr().err
    assert set(pd.read_parquet(out / "results.parquet")["weights_id"]) == {f"hub:{first}"}
    shutil.copytree(snap, repo / "snapshots" / second)
    (repo / "refs" / "main").write_text(second)
    capsys.readouterr()
    one_line_error(capsys, lenx(*cell), f"revision {first[:12]}", second[:12], "another --out")
