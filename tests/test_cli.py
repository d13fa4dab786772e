"""`lenx train` -> `lenx eval` -> `lenx report`, end to end on tiny settings, as a user runs them."""

import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from lenx.cli import main
from lenx.positional import REGISTRY

TINY = ["--steps", "6", "--train-len", "16", "--batch-size", "4", "--layers", "1", "--d-model", "32", "--heads", "2",
        "--save-every", "4"]
COLUMNS = ["run", "pe", "seed", "train_len", "eval_len", "ratio", "protocol", "tokens", "nll", "ppl", "bpb", "seconds",
           "note"]


def lenx(*args) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Every registered scheme trained for a few steps on the embedded corpus."""
    root = tmp_path_factory.mktemp("e2e")
    for pe in REGISTRY:
        assert lenx("train", "--pe", pe, *TINY, "--out", root / "runs" / pe) == 0
    return root


def test_train_writes_run_directory(trained):
    run = trained / "runs" / "alibi"
    for name in ("config.json", "model.safetensors", "run.json", "train_log.csv"):
        assert (run / name).exists(), name
    log = pd.read_csv(run / "train_log.csv")
    assert list(log.columns) == ["step", "loss", "lr", "tokens_per_s"]
    assert log["step"].iloc[-1] == 6
    import json

    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "done" and info["config"]["pe"] == "alibi"
    for key in ("lenx_version", "torch_version", "device", "dataset_fingerprint", "train_seconds", "tokens_per_s"):
        assert info[key] is not None, key
    assert not list(run.glob("checkpoint-*"))  # checkpoints are removed once the final model is saved


def test_eval_and_report(trained, capsys):
    out = trained / "results"
    runs = sorted((trained / "runs").iterdir())
    assert lenx("eval", *runs, "--max-len", "64", "--tokens", "256", "--out", out) == 0
    df = pd.read_csv(out / "results.csv")
    assert set(COLUMNS) <= set(df.columns)
    assert len(df) == len(REGISTRY) * 3  # lengths 16, 32, 64
    assert sorted(df["eval_len"].unique()) == [16, 32, 64]
    assert (df["ratio"] == df["eval_len"] / 16).all()
    pq = pd.read_parquet(out / "results.parquet")
    assert len(pq) == len(df)
    learned = df[df["pe"] == "learned"].set_index("eval_len")
    assert learned.loc[16, "ppl"] > 1
    assert pd.isna(learned.loc[32, "ppl"]) and "learned positions end at 16" in learned.loc[32, "note"]
    others = df[df["pe"] != "learned"]
    assert (others["ppl"] > 1).all() and others["ppl"].notna().all()
    assert (others["tokens"] == 256).all()
    assert (df["bpb"].dropna() > 0).all()

    # rerunning evaluates nothing new and keeps one row per cell
    assert lenx("eval", *runs, "--max-len", "64", "--tokens", "256", "--out", out) == 0
    assert len(pd.read_csv(out / "results.csv")) == len(df)

    assert lenx("report", out) == 0
    md = (out / "report.md").read_text()
    assert "| alibi |" in md and "64 (4×)" in md
    assert (out / "ppl_vs_length.png").stat().st_size > 10_000


def test_report_pools_only_seeds_of_one_experiment(tmp_path):
    """One scheme, one seed, trained differently (steps; training length): separate rows, never '2 seeds'."""
    small = TINY[4:]  # TINY without --steps and --train-len
    runs = {"long": (6, 16, 0), "short": (3, 16, 0), "L8-s0": (3, 8, 0), "L8-s1": (3, 8, 1)}
    for name, (steps, train_len, seed) in runs.items():
        assert lenx("train", "--pe", "rope", "--steps", steps, "--train-len", train_len, "--seed", seed, *small,
                    "--out", tmp_path / name) == 0
    out = tmp_path / "results"
    assert lenx("eval", *(tmp_path / name for name in runs), "--lengths", "16,32", "--tokens", "64", "--out", out) == 0
    df = pd.read_csv(out / "results.csv")
    # appended, in the order they came: the columns before keep their places
    assert list(df.columns[-21:]) == ["config_id", "weights_id", "context_gain", "context_gain_tokens", "attn_route",
                                      "rope_beta_fast", "rope_beta_slow", "rope_attention_factor",
                                      "rope_low_freq_factor", "rope_high_freq_factor", "rope_factors", "rope_window",
                                      "rope_group", "rope_logn", "rope_leak", "rope_chunk", "rope_local", "rope_sinks",
                                      "rope_shift", "rope_global", "rope_cap"]
    ids = df.groupby("run")["config_id"].first()
    assert ids["long"] != ids["short"] and ids["L8-s0"] == ids["L8-s1"] != ids["long"]

    assert lenx("report", out) == 0
    md = (out / "report.md").read_text()
    ppl, relative = md.split("## Perplexity relative to 1×")
    rows = {line.split(" | ")[0][2:]: line for line in ppl.splitlines() if line.startswith("| rope")}
    assert set(rows) == {f"rope (L16, {ids['long']})", f"rope (L16, {ids['short']})", "rope (L8)"}, rows
    assert "[" in rows["rope (L8)"] and not any("[" in rows[k] for k in rows if "L16" in k)  # two seeds; one each
    assert f"rope (L16, {ids['long']}): 1" in md and "rope (L8): 2" in md  # 'over N seed(s)' per scheme
    assert f"- rope (L16, {ids['short']}): short" in md
    assert f"| rope (L16, {ids['long']}) | 1.00 |" in relative  # each at its own training length


def test_rope_scaling_sweep(trained, capsys):
    out = trained / "results-scaling"
    runs = [trained / "runs" / pe for pe in ("rope", "xpos", "alibi")]
    args = ["--lengths", "16,32", "--tokens", "64", "--out", out]
    assert lenx("eval", *runs, *args, "--rope-scaling", "none,pi,yarn", "--rope-scaling", "dynamic-ntk") == 0
    df = pd.read_csv(out / "results.csv")
    assert len(df) == 2 * (4 + 4 + 1)  # lengths x scalings for rope and xpos; alibi: none only
    assert set(df[df["pe"] == "alibi"]["rope_scaling"]) == {"none"}
    rope = df[df["pe"] == "rope"].set_index(["rope_scaling", "eval_len"])
    assert rope.loc[("pi", 32), "rope_factor"] == 2.0 and rope.loc[("yarn", 16), "rope_factor"] == 1.0
    assert pd.isna(rope.loc[("dynamic-ntk", 32), "rope_factor"]) and pd.isna(rope.loc[("none", 32), "rope_factor"])
    assert rope.loc[("pi", 16), "ppl"] == pytest.approx(rope.loc[("none", 16), "ppl"], rel=1e-6)  # s = 1: no change
    assert rope.loc[("pi", 32), "ppl"] != pytest.approx(rope.loc[("none", 32), "ppl"], rel=1e-6)  # s = 2 acts
    # explicit factors add cells; the ones already there are kept
    assert lenx("eval", runs[0], *args, "--rope-scaling", "pi", "--rope-factor", "4,8") == 0
    df = pd.read_csv(out / "results.csv")
    assert len(df) == 18 + 4
    assert sorted(df[(df["pe"] == "rope") & (df["rope_scaling"] == "pi")]["rope_factor"]) == [1, 2, 4, 4, 8, 8]
    # the report keeps given factors apart (never pooled as seeds), next to the default-factor curve
    assert lenx("report", out) == 0
    md = (out / "report.md").read_text()
    table = md.split("## Perplexity relative to 1×")[0]
    labels = [line.split(" | ")[0][2:] for line in table.splitlines() if line.startswith("| rope+pi")]
    assert labels == ["rope+pi", "rope+pi×4", "rope+pi×8"], labels
    from lenx.plots import style

    assert style("rope+pi×4")["marker"] != style("rope+pi×8")["marker"]
    assert style("rope+pi×4")["linestyle"] == style("rope+pi")["linestyle"]  # one extension, one dash pattern
    # one extension asked of a scheme without RoPE: one line
    code = lenx("eval", runs[2], *args, "--rope-scaling", "yarn")
    one_line_error(capsys, code, "applies to rope, xpos runs", "alibi")


def test_schemes_t5_names_its_default_sharing(capsys):
    assert lenx("schemes", "t5") == 0
    out = capsys.readouterr().out
    assert "shared=True" in out and "shared: true (the default" in out


def test_train_on_local_text_directory(text_dataset, tmp_path):
    out = tmp_path / "run"
    assert lenx("train", "--pe", "rope", *TINY, "--dataset", text_dataset, "--out", out) == 0
    assert lenx("eval", out, "--lengths", "16,32", "--tokens", "64", "--out", tmp_path / "res") == 0
    df = pd.read_csv(tmp_path / "res" / "results.csv")
    assert df["ppl"].notna().all() and (df["dataset"] == str(text_dataset)).all()


def test_finished_run_is_not_retrained(trained, capsys):
    run = trained / "runs" / "nope"
    before = (run / "model.safetensors").stat().st_mtime_ns
    assert lenx("train", "--pe", "nope", *TINY, "--out", run) == 0
    assert (run / "model.safetensors").stat().st_mtime_ns == before
    assert "already trained" in capsys.readouterr().err


def one_line_error(capsys, code, *needles):
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors of a machine without CUDA")
def test_unusable_device_is_one_line_and_leaves_no_run_directory(capsys, tmp_path):
    for device, needle in (("gpu", "unknown device 'gpu'"), ("tpu", "cpu or cuda[:N]"), ("cuda", "--device cpu"),
                           ("cuda:1", "--device cpu"), ("cpu:1", "no device index; use --device cpu")):
        out = tmp_path / device.replace(":", "_")
        one_line_error(capsys, lenx("train", "--pe", "rope", *TINY, "--device", device, "--out", out), needle)
        assert not out.exists()
    one_line_error(capsys, lenx("eval", "--device", "gpu", "--out", tmp_path / "res"), "unknown device")
    assert not (tmp_path / "res").exists()


def test_cpu_device_is_recorded_without_an_index():
    from lenx.distributed import check_device

    assert check_device("cpu") == check_device("cpu:0") == "cpu"  # one label for every run on the CPU


def test_unknown_scheme_lists_known_ones(capsys):
    one_line_error(capsys, lenx("train", "--pe", "nosuch"), "nosuch", *REGISTRY)


def test_max_len_below_training_length(trained, capsys):
    code = lenx("eval", trained / "runs" / "alibi", "--max-len", "8", "--out", trained / "r2")
    one_line_error(capsys, code, "--max-len 8", "training length 16")


@pytest.mark.parametrize(
    "args, needle",
    [
        (["train", "--pe", "rope", "--steps", "0"], "--steps"),
        (["train", "--pe", "rope", "--train-len", "-5"], "--train-len"),
        (["train", "--pe", "rope", "--dataset", "/no/such/place"], "not found"),
        (["eval", "--lengths", "16,abc"], "--lengths"),
        (["eval", "--max-len", "0"], "--max-len"),
        (["eval", "--rope-scaling", "linear"], "--rope-scaling"),
        (["eval", "--rope-scaling", "yarn:beta_slow=64"], "--rope-scaling 'yarn:beta_slow=64': beta_fast (32) must exceed"),
        (["eval", "--rope-scaling", "YaRN"], "did you mean 'yarn'"),
        (["train", "--pe", "Rope"], "did you mean 'rope'"),
        (["eval", "--attn-backend", "SDPA"], "did you mean 'sdpa'"),
        (["eval", "--rope-scaling", "pi", "--rope-factor", "0.5"], "--rope-factor"),
        (["eval", "--rope-factor", "2"], "--rope-factor"),
        (["eval", "/no/such/run"], "not a lenx run"),
        (["report", "/no/such/results"], "no results"),
        (["schemes", "nosuch"], "known schemes"),
        (["train", "--no-such-flag"], "--no-such-flag"),
        # empty paths: the current directory's .txt files were read as the corpus, or the flags ignored
        (["train", "--pe", "rope", "--dataset", ""], "--dataset is empty"),
        (["train", "--pe", "rope", "--train-file", " ", "--test-file", " "], "--train-file is empty"),
        (["eval", "--dataset", ""], "--dataset is empty"),
        (["eval", "--test-file", ""], "--test-file is empty"),
    ],
)
def test_bad_input_is_one_line(capsys, args, needle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default run and result directories land here, if anywhere
    one_line_error(capsys, lenx(*args), needle)
    assert not any(tmp_path.iterdir()), list(tmp_path.rglob("*"))  # bad input leaves nothing behind


def test_bad_config_file_names_the_key(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("pe: rope\nlearning_rate: 3\n")
    one_line_error(capsys, lenx("train", "--config", cfg), "learning_rate")
    cfg.write_text("steps: many\n")
    one_line_error(capsys, lenx("train", "--config", cfg), "steps", "int")
    cfg.write_text("schemes: [rope, alibi]\nseeds: [0]\ntrain: {steps: 5}\n")
    one_line_error(capsys, lenx("train", "--config", cfg), "is a sweep config", f"lenx sweep --config {cfg}")
    for text, needle in (("beta2: 1.0\n", "beta2' must lie in [0, 1), got 1.0"), ("min_lr_ratio: 2\n", "min_lr_ratio"),
                         ("grad_clip: -1\n", "grad_clip")):
        cfg.write_text(text)  # the key that is out of range, by the name the user set it with
        one_line_error(capsys, lenx("train", "--pe", "rope", "--config", cfg), needle)


def test_config_reads_exponent_floats_without_a_dot(tmp_path, capsys, monkeypatch):
    """`lr: 1e-3` is a number (YAML 1.1 reads it as text without a dot, and it was refused as "must be float, got
    '1e-3'"), in a training config, a scheme's options and a sweep's train: section."""
    import json

    cfg, run = tmp_path / "c.yaml", tmp_path / "run"
    cfg.write_text("lr: 1e-3\nwarmup: 2\npe_options: {base: 5e+4}\n")
    assert lenx("train", "--pe", "rope", "--config", cfg, *TINY, "--out", run) == 0
    config = json.loads((run / "run.json").read_text())["config"]
    assert config["lr"] == 1e-3 and config["pe_options"] == {"base": 5e4}
    sweep = tmp_path / "s.yaml"
    monkeypatch.chdir(tmp_path)  # the sweep's runs/ and results/ directories, if any
    sweep.write_text("schemes: [alibi]\ntrain: {lr: 3E-4, steps: 2, train_len: 16}\neval: {tokens: 64}\n")
    capsys.readouterr()
    assert lenx("sweep", "--config", sweep, "--dry-run") == 0


def test_console_script_has_no_traceback(tmp_path):
    """The installed entry point, in a real subprocess."""
    proc = subprocess.run([sys.executable, "-m", "lenx", "train", "--pe", "bogus"], capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "known schemes" in proc.stderr


def test_help_starts_without_torch_or_transformers(tmp_path):
    """`lenx --help` and a command's --help import neither torch nor transformers (seconds of start-up)."""
    code = ("import sys\nfrom lenx.cli import main\nmain(['--help'])\nmain(['eval', '--help'])\n"
            "print(sorted({'torch', 'transformers'} & set(sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.splitlines()[-1] == "[]", proc.stderr[-2000:]


def test_schemes_lists_every_scheme(capsys, monkeypatch):
    for width, papers in ((80, False), (200, True)):  # paper and users as columns only where they fit
        monkeypatch.setenv("COLUMNS", str(width))
        assert lenx("schemes") == 0
        out = capsys.readouterr().out
        assert max(map(len, out.splitlines())) <= width
        for name in REGISTRY:
            assert f"│ {name} " in out
        assert ("Vaswani et al. 2017" in out) == papers and ("lenx schemes NAME" in out) != papers
    assert lenx("schemes", "rope") == 0
    assert "m - n" in capsys.readouterr().out


def test_scheme_details_fill_the_terminal_width(capsys, monkeypatch):
    """Details are written about 90 columns wide; at 80 columns their paragraphs are rewrapped whole (no line
    broken after a word or two), paragraphs and indented formula lines stay as written."""
    monkeypatch.setenv("COLUMNS", "80")
    for name in REGISTRY:
        assert lenx("schemes", name) == 0
        details = capsys.readouterr().out.split("\n\n", 1)[1].splitlines()  # after the header
        assert max(map(len, details)) <= 80, name
        prose = [line for line in details[:-1] if line and not line.startswith(" ")]
        assert all(len(line) > 50 for line in prose if details[details.index(line) + 1]), (name, prose)
    assert lenx("schemes", "rope") == 0
    out = capsys.readouterr().out
    assert "\n  <R_m q, R_n k> = sum_k" in out and "\n\nAt evaluation," in out


def test_help_prints_defaults_and_brackets_as_written(capsys):
    """Help texts are plain text: '[default: ...]' and 'cuda[:N]' are not swallowed as markup."""
    assert main(["train", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "[default: runs/<pe>-L<train_len>-s<seed>]" in text and "cpu or cuda[:N] [default: cuda when present]" in text
    assert main(["eval", "--help"]) == 0  # --tokens 1000 at lengths up to 384 scores 1,152: the help says why
    assert "rounded up to a multiple of the longest length" in " ".join(capsys.readouterr().out.split())


def test_results_of_other_weights_are_refused(tmp_path, capsys):
    """A run retrained in place (other weights) is not silently reported with its old numbers."""
    from safetensors.torch import load_file, save_file

    run, res = tmp_path / "runs" / "rope", tmp_path / "res"
    assert lenx("train", "--pe", "rope", *TINY, "--out", run) == 0
    cell = ["--lengths", "16", "--tokens", "64", "--out", res]
    assert lenx("eval", run, *cell) == 0
    assert lenx("eval", run, *cell) == 0  # the same weights: the finished cell stands
    weights = load_file(run / "model.safetensors")
    save_file({k: v * 1.01 for k, v in weights.items()}, run / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()
    one_line_error(capsys, lenx("eval", run, *cell), "computed from other weights", "another --out")
    assert lenx("eval", run, "--lengths", "16", "--tokens", "64", "--out", tmp_path / "fresh") == 0


def test_every_flag_named_in_errors_exists(capsys, tmp_path):
    """Errors name a setting the way a user sets it: a `lenx train` flag where there is one, else a config key."""
    from lenx.config import FLAGS

    assert lenx("train", "--help") == 0
    text = capsys.readouterr().out
    assert all(f"--{key.replace('_', '-')}" in text for key in FLAGS)
    one_line_error(capsys, lenx("train", "--d-ff", "0"), "--d-ff must be a positive integer")
    one_line_error(capsys, lenx("train", "--warmup", "-3"), "--warmup must be >= 0")
    (tmp_path / "c.yaml").write_text("log_every: 0\npos_lr_mult: -1\n")
    one_line_error(capsys, lenx("train", "--config", tmp_path / "c.yaml"), "config key 'log_every'")


@pytest.mark.parametrize("pe, options, needle", [
    ("rope", "{base: -5}", "rope option base must be a number above 1 (default 10000), got -5"),
    ("rope", "{base: .inf}", "rope option base must be a number above 1 (default 10000), got inf"),
    ("xpos", "{scale_base: 0}", "xpos option scale_base must be a number above 1 (default 512), got 0"),
    ("xpos", "{base: 1}", "xpos option base must be a number above 1"),
    ("sinusoidal", "{base: -5}", "sinusoidal option base must be a number above 1 (default 10000), got -5"),
    ("t5", "{num_buckets: -1}", "t5 option num_buckets must be an integer >= 2 (default 32), got -1"),
    ("t5", "{num_buckets: 2.5}", "t5 option num_buckets must be an integer >= 2 (default 32), got 2.5"),
    ("t5", "{num_buckets: 1}", "t5 option num_buckets must be an integer >= 2"),
    ("t5", "{max_distance: 0}", "t5 option max_distance must be an integer above num_buckets // 2 = 16 (default 128), got 0"),
    ("t5", "{num_buckets: 8, max_distance: 4}", "t5 option max_distance must be an integer above num_buckets // 2 = 4"),
    ("t5", "{shared: maybe}", "t5 option shared must be true or false (default true), got 'maybe'"),
    ("t5", "{init: uniform}", "t5 option init must be 'normal' or 'zero' (default 'normal'), got 'uniform'"),
    ("shaw", "{k: 0}", "shaw option k must be an integer >= 1 (default 16), got 0"),
    ("shaw", "{k: -2}", "shaw option k must be an integer >= 1 (default 16), got -2"),
    ("shaw", "{k: true}", "shaw option k must be an integer >= 1 (default 16), got true"),
    ("fire", "{mlp_width: 0}", "fire option mlp_width must be an integer >= 1 (default 32), got 0"),
    ("fire", "{init_c: -1}", "fire option init_c must be a positive number (default 0.1), got -1"),
    ("fire", "{init_c: 0}", "fire option init_c must be a positive number"),
    ("fire", "{eps: 0}", "fire option eps must be a positive number (default 1e-06), got 0"),
    ("fire", "{eps: .nan}", "fire option eps must be a positive number (default 1e-06), got nan"),
    ("alibi", "{foo: 1}", "unknown option(s) foo"),
    ("kerple-log", "{1: 2}", "unknown option(s) 1 for scheme 'kerple-log'; known: none"),
])
def test_bad_scheme_options_are_one_line_before_any_run_directory(pe, options, needle, capsys, tmp_path):
    (tmp_path / "c.yaml").write_text(f"pe_options: {options}\n")
    out = tmp_path / "run"
    # tiny: options that slip through make a short run (and a run directory), not a long one
    one_line_error(capsys, lenx("train", "--pe", pe, "--config", tmp_path / "c.yaml", *TINY, "--out", out), needle)
    assert not out.exists()


def test_training_curves_of_variants_never_share_a_style(tmp_path, monkeypatch):
    """alibi trained at 64 and, in two configs, at 32: 'alibi (L64)' and 'alibi (L32, 8dd3b8)' hash to the same dashes,
    so without markers their training curves looked alike."""
    import lenx.plots as plots

    rows = []
    for name, (train_len, config_id) in {"a": (32, "8dd3b8"), "b": (32, "1af947"), "c": (64, "8dd3b8")}.items():
        (tmp_path / name).mkdir()
        pd.DataFrame({"step": [10, 20, 30], "loss": [4.0, 3.5, 3.0]}).to_csv(tmp_path / name / "train_log.csv")
        rows.append({"pe": "alibi", "train_len": train_len, "run_dir": str(tmp_path / name), "config_id": config_id})
    drawn = {}
    monkeypatch.setattr(plots, "finish", lambda fig, ax, path, legend_title=None: drawn.update(
        {line.get_label(): (line.get_color(), line.get_linestyle(), line.get_marker()) for line in ax.get_lines()}))
    assert plots.plot_training_curves(pd.DataFrame(rows), tmp_path / "training_loss.png")
    assert set(drawn) == {"alibi (L32, 8dd3b8)", "alibi (L32, 1af947)", "alibi (L64)"}, drawn
    assert len(set(drawn.values())) == len(drawn), drawn


def test_unreadable_training_log_leaves_the_report_with_the_other_curves(tmp_path, capsys):
    import lenx.plots as plots

    rows = []
    for name, text in {"good": "step,loss\n10,4.0\n20,3.5\n", "empty": "", "foreign": "garbage\n"}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "train_log.csv").write_text(text)
        rows.append({"pe": name, "train_len": 32, "run_dir": str(tmp_path / name), "config_id": "x"})
    assert plots.plot_training_curves(pd.DataFrame(rows), tmp_path / "training_loss.png")
    err = capsys.readouterr().err
    assert "empty/train_log.csv is unreadable" in err and "foreign/train_log.csv is unreadable" in err, err


@pytest.mark.parametrize("name", ["results.parquet", "results_by_position.parquet"])
def test_a_foreign_results_table_is_one_line_for_eval_and_report(trained, capsys, tmp_path, name):
    out = tmp_path / "res"
    out.mkdir()
    pd.DataFrame({"a": [1], "b": ["x"]}).to_parquet(out / name)
    one_line_error(capsys, lenx("eval", trained / "runs" / "alibi", "--lengths", "16", "--tokens", "32", "--out", out),
                   f"{name} is not a lenx results table (no column run)")
    if name == "results.parquet":
        one_line_error(capsys, lenx("report", out), "results.parquet is not a lenx results table (no column run)")
        (out / name).unlink()
        pd.DataFrame({"a": [1]}).to_csv(out / "results.csv")
        one_line_error(capsys, lenx("report", out), "results.csv is not a lenx results table (no column run)")


def test_length_columns_show_the_multiple_to_three_digits():
    from lenx.render import length_label

    assert [length_label(L, 512) for L in (512, 1012, 15512, 8192)] == [
        "512 (1×)", "1012 (1.98×)", "15512 (30.3×)", "8192 (16×)"]


def test_text_where_a_number_belongs_is_one_line_for_eval_and_report(trained, capsys, tmp_path):
    out = tmp_path / "res"
    args = ("eval", trained / "runs" / "alibi", "--lengths", "16", "--tokens", "32", "--out", out)
    assert lenx(*args) == 0
    df = pd.read_parquet(out / "results.parquet")
    df.astype({"ppl": str}).assign(ppl="high").to_parquet(out / "results.parquet")  # an edited table
    assert lenx("report", out) == 0  # rebuilt from the store, which lenx reads: the edit is undone
    assert pd.read_parquet(out / "results.parquet")["ppl"].tolist() == df["ppl"].tolist()
    (out / "cells.sqlite").unlink()  # a table alone (an older lenx's, another tool's) is read as it is
    df.astype({"ppl": str}).assign(ppl="high").to_parquet(out / "results.parquet")
    one_line_error(capsys, lenx(*args), "column ppl holds 'high', not a number")
    one_line_error(capsys, lenx("report", out), "column ppl holds 'high', not a number")
    df.to_parquet(out / "results.parquet")
    assert lenx("report", out) == 0


def test_results_of_another_text_are_refused(tmp_path, capsys):
    """Two --test-file texts are both dataset 'files': the second is not silently 'already done' with the first's
    numbers; an edited local dataset likewise."""
    run, res = tmp_path / "runs" / "rope", tmp_path / "res"
    assert lenx("train", "--pe", "rope", *TINY, "--out", run) == 0
    for name, word in (("a.txt", "alpha beta "), ("b.txt", "gamma delta epsilon ")):
        (tmp_path / name).write_text(word * 200)
    cell = ["--lengths", "16", "--tokens", "64", "--out", res]
    assert lenx("eval", run, "--test-file", tmp_path / "a.txt", *cell) == 0
    assert lenx("eval", run, "--test-file", tmp_path / "a.txt", *cell) == 0  # the same text: the cell stands
    capsys.readouterr()
    one_line_error(capsys, lenx("eval", run, "--test-file", tmp_path / "b.txt", *cell), "other text", "another --out")
    assert lenx("eval", run, "--dataset", tmp_path / "b.txt", *cell) == 0
    (tmp_path / "b.txt").write_text("zeta eta " * 200)
    from lenx.data import load_spec as _load

    _load.cache_clear()  # a new `lenx eval` process reads the file afresh
    one_line_error(capsys, lenx("eval", run, "--dataset", tmp_path / "b.txt", *cell), "other text", "another --out")
    assert len(pd.read_csv(res / "results.csv")) == 2


def test_ppl_figure_with_several_protocols_never_draws_two_lines_alike(tmp_path, monkeypatch):
    """With several protocols the protocol sets each line's dashes, overriding a training variant's own; two variants
    that styles() told apart by their dashes alone (same colour and marker) must not then look alike."""
    import lenx.plots as plots
    from lenx.plots import style

    a, b = "alibi (L16, 000000)", "alibi (L16, 00001f)"
    assert style(a)["marker"] == style(b)["marker"] and style(a)["linestyle"] != style(b)["linestyle"]
    summary = pd.DataFrame([{"protocol": p, "scheme": s, "eval_len": L, "train_len": 16, "ppl": 10.0 + L + k,
                             "ppl_low": float("nan"), "ppl_high": float("nan")}
                            for p in ("nonoverlap", "sliding (stride L/2)") for k, s in enumerate((a, b)) for L in (16, 32)])
    drawn = {}

    def keep(fig, ax, path, legend_title=None):
        drawn.update({line.get_label(): (line.get_color(), line.get_marker(), line.get_linestyle())
                      for line in ax.get_lines() if not line.get_label().startswith("_")})

    monkeypatch.setattr(plots, "finish", keep)
    plots.plot_ppl_vs_length(summary, tmp_path / "ppl.png")
    assert len(drawn) == 4 and len(set(drawn.values())) == 4, drawn


def test_ppl_figure_draws_the_interval_of_a_scheme_with_one_length(tmp_path, monkeypatch):
    """A scheme with a perplexity at one length only (learned positions, past their table elsewhere): a band over
    one length has no width and fill_between draws nothing, so its interval, which ppl_ylim makes room for, is
    drawn at that length too."""
    import numpy as np

    import lenx.plots as plots

    summary = pd.DataFrame([{"protocol": "nonoverlap", "scheme": s, "eval_len": L, "train_len": 16, "ppl": 40.0,
                             "ppl_low": 20.0 if s == "learned" else 35.0, "ppl_high": 80.0 if s == "learned" else 45.0}
                            for s in ("learned", "rope") for L in (16, 32) if (s, L) != ("learned", 16)])
    pixels = {}

    def keep(fig, ax, path, legend_title=None):
        fig.canvas.draw()
        image = np.asarray(fig.canvas.buffer_rgba())
        for y in (25.0, 60.0):  # inside learned's interval at 32, outside rope's band and its line
            x, top = ax.transData.transform((32, y))
            pixels[y] = image[image.shape[0] - int(round(top)), int(round(x)) + 4, :3]  # beside the grid line

    monkeypatch.setattr(plots, "finish", keep)
    plots.plot_ppl_vs_length(summary, tmp_path / "ppl.png")
    assert all((p < 250).any() for p in pixels.values()), pixels  # not the white background


def test_report_keeps_datasets_apart():
    """One run scored on its own corpus and on another (`lenx eval --test-file`): two rows, never their mean."""
    from lenx.stats import summarise

    rows = [{"run": "alibi-L16-s0", "pe": "alibi", "seed": 0, "train_len": 16, "eval_len": 16, "protocol": "nonoverlap",
             "stride": 16, "rope_scaling": "none", "rope_factor": float("nan"), "ppl": ppl, "bpb": 1.0, "note": "",
             "tokenizer": "byte", "dataset": dataset, "config_id": "c0"}
            for dataset, ppl in (("stdlib", 40.0), ("files", 20.0))]
    summary = summarise(pd.DataFrame(rows)).set_index("scheme")
    assert summary["ppl"].to_dict() == {"alibi on files": 20.0, "alibi on stdlib": 40.0}
    assert summarise(pd.DataFrame(rows[:1]))["scheme"].tolist() == ["alibi"]  # one dataset: no tag
    from lenx.plots import style

    assert style("alibi on files") != style("alibi on stdlib")  # and the figures draw them apart


def test_report_keeps_texts_of_one_dataset_name_apart():
    """Two seeds scored with `lenx eval --test-file` on different files: both rows say dataset 'files', but the texts
    differ (dataset_fingerprint), so they are two labels, never one scheme's two seeds pooled."""
    from lenx.stats import summarise

    rows = [result_row("alibi", seed, 16, ppl, dataset="files", dataset_fingerprint=fp)
            for seed, ppl, fp in ((0, 20.0, "aaaaaa0123456789"), (1, 80.0, "bbbbbb0123456789"))]
    summary = summarise(pd.DataFrame(rows)).set_index("scheme")
    assert summary["ppl"].to_dict() == {"alibi on files#aaaaaa": 20.0, "alibi on files#bbbbbb": 80.0}
    assert list(summary["seeds"]) == [1, 1]
    rows[1]["dataset_fingerprint"] = rows[0]["dataset_fingerprint"]  # one text: seeds of one scheme, no tag
    assert summarise(pd.DataFrame(rows))["scheme"].tolist() == ["alibi"]


def test_labels_of_one_figure_never_look_alike():
    """Tagged labels hash to their markers and dashes, so two can meet; within one figure they are drawn apart."""
    from lenx.plots import style, styles

    labels = ["alibi", "rope"] + [f"alibi (L16, {i:06x})" for i in range(30)]  # in report order: plain ones first
    look = lambda s: (s["color"], s["marker"], str(s.get("linestyle", "-")), s.get("markerfacecolor"))  # noqa: E731
    assert len({look(style(x)) for x in labels}) < len(labels)  # hashed alone, some meet
    looks = styles(labels)
    assert len({look(s) for s in looks.values()}) == len(labels)
    assert all(looks[x]["color"] == style(x)["color"] for x in labels)  # a scheme keeps its colour
    assert looks["alibi"] == style("alibi") and looks["rope"] == style("rope")


def test_a_directory_of_runs_named_as_a_run_says_so(trained, capsys, tmp_path):
    runs = trained / "runs"
    one_line_error(capsys, lenx("eval", runs, "--out", tmp_path / "res"), "a directory of lenx runs",
                   f"--runs-dir {runs}")
    one_line_error(capsys, lenx("export", runs, "--out", tmp_path / "hf"), "a directory of lenx runs", "name a run")


def test_relative_table_without_the_training_length(tmp_path):
    """`lenx eval --lengths 16,48` on an L32 run: no 1x row, so no ratio; blank and said why, not '—' (which means
    'cannot represent that length')."""
    rows = [{"run": "alibi-L32-s0", "pe": "alibi", "seed": 0, "train_len": 32, "eval_len": L, "ratio": L / 32,
             "protocol": "nonoverlap", "stride": L, "rope_scaling": "none", "rope_factor": float("nan"), "tokens": 64,
             "nll": 3.0, "ppl": 20.0, "bpb": 1.0, "note": "", "tokenizer": "byte", "dataset": "stdlib",
             "timestamp": "2026-01-01T00:00:00+00:00", "config_id": "c0"} for L in (16, 48)]
    pd.DataFrame(rows).to_csv(tmp_path / "results.csv", index=False)
    assert lenx("report", tmp_path) == 0
    md = (tmp_path / "report.md").read_text()
    relative = md.split("## Perplexity relative to 1×")[1].split("##")[0]
    assert "| alibi |  |  |" in relative and "—" not in relative, relative
    assert "training length itself was not evaluated" in relative


def test_two_evals_into_one_out_keep_each_others_rows(trained, tmp_path):
    """`lenx eval runs/a --device cuda:0 & lenx eval runs/b --device cuda:1` into one --out: interleaved writes keep
    every row. Here the second evaluation runs, whole, between two cells of the first."""
    from lenx.evaluate import evaluate

    out, (a, b) = tmp_path / "res", (trained / "runs" / "alibi", trained / "runs" / "rope")
    opts = {"lengths": [16, 32], "tokens": 64, "out": out, "progress": False}
    nested = []

    def other_process(cell):
        if not nested:
            nested.append(evaluate([b], **opts))

    evaluate([a], on_cell=other_process, **opts)
    for name in ("results", "results_by_position"):
        df = pd.read_parquet(out / f"{name}.parquet")
        assert sorted(df["run"].unique()) == ["alibi", "rope"], name
        assert (pd.read_csv(out / f"{name}.csv").groupby("run").size() == df.groupby("run").size()).all()
    assert len(pd.read_csv(out / "results.csv")) == 4


@pytest.mark.parametrize("args, needle", [
    (["--protocol", "sliding", "--stride", "100", "--lengths", "16,32"], "--stride 100 must be between 1 and"),
    (["--rope-scaling", "yarn"], "applies to rope, xpos runs"),
    (["--max-len", "8"], "--max-len 8 is below the training length 16"),
])
def test_eval_bad_input_makes_no_results_directory(trained, capsys, tmp_path, args, needle):
    one_line_error(capsys, lenx("eval", trained / "runs" / "alibi", *args, "--out", tmp_path / "res"), needle)
    assert not (tmp_path / "res").exists()


def test_report_reads_text_columns_that_csv_left_empty(tmp_path):
    """A results.csv whose text columns hold no value at all (no notes, no RoPE extension, ...) reads them back as
    float; the report fills them without pandas' deprecated string-into-float fillna (an error in a later pandas)."""
    import warnings

    from lenx.stats import label, summarise

    rows = [{"run": f"alibi-s{s}", "pe": "alibi", "seed": s, "train_len": 16, "eval_len": L, "ppl": 5.0 + s + L / 16,
             "bpb": 2.0, "note": None, "rope_scaling": None, "rope_factor": None, "tokenizer": None,
             "protocol": None, "stride": None, "dataset": "stdlib", "config_id": "c"}
            for s in (0, 1) for L in (16, 32)]
    pd.DataFrame(rows).to_csv(tmp_path / "r.csv", index=False)
    df = pd.read_csv(tmp_path / "r.csv")
    assert df["note"].dtype == float and df["rope_scaling"].dtype == float
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list(label(df).unique()) == ["alibi"]
        summary = summarise(df)
    assert list(summary["note"]) == ["", ""] and list(summary["protocol"]) == ["nonoverlap"] * 2
    # seeds 6 and 7 at 1x, 7 and 8 at 2x: geometric means, and their ratio
    assert list(summary["seeds"]) == [2, 2] and list(summary["ppl"].round(4)) == [round(42**0.5, 4), round(56**0.5, 4)]
    assert list(summary["rel_1x"].round(4)) == [1.0, round((56 / 42) ** 0.5, 4)]


def result_row(pe: str, seed, eval_len: int, ppl: float, **fields) -> dict:
    """One row of results.csv as `lenx eval` writes it (nonoverlap, byte tokenizer, stdlib, training length 16);
    `fields` override or add columns."""
    return {"run": f"{pe}-s{seed}", "pe": pe, "seed": seed, "train_len": 16, "eval_len": eval_len, "ppl": ppl,
            "bpb": 2.0, "note": "", "rope_scaling": "none", "rope_factor": float("nan"), "tokenizer": "byte",
            "protocol": "nonoverlap", "stride": eval_len, "dataset": "stdlib", "config_id": "c", **fields}


def test_interval_over_seeds_stays_positive_and_brackets_the_mean(tmp_path):
    """Two seeds at 30 and 60: a t interval on ppl itself would reach below zero (45.00 ± 190.59); on log ppl
    it is the geometric mean 42.43 times and divided by one factor, drawn as a band on the log axis."""
    from lenx.plots import plot_ppl_vs_length, ppl_ylim
    from lenx.render import ppl_cell
    from lenx.stats import summarise

    rows = [result_row("rope", s, L, ppl) for s, (a, b) in enumerate(((5.0, 30.0), (6.0, 60.0)))
            for L, ppl in ((16, a), (32, b))]
    summary = summarise(pd.DataFrame(rows)).set_index("eval_len")
    r = summary.loc[32]
    assert r.ppl == pytest.approx(1800**0.5) and 0 < r.ppl_low < r.ppl < r.ppl_high
    factor = math.exp(12.706 * math.log(2) / 2)  # t(1) * the standard error of log ppl: sd (ln 2 / sqrt 2) / sqrt 2
    assert r.ppl_high / r.ppl == pytest.approx(factor) and r.ppl / r.ppl_low == pytest.approx(factor)
    assert ppl_cell(r) == f"42.43 [{r.ppl / factor:.2f}–{r.ppl * factor:.2f}]"
    plot_ppl_vs_length(summary.reset_index(), tmp_path / "ppl.png")  # the band on the log axis: positive throughout
    assert (tmp_path / "ppl.png").stat().st_size > 0
    low, high = ppl_ylim(summary)  # the lines set the range; the band runs off it, 3x past them at most
    assert low == pytest.approx(30**0.5 / 3 / 1.08) and high == pytest.approx(r.ppl * 3 * 1.08)  # 1x: sqrt(5 * 6)
    one_seed = summarise(pd.DataFrame(rows[:2]))  # no band: the range hugs the lines
    assert ppl_ylim(one_seed) == pytest.approx((5.0 / 1.08, 30.0 * 1.08))


def test_interval_bounds_far_from_the_mean_stay_readable_and_above_zero():
    """Two seeds a factor 400 apart: the t(1) interval spans dozens of decades. Its bounds are written in
    significant digits (never '0.00', which reads as the zero the log interval cannot reach, nor 20-digit numbers)."""
    from lenx.render import ppl_cell
    from lenx.stats import summarise

    rows = [result_row("rope", s, 64, ppl) for s, ppl in enumerate((75.0, 30000.0))]
    r = next(summarise(pd.DataFrame(rows)).itertuples())
    low, high = f"{r.ppl_low:.3g}", f"{r.ppl_high:.3g}"
    assert r.ppl_low < 0.01 and r.ppl_high > 1e6
    assert ppl_cell(r) == f"1500.00 [{low}–{high}]" and "e+" in high
    diverged = next(summarise(pd.DataFrame([result_row("rope", 0, 64, 2.5e19)])).itertuples())
    assert ppl_cell(diverged) == "2.5e+19"  # one seed: no interval; and not twenty digits


def test_a_cell_missing_a_seed_says_so(tmp_path):
    """Three seeds, one of them with no perplexity at one length (out of memory, or its row never written): that
    cell is the mean of two, and the report says so, where the text above the table says '3 seed(s)'."""
    from lenx.report import report

    rows = [result_row("rope", s, L, 10.0 + s + L, nll=0.0, run_dir=None, lenx_version="0.1.0", device="cpu",
                       dataset_fingerprint="f") for s in range(3) for L in (16, 32, 64) if (s, L) != (2, 64)]
    rows[4].update(ppl=float("nan"), note="out of memory")  # seed 1 at 32
    pd.DataFrame(rows).to_csv(tmp_path / "results.csv", index=False)
    md = report(tmp_path).read_text()
    assert "over 3 seed(s)" in md
    assert "- rope, nonoverlap, at 32: out of memory; mean over 2 of 3 seeds (no perplexity from seed 1)" in md
    assert "- rope, nonoverlap, at 64: mean over 2 of 3 seeds (no perplexity from seed 2)" in md
    assert "at 16" not in md


def test_seed_count_of_a_scheme_with_no_perplexity_is_its_seeds(tmp_path):
    """Two learned runs evaluated only past their table: every cell is empty, but two seeds were evaluated
    (the text said 'over 0 seed(s)')."""
    from lenx.render import seeds_text
    from lenx.stats import summarise

    rows = [result_row("learned", s, L, float("nan"), bpb=float("nan"), note="learned positions end at 16")
            for s in range(2) for L in (32, 64)]
    assert seeds_text(summarise(pd.DataFrame(rows))) == "2 seed(s)"


def test_report_with_every_cell_empty_warns_nothing(tmp_path):
    """Learned runs evaluated only past their table: the figure has no line, and `lenx report` prints no
    matplotlib warning about an empty legend."""
    import warnings

    from lenx.plots import plot_ppl_vs_length
    from lenx.stats import summarise

    rows = [result_row("learned", 0, 32, float("nan"), bpb=float("nan"), note="learned positions end at 16")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot_ppl_vs_length(summarise(pd.DataFrame(rows)), tmp_path / "ppl.png")
    assert (tmp_path / "ppl.png").exists()


def test_ratio_to_1x_pairs_each_seed_with_its_own_1x():
    """A seed missing at 2x leaves the ratio over the seeds that have both, not one mean over two seeds divided by
    one over three (with every seed present the two agree)."""
    from lenx.stats import summarise

    ppl = {(0, 16): 5.0, (1, 16): 6.0, (2, 16): 20.0, (0, 32): 10.0, (1, 32): 9.0}  # seed 2 has no 2x row
    rows = [result_row("rope", s, L, p) for (s, L), p in ppl.items()]
    r = summarise(pd.DataFrame(rows)).set_index("eval_len").loc[32]
    assert r.rel_1x == pytest.approx((10 / 5 * 9 / 6) ** 0.5)  # 1.73; unpaired: sqrt(90) / 600^(1/3) = 1.12
    assert "mean over 2 of 3 seeds" in r.note


def test_ratio_to_1x_has_a_paired_interval_over_seeds():
    """Seeds 0-2 of rope: 1x 5, 6, 8 and 2x 10, 9, 20, so log ratios ln 2, ln 1.5, ln 2.5. The interval is
    exp(mean -+ t(2) * sd / sqrt(3)) of those, computed here by hand; one seed has none."""
    import math

    from lenx.render import rel_cell
    from lenx.stats import summarise

    rows = [result_row("rope", s, L, p) for s, (a, b) in enumerate(((5.0, 10.0), (6.0, 9.0), (8.0, 20.0)))
            for L, p in ((16, a), (32, b))]
    r = summarise(pd.DataFrame(rows)).set_index("eval_len").loc[32]
    logs = [math.log(2), math.log(1.5), math.log(2.5)]
    mean = sum(logs) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in logs) / 2)
    half = 4.303 * sd / math.sqrt(3)  # t(0.975, 2 degrees of freedom) = 4.3027
    assert r.rel_1x == pytest.approx(math.exp(mean))
    assert (r.rel_1x_low, r.rel_1x_high) == (pytest.approx(math.exp(mean - half), rel=1e-5),
                                              pytest.approx(math.exp(mean + half), rel=1e-5))
    assert r.rel_1x_stderr == pytest.approx(math.exp(mean) * sd / math.sqrt(3))
    assert rel_cell(r) == f"{math.exp(mean):.2f} [{math.exp(mean - half):.2f}–{math.exp(mean + half):.2f}]"
    one = summarise(pd.DataFrame(rows[:2])).set_index("eval_len").loc[32]
    assert one.rel_1x == pytest.approx(2.0) and pd.isna(one.rel_1x_low) and rel_cell(one) == "2.00"


def test_report_opens_with_the_answer_schemes_ranked_at_the_longest_length(tmp_path, capsys):
    """The summary ranks schemes by perplexity at the longest multiple divided by their own at 1x (two seeds: with
    intervals), names those within 10% of 1x and the lowest perplexity there, and says why a scheme is not ranked
    (no perplexity at that length, or no 1x to divide by)."""
    from lenx.report import report

    ppl = {"alibi": ((7.0, 7.1), (7.2, 7.0)), "rope": ((6.0, 12.0), (6.2, 13.0)), "nope": ((9.0, 9.5), (9.4, 9.6))}
    rows = [result_row(pe, s, L, p) for pe, seeds in ppl.items() for s, pair in enumerate(seeds)
            for L, p in zip((16, 64), pair)]
    rows += [result_row("learned", s, 16, 8.0) for s in (0, 1)]
    rows += [result_row("learned", s, 64, float("nan"), note="learned positions end at 16") for s in (0, 1)]
    rows += [result_row("t5", s, 64, 8.0) for s in (0, 1)]  # evaluated at 4x only
    pd.DataFrame(rows).to_csv(tmp_path / "results.csv", index=False)
    md = report(tmp_path).read_text()
    head = md.split("## Summary")[1].split("\n## ")[0]
    assert md.index("## Summary") < md.index("## Perplexity (nonoverlap)")
    assert "At 4× the training length (64 tokens), nonoverlap, over 2 seed(s)" in head
    order = [line.split("|")[2].strip() for line in head.splitlines() if line.startswith("| ") and "rank" not in line]
    assert order == ["alibi", "nope", "rope"]  # ratios 0.99, 1.04, 2.05
    assert "| 1 | alibi | 7.10 | 7.05 [6.44–7.71] | 0.99 [0.76–1.30] |" in head  # by hand: exp(mean ln ratio -+ 12.706 se)
    assert "Within 10% of their 1× perplexity at 4×: alibi, nope. Lowest perplexity at 4×: alibi" in head
    assert "learned (learned positions end at 16)" in head and "t5 (no 1× perplexity to divide by)" in head
    capsys.readouterr()
    assert lenx("report", tmp_path) == 0  # the terminal gets the same ranking
    shown = capsys.readouterr().out
    assert "Summary" in shown and "0.99 [0.76–1.30]" in shown and shown.index("alibi") < shown.index("rope")
    assert "[low–high]" in " ".join(shown.split())  # shown as text, not swallowed as a rich markup tag


@pytest.mark.parametrize("low, high, at_least", [(65, 110, 4), (6, 25, 4), (1, 20000, 4), (0.5, 1e9, 4)])
def test_log_y_axis_has_a_few_plain_labels_whatever_its_span(low, high, at_least):
    """A handful of readable labels on the log y axis, from a fraction of a decade to many decades."""
    from lenx.plots import new_figure, readable_log_y

    fig, ax = new_figure()
    ax.set_yscale("log")
    ax.set_ylim(low, high)
    readable_log_y(ax)
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text() and low <= t.get_position()[1] <= high]
    assert at_least <= len(labels) <= 14, labels
    assert not any(x.endswith(".0") for x in labels), labels


def test_one_seed_report_speaks_of_no_interval(tmp_path):
    """With one seed per scheme the table and figure claim no confidence interval (there is none to show)."""
    from lenx.report import report

    rows = [result_row("alibi", 0, L, 5.0 + L / 16, note=None, rope_scaling=None, rope_factor=None) for L in (16, 32)]
    pd.DataFrame(rows).to_csv(tmp_path / "results.csv", index=False)
    md = report(tmp_path).read_text()
    assert "over 1 seed(s). Columns" in md and "confidence interval" not in md and "[" not in md.split("##")[1]
    pd.DataFrame(rows + [{**r, "run": "alibi-s1", "seed": 1, "ppl": r["ppl"] + 1} for r in rows]).to_csv(
        tmp_path / "results.csv", index=False)
    md = report(tmp_path).read_text()
    assert "over 2 seed(s): the geometric mean" in md and "95% confidence interval" in md


def test_dynamic_ntk_rows_say_why_they_equal_ntk(tmp_path):
    """Every scored window has its evaluation length, so dynamic NTK is NTK-aware scaling at that length: equal
    rows, which the report explains (a reader took them for a bug); with a given factor they differ, and no note."""
    from lenx.report import report

    rows = [result_row("rope", 0, L, 5.0 + L / 16, rope_scaling=m, rope_factor=L / 16 if m == "ntk" else float("nan"))
            for L in (16, 32) for m in ("ntk", "dynamic-ntk")]
    pd.DataFrame(rows).to_csv(tmp_path / "results.csv", index=False)
    md = report(tmp_path).read_text()
    assert "| rope+dynamic-ntk | 6.00 | 7.00 |" in md and "| rope+ntk | 6.00 | 7.00 |" in md
    assert "its rows equal ntk's" in md
    rows = [{**r, "rope_factor": 4.0} for r in rows]
    pd.DataFrame(rows).to_csv(tmp_path / "results.csv", index=False)
    assert "its rows equal ntk's" not in report(tmp_path).read_text()


def test_progress_line_keeps_its_fields_on_one_line_at_80_columns():
    """The bar gives up room, not the loss and tokens/s text (which wrapped onto a second line at 80 columns)."""
    import io

    from rich.console import Console

    from lenx.progress import progress

    bar = progress()
    task = bar.add_task("train kerple-power s12", total=800, loss="loss 3.2104", speed="12,345 tok/s")
    bar.advance(task, 400)
    for width in (80, 120):
        console = Console(width=width, file=io.StringIO(), color_system=None)
        console.print(bar.make_tasks_table(bar.tasks))
        lines = console.file.getvalue().splitlines()
        assert len(lines) == 1 and lines[0].rstrip().endswith("loss 3.2104  12,345 tok/s"), lines


def test_hex_ids_in_a_csv_only_results_table_stay_text(tmp_path):
    """results.csv alone (no Parquet beside it): ids that look like numbers keep their digits, and two configs
    whose ids both read as 0.0 stay apart."""
    from lenx.report import read_results
    from lenx.stats import summarise

    rows = [result_row("rope", 0, 32, 10.0, config_id="0e1234", weights_id="012345678901"),
            result_row("rope", 0, 32, 20.0, config_id="0e5678", weights_id="112345678901")]
    pd.DataFrame(rows).to_csv(tmp_path / "results.csv", index=False)
    df = read_results(tmp_path)
    assert list(df["config_id"]) == ["0e1234", "0e5678"] and list(df["weights_id"]) == ["012345678901", "112345678901"]
    assert len(summarise(df)) == 2  # two configs of one scheme: two rows, not one mean of both


def test_report_says_how_many_tokens_each_perplexity_is_over(tmp_path):
    from lenx.report import report

    rows = [result_row("rope", 0, L, 10.0, tokens=4096) for L in (16, 32)]
    rows += [result_row("rope", 0, L, 10.0, tokens=t, protocol="truncate") for L, t in ((16, 4096), (32, 1024))]
    rows.append(result_row("learned", 0, 32, float("nan"), tokens=0, note="learned positions end at 16"))
    pd.DataFrame(rows).to_csv(tmp_path / "results.csv", index=False)
    md = report(tmp_path).read_text()
    assert "Each cell scores 4,096 tokens per seed." in md  # nonoverlap; the learned cell scored none
    assert "Each cell scores 1,024–4,096 tokens per seed" in md  # truncate: fewer documents qualify at 32


def test_report_elsewhere_finds_runs_stored_relative_to_where_eval_ran(trained, tmp_path, monkeypatch):
    """eval in the project stores run_dir as given (runs/alibi); a report of that project's results run from another
    directory looks beside the results directory, so it still has the training curves and the provenance."""
    monkeypatch.chdir(trained)
    assert lenx("eval", "runs/alibi", "--max-len", "32", "--tokens", "64", "--out", "results-rel") == 0
    assert set(pd.read_csv(trained / "results-rel" / "results.csv")["run_dir"]) == {"runs/alibi"}
    monkeypatch.chdir(tmp_path)
    assert lenx("report", trained / "results-rel", "--out", tmp_path / "rep") == 0
    assert (tmp_path / "rep" / "training_loss.png").exists()
    prov = (tmp_path / "rep" / "report.md").read_text().split("## Provenance")[1]
    assert "Training config of the first run" in prov and "No run.json found" not in prov


def test_report_without_its_run_directories_says_so_instead_of_none(tmp_path):
    """Run directories not found from here (report run elsewhere, or the results copied): the provenance says where
    it looked, never 'torch_version: None' and a training config of `null`; HF models alone have no run.json."""
    from lenx.report import report

    rows = [result_row("rope", 0, L, 10.0, run_dir="runs/rope-s0", lenx_version="0.1.0", device="cpu",
                       dataset_fingerprint="ab") for L in (16, 32)]
    pd.DataFrame(rows).to_csv(tmp_path / "results.csv", index=False)
    md = report(tmp_path).read_text()
    prov = md.split("## Provenance")[1]
    assert "None" not in prov and "null" not in prov and "Training config" not in prov
    assert "No run.json found (run_dir: runs/rope-s0, from " in prov and "where `lenx eval` ran" in prov
    hf = [{**r, "seed": float("nan"), "run": "gpt2", "pe": "gpt2/learned", "run_dir": "gpt2"} for r in rows]
    pd.DataFrame(hf).to_csv(tmp_path / "results.csv", index=False)
    prov = report(tmp_path).read_text().split("## Provenance")[1]
    assert "None" not in prov and "null" not in prov and "run.json" not in prov


def test_report_says_how_many_tokens_a_sliding_window_perplexity_is_over(tmp_path):
    """The sliding section, titled by its stride ('sliding (stride 8)'), says its token count as the others do."""
    from lenx.report import report

    rows = [result_row("rope", 0, L, 10.0, tokens=t, protocol="sliding", stride=s)
            for L, t, s in ((16, 2048, 8), (32, 2048, 8), (16, 512, 4))]
    pd.DataFrame(rows).to_csv(tmp_path / "results.csv", index=False)
    md = report(tmp_path).read_text()
    assert "## Perplexity (sliding (stride 8))" in md and "## Perplexity (sliding (stride 4))" in md
    stride8 = md.split("## Perplexity (sliding (stride 8))")[1].split("##")[0]
    stride4 = md.split("## Perplexity (sliding (stride 4))")[1].split("##")[0]
    assert "Each cell scores 2,048 tokens per seed." in stride8 and "Each cell scores 512 tokens per seed." in stride4
