"""`lenx sweep`: a tiny sweep end to end, resumable, and a dry run that changes nothing."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lenx.cli import main


def lenx(*args) -> int:
    return main([str(a) for a in args])


def write_corpus(path: Path) -> None:
    path.write_text("\n".join(f"line {i}: the quick brown fox jumps over the lazy dog {i % 7}" for i in range(3000)))


def snapshot(root: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    corpus = root / "corpus.txt"
    write_corpus(corpus)
    cfg = root / "tiny.yaml"
    cfg.write_text(f"""# a tiny sweep for the tests
name: tiny
schemes: [alibi, rope]
seeds: [0, 1]
train: {{dataset: {corpus}, steps: 4, train_len: 16, batch_size: 4, layers: 1, d_model: 32, heads: 2, save_every: 100}}
eval: {{max_len: 64, tokens: 256}}
runs_dir: {root / 'runs'}
results_dir: {root / 'results'}
""")
    return root, cfg


def test_dry_run_changes_nothing(tiny_sweep, capsys):
    root, cfg = tiny_sweep
    before = snapshot(root)
    assert lenx("sweep", "--config", cfg, "--dry-run") == 0
    assert snapshot(root) == before
    out = capsys.readouterr().out
    assert "4 training runs" in out and "12 evaluation cells" in out and "estimated" in out


def test_sweep_report_and_rerun(tiny_sweep, capsys, monkeypatch):
    from lenx import progress as progress_module

    bars = []
    make = progress_module.progress
    monkeypatch.setattr(progress_module, "progress", lambda **kw: bars.append(make(**kw)) or bars[-1])
    root, cfg = tiny_sweep
    assert lenx("sweep", "--config", cfg) == 0
    res = root / "results"
    for name in ("report.md", "report.html", "ppl_vs_length.png", "training_loss.png", "results.csv"):
        assert (res / name).exists(), name
    df = pd.read_csv(res / "results.csv")
    assert len(df) == 2 * 2 * 3 and set(df["seed"]) == {0, 1}
    md = (res / "report.md").read_text()
    assert "geometric mean" in md and "relative to 1×" in md and "Provenance" in md and "dataset_fingerprint" in md
    assert "- lenx_version: 0.1.0\n" in md and "['" not in md  # provenance values as text, not Python lists
    html = (res / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 2 and "<table>" in html
    stamped = list(res.glob("results_*.json"))
    assert len(stamped) == 1
    js = json.loads(stamped[0].read_text())
    cell = js["results"]["alibi@32"]
    assert cell["token_perplexity,none"] > 1 and cell["token_perplexity_stderr,none"] >= 0
    assert cell["bits_per_byte_stderr,none"] == "N/A"  # the harness's word for a metric with no standard error
    assert js["config"]["sweep"]["name"] == "tiny"
    # lm-evaluation-harness's layout: every task in each per-task table, task versions apart from software versions
    tasks = set(js["results"])
    assert len(tasks) == 2 * 3 and all(set(js[key]) == tasks for key in
                                       ("configs", "versions", "n-shot", "higher_is_better", "n-samples"))
    assert js["n-samples"]["alibi@32"] == {"original": 2, "effective": 2} and cell["sample_len"] == 2
    assert js["higher_is_better"]["alibi@32"] == {"token_perplexity": False, "bits_per_byte": False,
                                                  "ppl_relative_to_1x": False, "context_gain_nats": True}
    assert isinstance(cell["context_gain_nats,none"], float) and js["results"]["alibi@16"]["context_gain_nats,none"] is None
    assert "context gain at" in md and (res / "context_gain.png").exists()
    assert {k.split(",")[0].removesuffix("_stderr") for k in cell if "," in k} == set(js["higher_is_better"]["alibi@32"])
    assert all(isinstance(v, (int, float, str)) for v in js["versions"].values())
    assert set(js["software_versions"]) == {"lenx", "torch", "transformers", "python"}
    assert js["software_versions"]["lenx"] == "0.1.0" and js["software_versions"]["torch"]
    assert js["configs"]["alibi@32"]["eval_len"] == 32 and js["configs"]["alibi@32"]["scheme"] == "alibi"

    # the geometric mean over the two seeds, and the Student-t interval on log ppl: never below zero
    log = np.log(df[(df["pe"] == "alibi") & (df["eval_len"] == 32)]["ppl"])
    mean, factor = np.exp(log.mean()), np.exp(12.706 * log.std(ddof=1) / 2**0.5)
    assert f"{mean:.2f} [{mean / factor:.2f}–{mean * factor:.2f}]" in md
    assert cell["token_perplexity,none"] == pytest.approx(mean)

    before = snapshot(root / "runs")
    rows = pd.read_csv(res / "results.csv")
    capsys.readouterr()
    assert lenx("sweep", "--config", cfg, "--dry-run") == 0
    assert "0 training runs, 0 evaluation cells" in capsys.readouterr().out
    assert lenx("sweep", "--config", cfg) == 0
    assert snapshot(root / "runs") == before  # nothing retrained
    assert len(bars) == 2 and all(bar.tasks[0].percentage == 100 for bar in bars)  # also with nothing left to do
    pd.testing.assert_frame_equal(pd.read_csv(res / "results.csv"), rows)  # nothing re-evaluated


def test_changed_train_or_eval_settings_are_refused(tmp_path, capsys):
    """A rerun whose train: or eval: section changed refuses, naming the run or cell and the fix; it never reuses
    models or rows made with the old settings (and `lenx eval` into the same --out refuses the same way)."""
    corpus = tmp_path / "corpus.txt"
    write_corpus(corpus)
    cfg = tmp_path / "s.yaml"

    def write(train="", evals=""):
        cfg.write_text(f"""name: tiny
schemes: [rope]
train: {{dataset: {corpus}, steps: 3, warmup: 1, train_len: 16, batch_size: 2, layers: 1, d_model: 16, heads: 2, d_ff: 32{train}}}
eval: {{max_len: 32, tokens: 64{evals}}}
runs_dir: {tmp_path / 'runs'}
results_dir: {tmp_path / 'results'}
""")

    def refused(*needles):
        for args in (["--dry-run"], []):
            assert lenx("sweep", "--config", cfg, *args) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and all(n in err for n in needles), err

    write()
    assert lenx("sweep", "--config", cfg) == 0
    run, res = tmp_path / "runs" / "rope-L16-s0", tmp_path / "results"
    saved = {p: p.read_bytes() for p in (run / "run.json", res / "results.csv", res / "sweep_config.yaml")}

    write(train=", steps: 4, d_ff: 64")
    refused(str(run), "different config (d_ff, steps)", "runs_dir")
    write(evals=", tokens: 128")
    refused("rope-L16-s0 @16", "token_budget 64, not 128", "results_dir")
    write(evals=", position_buckets: 4")
    refused("bucket_width 16, not 4", "results_dir")
    assert {p: p.read_bytes() for p in saved} == saved  # nothing retrained, re-evaluated or rewritten

    assert lenx("eval", run, "--max-len", "32", "--tokens", "128", "--out", res) == 2
    assert "token_budget 64, not 128" in capsys.readouterr().err and (res / "results.csv").read_bytes() == saved[
        res / "results.csv"]
    write(evals=", tokens: 128")  # into a new results_dir the same runs are evaluated afresh
    cfg.write_text(cfg.read_text().replace("results_dir: " + str(res), f"results_dir: {tmp_path / 'results2'}"))
    assert lenx("sweep", "--config", cfg) == 0
    assert (pd.read_csv(tmp_path / "results2" / "results.csv")["tokens"] == 128).all()
    assert (run / "run.json").read_bytes() == saved[run / "run.json"]


ROPE = "schemes: [rope]\nseeds: [0]\n"


@pytest.mark.parametrize("body, needle", [
    ("schemes: [alibi]\nbogus: 1\n", "bogus"),
    ("pe: rope\nsteps: 5\n", "bad.yaml is a training config; train one run with `lenx train --config"),
    ("schemes: []\n", "schemes"),
    ("schemes: [nosuch]\n", "known schemes"),
    ("schemes: [alibi]\ntrain: {stepz: 3}\n", "stepz"),
    ("schemes: [alibi]\neval: {max_length: 3}\n", "eval.max_length"),
    ("schemes: [alibi]\nseeds: [a]\n", "seeds"),
    ("schemes: [alibi]\nseeds: [true]\n", "seeds"),
    ("schemes: [alibi]\nseeds: [0, 1, 0]\n", "'seeds' lists 0 twice"),
    ("schemes: [alibi, rope, alibi]\n", "'schemes' lists alibi twice"),
    # eval: values get the checks `lenx eval` gives its flags, when the file is read (--dry-run included)
    (ROPE + "eval: {max_len: -5}\n", "bad.yaml: eval.max_len must be a positive integer, got -5"),
    (ROPE + "eval: {max_len: 0}\n", "bad.yaml: eval.max_len must be a positive integer, got 0"),
    (ROPE + "eval: {max_len: 64}\n", "bad.yaml: eval.max_len 64 is below the training length 128"),
    (ROPE + "eval: {lengths: [64, -128]}\n", "bad.yaml: eval.lengths must be positive integers, got -128"),
    (ROPE + "eval: {tokens: many}\n", "bad.yaml: eval.tokens must be a positive integer, got 'many'"),
    (ROPE + "eval: {tokens: -3}\n", "bad.yaml: eval.tokens must be a positive integer, got -3"),
    (ROPE + "eval: {rope_scaling: [yarn], rope_factor: [0.5]}\n", "bad.yaml: eval.rope_factor needs finite factors >= 1"),
    (ROPE + "eval: {rope_factor: 2}\n", "bad.yaml: eval.rope_factor needs eval.rope_scaling other than none"),
    (ROPE + "eval: {rope_scaling: [pie]}\n",
     "bad.yaml: unknown eval.rope_scaling 'pie' (did you mean 'pi'?); known: none, pi, ntk, dynamic-ntk, yarn"),
    (ROPE + "eval: {protocols: [sliding], stride: 0}\n", "bad.yaml: eval.stride must be a positive integer, got 0"),
    (ROPE + "eval: {protocols: [sliding], stride: 200}\n", "bad.yaml: eval.stride 200 must be between 1 and"),
    (ROPE + "eval: {stride: 8}\n", "bad.yaml: eval.stride applies to the sliding protocol; add eval.protocols sliding"),
    (ROPE + "eval: {position_buckets: 0}\n", "bad.yaml: eval.position_buckets must be a positive integer, got 0"),
    (ROPE + "eval: {protocols: overlapping}\n", "bad.yaml: unknown protocol 'overlapping' in eval.protocols"),
    (ROPE + "eval: {protocol: overlapping}\n", "bad.yaml: unknown protocol 'overlapping' in eval.protocol;"),
    (ROPE + "eval: {protocol: sliding, protocols: [truncate]}\n", "bad.yaml: eval.protocol and eval.protocols"),
    # train: values get `lenx train`'s checks, naming the key of the file
    (ROPE + "train: {steps: -1}\n", "bad.yaml: train.steps must be a positive integer, got -1"),
    (ROPE + "train: {mix: {passkey: 1.5}}\n", "bad.yaml: train.mix: the share of 'passkey' must lie in (0, 1], got 1.5"),
    (ROPE + "train: {mix: {needle: 0.1}}\n", "bad.yaml: train.mix: unknown probe 'needle'; known: passkey, mqar"),
    (ROPE + "train: {mix: {passkey: 0.6, mqar: 0.6}}\n", "add up to 1.2"),
    (ROPE + "train: {mix: passkey}\n", "bad.yaml: train: key 'mix' must be dict"),
    (ROPE + "train: {passkey_format: yarn}\n", "bad.yaml: train.passkey_format: unknown passkey format 'yarn'; known:"),
    (ROPE + "train: {precision: fp8}\n", "bad.yaml: train.precision: unknown precision 'fp8'; known: auto"),
    (ROPE + "eval: {probe: [needle]}\n", "bad.yaml: unknown probe 'needle' in eval.probe; known: passkey, mqar"),
    (ROPE + "eval: {probe: [passkey], probe_trials: 0}\n", "bad.yaml: eval.probe_trials must be a positive integer"),
    (ROPE + "eval: {probe: [passkey], probe_depths: [2]}\n", "bad.yaml: eval.probe_depths must lie in [0, 1]"),
    (ROPE + "eval: {probe: [repeat], probe_distances: [-1]}\n", "bad.yaml: eval.probe_distances must be positive"),
    (ROPE + "runs_dir: 5\n", "bad.yaml: 'runs_dir' must be a directory path (text), got 5"),
    (ROPE + "results_dir: [a]\n", "bad.yaml: 'results_dir' must be a directory path (text), got ['a']"),
])
def test_bad_sweep_config_is_one_line(tmp_path, capsys, monkeypatch, body, needle):
    monkeypatch.chdir(tmp_path)  # default runs/ and results/ would land here
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(body)
    for dry_run in (["--dry-run"], []):
        assert lenx("sweep", "--config", cfg, *dry_run) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err
    assert [p.name for p in tmp_path.iterdir()] == ["bad.yaml"]  # refused before anything ran


def test_eval_protocol_key_as_the_flag_spells_it(tmp_path):
    """`lenx eval --protocol` is `protocol:` in a sweep's eval: section as well as `protocols:`."""
    from lenx.sweep import load_sweep

    cfg = tmp_path / "s.yaml"
    cfg.write_text(ROPE + "eval: {protocol: 'sliding,truncate'}\n")
    assert load_sweep(cfg).eval["protocols"] == ["sliding", "truncate"]


def test_shipped_sweep_configs_load(capsys):
    from lenx.sweep import load_sweep

    configs = sorted(Path(__file__).parent.parent.glob("configs/*.yaml"))
    sweeps = [c for c in configs if c.name != "default.yaml"]
    assert {c.stem for c in sweeps} >= {"quick", "cpu", "alibi-wikitext103", "kerple-openwebtext2"}
    for c in sweeps:
        spec = load_sweep(c)
        assert spec.schemes and spec.seeds
    quick = load_sweep(Path(__file__).parent.parent / "configs" / "quick.yaml")
    from lenx.positional import REGISTRY

    assert set(quick.schemes) == set(REGISTRY)


def test_default_yaml_lists_every_training_key():
    import dataclasses

    from lenx.config import DEFAULTS_FILE, TrainConfig, read_yaml

    assert set(read_yaml(DEFAULTS_FILE)) == {f.name for f in dataclasses.fields(TrainConfig)}


def test_plan_durations_read_well():
    from lenx.sweep import _fmt_seconds

    assert [_fmt_seconds(s) for s in (0, 0.2, 0.6, 75, 3700)] == ["0m00s", "<1s", "0m01s", "1m15s", "1h01m"]


def test_report_notes_keep_every_distinct_note_with_its_lengths():
    from lenx.render import note_lines

    summary = pd.DataFrame({
        "scheme": ["alibi"] * 4 + ["rope"],
        "protocol": ["documents"] * 5,
        "eval_len": [512, 1024, 2048, 4096, 4096],
        "note": ["", "3 test documents qualify", "3 test documents qualify", "no test document has 4097 tokens",
                 "no test document has 4097 tokens"],
    })
    assert note_lines(summary) == [
        "- alibi, documents, at 1024, 2048: 3 test documents qualify",
        "- alibi, documents, at 4096: no test document has 4097 tokens",
        "- rope, documents, at 4096: no test document has 4097 tokens",
    ]
    # in the tables' order of schemes (the registry's), not alphabetically
    first_rope = pd.concat([summary.iloc[[4]], summary.iloc[:4]])
    assert [line.split(",")[0] for line in note_lines(first_rope)] == ["- rope", "- alibi", "- alibi"]


def test_dry_run_counts_the_steps_an_interrupted_run_has_left(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    write_corpus(corpus)
    cfg = tmp_path / "s.yaml"
    cfg.write_text(f"""name: one
schemes: [rope]
train: {{dataset: {corpus}, steps: 4, warmup: 1, train_len: 16, batch_size: 2, layers: 1, d_model: 16, heads: 2, save_every: 2}}
eval: {{max_len: 16, tokens: 32}}
runs_dir: {tmp_path / 'runs'}
results_dir: {tmp_path / 'results'}
""")
    assert lenx("sweep", "--config", cfg) == 0
    run = tmp_path / "runs" / "rope-L16-s0"
    # as if killed after the checkpoint at step 2: run.json not yet 'done', latest.json at step 2
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "status": "training"}))
    (run / "latest.json").write_text(json.dumps({"step": 2, "checkpoint": "checkpoint-2"}))
    capsys.readouterr()
    assert lenx("sweep", "--config", cfg, "--dry-run") == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "2 of 4 steps (resumes at 2)" in out, out


def test_published_numbers_also_in_a_later_report_of_the_results_alone(tmp_path, capsys):
    """A sweep config's published table (a path relative to the config) is printed beside ours, also when
    `lenx report RESULTS` runs later on the results directory alone: the sweep copies the table beside its
    results. That report reads the saved config without building schemes, so it never imports torch."""
    import subprocess
    import sys

    corpus = tmp_path / "corpus.txt"
    write_corpus(corpus)
    (tmp_path / "cfgs" / "pub").mkdir(parents=True)
    (tmp_path / "cfgs" / "pub" / "paper.csv").write_text(
        "pe,train_len,eval_len,ppl,source\nalibi,16,16,12.34,Someone et al. 2099\nalibi,16,32,56.78,\n")
    cfg = tmp_path / "cfgs" / "s.yaml"
    cfg.write_text(f"""name: pub
schemes: [alibi]
train: {{dataset: {corpus}, steps: 3, warmup: 1, train_len: 16, batch_size: 2, layers: 1, d_model: 16, heads: 2, d_ff: 32}}
eval: {{max_len: 32, tokens: 64}}
runs_dir: {tmp_path / 'runs'}
results_dir: {tmp_path / 'results'}
published: pub/paper.csv
""")
    assert lenx("sweep", "--config", cfg) == 0
    res = tmp_path / "results"

    def published_section() -> str:
        md = (res / "report.md").read_text()
        return md[md.index("## Published numbers"):].split("\n## ")[0]

    swept = published_section()
    assert "Paper: Someone et al. 2099." in swept and "/ 12.34 |" in swept and "/ 56.78 |" in swept
    (res / "report.md").unlink()
    code = (f"import sys\nfrom lenx.cli import main\nrc = main(['report', {str(res)!r}])\n"
            "print(rc, sorted({'torch', 'transformers'} & set(sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.stdout.splitlines()[-1] == "0 []", proc.stderr[-2000:]
    assert published_section() == swept and "# lenx report: pub" in (res / "report.md").read_text()

    (res / "published.csv").unlink()
    capsys.readouterr()
    assert lenx("report", res) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "published.csv" in err and "lenx sweep" in err, err


@pytest.mark.parametrize("key", ["runs_dir", "results_dir"])
def test_unwritable_sweep_directories_are_one_line_naming_the_key(tmp_path, capsys, monkeypatch, key):
    monkeypatch.chdir(tmp_path)  # the other directory's default lands here
    blocker = tmp_path / "file"
    blocker.write_text("")
    cfg = tmp_path / "s.yaml"
    cfg.write_text(ROPE + f"{key}: {blocker / 'sub'}\n")
    assert lenx("sweep", "--config", cfg) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"cannot write to {key} {blocker / 'sub'}" in err, err
    assert f"set another {key}" in err, err


def test_plan_estimates_use_the_runs_precision_vocabulary_and_accumulation(tmp_path, monkeypatch, capsys):
    """A run's estimated training time is its tokens x FLOPs per token (with its tokenizer's output layer) over
    the matmul peak of the precision it trains in (bf16 on CUDA under auto): a GPU config estimated against the
    fp32 peak with a 257-token vocabulary came out many times too long for bf16 and too short for GPT-2's head."""
    import torch

    from lenx import perf
    from lenx.perf import train_flops_per_token
    from lenx.sweep import ASSUMED_VOCAB, load_sweep, plan

    peaks = {torch.float32: 1e9, torch.bfloat16: 8e9}
    monkeypatch.setattr(perf, "matmul_peak", lambda device, dtype=torch.float32: peaks[dtype])
    corpus = tmp_path / "corpus.txt"
    write_corpus(corpus)

    def train_seconds(train: str, name: str) -> float:
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(f"""name: {name}
schemes: [alibi]
train: {{dataset: {corpus}, steps: 10, train_len: 16, batch_size: 4, layers: 1, d_model: 32, heads: 2, {train}}}
eval: {{max_len: 32, tokens: 64}}
runs_dir: {tmp_path / name / 'runs'}
results_dir: {tmp_path / name / 'results'}
""")
        job = next(j for j in plan(load_sweep(cfg), "cpu") if j.kind == "train")
        return job.seconds

    def expected(vocab: int, peak: float, accum: int = 1) -> float:
        return 10 * 4 * accum * 16 * train_flops_per_token(32, 1, 512, vocab, 16) / (peak * 0.5)

    assert train_seconds("precision: fp32", "fp32") == pytest.approx(expected(257, 1e9))
    assert train_seconds("precision: bf16", "bf16") == pytest.approx(expected(257, 8e9))
    assert train_seconds("precision: fp32, grad_accum: 3", "accum") == pytest.approx(expected(257, 1e9, 3))
    assert train_seconds("precision: fp32, tokenizer: 'bpe:1000'", "bpe") == pytest.approx(expected(1000, 1e9))

    # a transformers tokenizer not at hand offline: GPT-2's vocabulary assumed, and the plan says so
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = str(tmp_path / "no-such-tokenizer")
    assert train_seconds(f"precision: fp32, tokenizer: {missing}", "hf") == pytest.approx(expected(ASSUMED_VOCAB, 1e9))
    capsys.readouterr()
    assert lenx("sweep", "--config", tmp_path / "hf.yaml", "--dry-run") == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"note: tokenizer {missing} is in no run directory" in out and "50,257" in out, out


def test_plan_estimates_sliding_windows_by_the_tokens_they_run(tmp_path, monkeypatch):
    """A sliding window of L tokens scores its last `stride`: its cells cost L / stride times a non-overlapping
    cell's of the same token budget. The measured efficiency of earlier runs counts runs on cuda:0 for cuda."""
    import json

    import torch

    from lenx import perf
    from lenx.sweep import _efficiency, load_sweep, plan

    monkeypatch.setattr(perf, "matmul_peak", lambda device, dtype=torch.float32: 1e9)
    corpus = tmp_path / "corpus.txt"
    write_corpus(corpus)
    cfg = tmp_path / "s.yaml"
    cfg.write_text(f"""schemes: [alibi]
train: {{dataset: {corpus}, steps: 10, train_len: 16, batch_size: 4, layers: 1, d_model: 32, heads: 2}}
eval: {{max_len: 32, tokens: 64, protocols: [nonoverlap, sliding], stride: 4}}
runs_dir: {tmp_path / 'runs'}
results_dir: {tmp_path / 'results'}
""")
    spec = load_sweep(cfg)
    cells = {j.what: j.seconds for j in plan(spec, "cpu") if j.kind == "eval"}
    assert cells["@32 sliding/4"] == pytest.approx(cells["@32"] * 32 / 4)
    assert cells["@16 sliding/4"] == pytest.approx(cells["@16"] * 16 / 4)

    run = spec.runs_dir / "r"
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"mfu": 0.3, "device": "cuda:0"}))
    assert _efficiency(spec, "cuda") == 0.3 and _efficiency(spec, "cpu") == 0.5


def test_published_section_says_what_each_side_measured_and_compares_ratios(tmp_path):
    """The published numbers sit beside ours matched by scheme, training length and evaluation length; the
    section names the paper's setting and ours (corpus, test split, tokenizer), adds each side's ratio to its
    training length (the comparable part when units differ), shows the paper's note where it has no number,
    and says so when nothing of ours lines up. In HTML each table stays a table of its own."""
    from lenx.render import markdown_to_html, published_table
    from lenx.stats import summarise

    rows = [dict(run=f"{pe}-L{tl}-s0", pe=pe, seed=0, train_len=tl, eval_len=L, protocol="nonoverlap",
                 rope_scaling="none", rope_factor=float("nan"), dataset="stdlib", ppl=ppl, tokenizer="byte",
                 note="", bpb=float("nan"), config_id="c", run_dir=None, stride=float("nan"), tokens=64)
            for pe, tl, L, ppl in [("alibi", 16, 16, 4.0), ("alibi", 16, 32, 5.0), ("rope", 16, 16, 4.0),
                                   ("rope", 16, 32, 12.0)]]
    df = pd.DataFrame(rows)
    pub = tmp_path / "paper.csv"
    pub.write_text("pe,train_len,eval_len,ppl,note,source\n"
                   "alibi,16,16,20.0,,\"Someone 2099, wiki valid, word-level\"\nalibi,16,32,19.0,,\n"
                   "rope,16,16,20.0,,\nrope,16,32,,OOM,\n"
                   "alibi,64,64,18.0,,\nalibi,64,128,17.0,,\n")
    md = published_table(summarise(df), pub, df)
    assert "Paper: Someone 2099, wiki valid, word-level." in md
    assert "the test split of stdlib" in md and "tokenizer byte" in md and "Each cell scores 64 tokens" in md
    assert "| alibi | 4.00 / 20.00 | 5.00 / 19.00 |" in md          # perplexities, trained on 16
    assert "| alibi | 1.00 / 1.00 | 1.25 / 0.95 |" in md            # ratios to 16: ours 5/4, the paper's 19/20
    assert "| rope | 4.00 / 20.00 | 12.00 / OOM |" in md and "| rope | 1.00 / 1.00 | 3.00 / OOM |" in md
    assert "| alibi | — / 18.00 | — / 17.00 |" in md                # trained on 64: none of ours (trained on 16)
    assert "16 (1×) | 32 (2×)" in md and "64 (1×) | 128 (2×)" in md
    assert "No lenx result matches" not in md
    assert markdown_to_html(md).count("<table>") == 4

    other = df.assign(train_len=8, eval_len=df["eval_len"] * 4)      # nothing lines up with the paper's cells
    md = published_table(summarise(other), pub, other)
    assert "No lenx result matches the paper's schemes, training length and evaluation lengths" in md
    assert "trained on 8 and evaluated at 64, 128" in md


def test_a_sweep_with_probes_plans_runs_and_resumes_them(tmp_path, capsys):
    """eval: probe: in a sweep config: the dry run counts the probe cells beside perplexity's, the sweep writes
    probes.csv, and a second dry run finds every cell done."""
    corpus = tmp_path / "corpus.txt"
    write_corpus(corpus)
    cfg = tmp_path / "s.yaml"
    cfg.write_text(f"""name: probes
schemes: [alibi]
train: {{dataset: {corpus}, steps: 2, warmup: 1, train_len: 64, batch_size: 2, layers: 1, d_model: 16, heads: 2, mix: {{passkey: 0.5}}}}
eval: {{max_len: 128, tokens: 256, probe: [passkey, repeat], probe_trials: 2, probe_depths: [0, 1], probe_distances: [1]}}
runs_dir: {tmp_path / 'runs'}
results_dir: {tmp_path / 'results'}
""")
    assert lenx("sweep", "--config", cfg, "--dry-run") == 0
    # perplexity at 64 and 128; passkey at 2 depths x 2 lengths; repeat at distance 1 x L (64) where it fits with
    # its 16-token segment: at 128 only
    assert "1 training runs, 7 evaluation cells" in capsys.readouterr().out
    assert lenx("sweep", "--config", cfg) == 0
    probes = pd.read_csv(tmp_path / "results" / "probes.csv")
    assert sorted(probes["probe"].unique()) == ["passkey", "repeat"] and len(probes) == 2 * 2 + 1
    run = json.loads((tmp_path / "runs" / "alibi-L64-s0" / "run.json").read_text())
    assert run["config"]["mix"] == {"passkey": 0.5}
    capsys.readouterr()
    assert lenx("sweep", "--config", cfg, "--dry-run") == 0
    assert "0 training runs, 0 evaluation cells" in capsys.readouterr().out
