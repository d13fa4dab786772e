"""One source per option: the dataclass fields of each command are its flags, its file keys and its defaults;
configs/default.yaml is what TrainConfig writes; and lenx installed from a wheel resolves the same defaults."""

import dataclasses
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lenx.cli import main
from lenx.config import DEFAULTS_FILE, FLAGS, TrainConfig, default_yaml, resolve
from lenx.eval_config import EVAL_FLAGS, EvalConfig
from lenx.options import file_keys, flag_of

ROOT = Path(__file__).resolve().parent.parent

# The flags of each command as they stood before the options were derived from the dataclasses; a flag that
# disappears breaks users' commands and the docs.
TRAIN_FLAGS = {"--pe", "--config", "--dataset", "--tokenizer", "--text-field", "--train-file", "--validation-file",
               "--test-file", "--train-len", "--steps", "--batch-size", "--grad-accum", "--layers", "--d-model",
               "--heads", "--d-ff", "--warmup", "--lr", "--seed", "--precision", "--compile", "--no-compile",
               "--save-every", "--out", "--overwrite", "--device", "--help",
               # the training mix (lenx.mix)
               "--mix", "--passkey-format",
               # randomized positions (Ruoss et al. 2023; docs/training.md)
               "--random-positions"}
EVAL_FLAG_SET = {"--max-len", "--lengths", "--tokens", "--out", "--runs-dir", "--device", "--rope-scaling",
                 "--rope-factor", "--protocol", "--stride", "--position-buckets", "--attn-backend", "--dataset",
                 "--text-field", "--test-file", "--model", "--train-len", "--dtype", "--help",
                 # the retrieval probes (lenx.probes)
                 "--probe", "--perplexity", "--no-perplexity", "--probe-trials", "--probe-depths", "--probe-distances",
                 "--probe-pairs", "--probe-segment", "--probe-seed", "--passkey-format", "--passkey-needle",
                 "--passkey-question"}
SWEEP_FLAGS = {"--config", "--dry-run", "--device", "--help"}


def help_flags(text: str) -> set[str]:
    """The flags an --help lists (each option line starts with its flags)."""
    return {f for line in text.splitlines() if re.match(r"  --", line)
            for f in re.findall(r"--[a-z][a-z-]*", line[2:].split("  ")[0])}


@pytest.mark.parametrize("command, flags", [("train", TRAIN_FLAGS), ("eval", EVAL_FLAG_SET), ("sweep", SWEEP_FLAGS)])
def test_help_lists_the_flags_it_always_had(command, flags, capsys):
    assert main([command, "--help"]) == 0
    assert help_flags(capsys.readouterr().out) == flags


def test_train_flags_and_config_keys_are_the_fields(capsys):
    """Every TrainConfig field is a --config key; those with a flag are `lenx train` flags, and the flag sets the
    same value as the key."""
    assert set(file_keys(TrainConfig)) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert {f"--{k.replace('_', '-')}" for k in FLAGS} <= TRAIN_FLAGS
    assert resolve(None, steps=7, lr=0.5, compile=True).to_dict() == {
        **TrainConfig().to_dict(), "steps": 7, "lr": 0.5, "compile": True}
    assert main(["train", "--steps", "0"]) == 2  # a flag's own check, named by its flag
    assert "--steps must be a positive integer, got 0" in capsys.readouterr().err


def test_default_yaml_is_what_trainconfig_writes():
    """configs/default.yaml is generated (`python -m lenx.config > configs/default.yaml`): its keys, values and
    comments (the help texts) are TrainConfig's fields."""
    assert DEFAULTS_FILE.read_text() == default_yaml(), "regenerate with: python -m lenx.config > configs/default.yaml"
    values = yaml.safe_load(DEFAULTS_FILE.read_text())
    assert values == TrainConfig().to_dict()
    lines = {line.split(":")[0]: line for line in DEFAULTS_FILE.read_text().splitlines() if not line.startswith(" ")}
    for f in dataclasses.fields(TrainConfig):
        assert f"# {f.metadata['help'].split()[0]}" in lines[f.name], f.name


def test_eval_config_is_evaluates_keyword_arguments():
    """EvalConfig's fields are evaluate()'s keyword arguments, `--text-field` and `--test-file` aside (they join
    --dataset in one DataSpec); its defaults are evaluate's."""
    from lenx.evaluate import evaluate

    params = inspect.signature(evaluate).parameters
    fields = {f.name: f for f in dataclasses.fields(EvalConfig)}
    kwargs = EvalConfig().kwargs()
    assert set(kwargs) == set(fields) - {"text_field", "test_file"} and set(kwargs) <= set(params)
    for name, value in kwargs.items():
        default = params[name].default
        assert value == default or str(value) == default, name


def test_eval_config_data_spec_from_its_three_flags(capsys):
    from lenx.data import DataSpec
    from lenx.errors import LenxError

    assert EvalConfig().data_spec() is None
    spec = EvalConfig(test_file="t.txt", text_field="body").data_spec()
    assert spec == DataSpec(dataset="files", text_field="body", test_file="t.txt")
    for kw, needle in (({"dataset": "a", "test_file": "b"}, "give either --dataset (a) or --test-file, not both"),
                       ({"text_field": "body"}, "--text-field applies with --dataset or --test-file"),
                       ({"dataset": " "}, "--dataset is empty")):
        with pytest.raises(LenxError, match=re.escape(needle)):
            EvalConfig(**kw).data_spec()


def test_sweep_eval_section_keys_are_the_eval_configs(tmp_path):
    """A sweep's eval: section takes the keys of EvalConfig's sweepable fields, each checked as its flag is."""
    from lenx.errors import LenxError
    from lenx.sweep import load_sweep

    assert {flag_of(f) for f in file_keys(EvalConfig).values()} == set(EVAL_FLAGS.values()) <= EVAL_FLAG_SET
    cfg = tmp_path / "s.yaml"
    cfg.write_text("schemes: [rope]\neval: {max_len: 512, lengths: [128, 256], tokens: 1024, rope_scaling: pi, "
                   "rope_factor: 2, protocols: [sliding], stride: 64, position_buckets: 2}\n")
    ev = load_sweep(cfg).eval
    assert set(ev) == set(EVAL_FLAGS)
    assert {k: v for k, v in ev.items() if k != "probe" and not k.startswith(("probe_", "passkey_", "perplexity"))} == {
        "max_len": 512, "lengths": [128, 256], "tokens": 1024, "rope_scaling": ["pi"], "rope_factor": [2.0],
        "protocols": ["sliding"], "stride": 64, "position_buckets": 2}
    assert ev["probe"] == [] and ev["perplexity"] is True and ev["probe_trials"] == 20  # not set: the defaults
    cfg.write_text("schemes: [rope]\neval: {probe: [passkey, repeat], probe_depths: [0, 1], probe_trials: 5}\n")
    ev = load_sweep(cfg).eval
    assert (ev["probe"], ev["probe_depths"], ev["probe_trials"]) == (["passkey", "repeat"], [0.0, 1.0], 5)
    from lenx.eval_config import check_eval_options

    assert check_eval_options(ev) == ev  # what a sweep hands `evaluate` passes the same checks again, unchanged
    cfg.write_text("schemes: [rope]\neval: {out: elsewhere}\n")  # an eval option a sweep sets otherwise
    with pytest.raises(LenxError, match="unknown key 'eval.out'"):
        load_sweep(cfg)


def _install_wheel(tmp_path: Path) -> Path:
    """lenx built into a wheel from a copy of the sources (nothing written into the checkout) and installed into
    a directory of its own; offline when the environment's setuptools can build it."""
    src = tmp_path / "src"
    shutil.copytree(ROOT / "lenx", src / "lenx", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    build = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", src],
                           capture_output=True, text=True, timeout=300)
    if build.returncode != 0:  # setuptools too old here: an isolated build, which fetches it
        build = subprocess.run([*pip, "wheel", "--no-deps", "-w", tmp_path / "dist", src], capture_output=True,
                               text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("lenx-*.whl")
    site = tmp_path / "site"
    proc = subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", site, wheel], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (site / "configs").exists()
    return site


@pytest.mark.slow
def test_lenx_from_a_wheel_works_as_from_the_checkout(tmp_path, capsys, monkeypatch):
    """Installed from a wheel (no configs/ beside it) and run from another directory, lenx shows the same
    --help of train, eval and sweep, resolves the same default config and trains with it."""
    site = _install_wheel(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "COLUMNS": "100"}

    def run(*args):
        proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=elsewhere, env=env,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    code = "import json, lenx, lenx.config as c; print(lenx.__file__); print(json.dumps(c.resolve().to_dict()))"
    where, config = run("-c", code).splitlines()
    assert Path(where).is_relative_to(site)
    assert json.loads(config) == json.loads(json.dumps(resolve().to_dict()))
    monkeypatch.setenv("COLUMNS", "100")
    for command in ("train", "eval", "sweep"):
        assert main([command, "--help"]) == 0
        assert run("-m", "lenx", command, "--help") == capsys.readouterr().out
    tiny = ["--pe", "alibi", "--steps", "2", "--train-len", "16", "--batch-size", "2", "--layers", "1",
            "--d-model", "16", "--heads", "2", "--d-ff", "32", "--save-every", "2"]
    assert "run saved to" in run("-m", "lenx", "train", *tiny, "--out", "run", "--device", "cpu")
    saved = json.loads((elsewhere / "run" / "run.json").read_text())["config"]
    flags = dict(zip([a[2:].replace("-", "_") for a in tiny[::2]], tiny[1::2]))
    expected = resolve(None, **{k: v if k == "pe" else int(v) for k, v in flags.items()}).to_dict()
    assert saved == json.loads(json.dumps(expected))
