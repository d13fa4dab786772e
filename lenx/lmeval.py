"""The summary as an lm-evaluation-harness results file (`results_<timestamp>.json`): tools that read the
harness's output (its result tables, leaderboards, trackers) read lenx's.

Each summary cell is a task, named `<scheme>@<eval_len>` (plus `/<protocol>` for protocols other than
nonoverlap). As in the harness: `results` holds `metric,filter` keys (filter `none`) with `metric_stderr,none`
beside them ("N/A" where no standard error is defined), `versions` each task's version, `higher_is_better` each
task's metrics, `n-samples` each task's sample counts. lenx's samples are seeds: the standard errors are over
seeds, `original` counts the seeds the scheme was evaluated with, `effective` those with a perplexity there.

The retrieval probes (`lenx eval --probe`) are tasks `<scheme>@<eval_len>/<probe>` (pooled over depths or
distances, `lenx.stats.probe_summary`) with their own metrics (`PROBE_METRICS`); their standard errors are over
seeds, or with one seed over its key tokens (accuracy), trials (exact_match, gain), none for key_nll."""

from __future__ import annotations

import platform
from datetime import datetime, timezone
from importlib import metadata

import pandas as pd

TASK_VERSION = 1  # of what a task reports and how: bump when a metric's meaning changes

METRICS = {  # metric -> (summary column, its standard error's column or None, higher is better)
    "token_perplexity": ("ppl", "ppl_stderr", False),
    "bits_per_byte": ("bpb", None, False),
    "ppl_relative_to_1x": ("rel_1x", "rel_1x_stderr", False),
    "context_gain_nats": ("context_gain", "context_gain_stderr", True),
}


PROBE_METRICS = {  # the probes' tasks: metric -> (summary column, its standard error's column, higher is better)
    "accuracy": ("accuracy", "accuracy_stderr", True),
    "exact_match": ("exact_match", "exact_match_stderr", True),
    "key_nll": ("key_nll", "key_nll_stderr", False),
    "gain": ("gain", "gain_stderr", True),
}


def task_name(r) -> str:
    return f"{r.scheme}@{r.eval_len}" + ("" if r.protocol == "nonoverlap" else f"/{r.protocol}")


def task_alias(r) -> str:
    return f"{r.scheme} at {r.eval_len} tokens, {r.protocol}"


def _value(x):
    return None if pd.isna(x) else float(x)


def probe_task_name(r) -> str:
    return f"{r.scheme}@{r.eval_len}/{r.probe}"


def task_results(r, metrics: dict = METRICS, name=task_name, alias=task_alias) -> dict:
    """One summary row as the harness's per-task metrics."""
    out = {"name": name(r), "alias": alias(r), "sample_len": int(r.seeds)}
    for metric, (column, stderr, _) in metrics.items():
        out[f"{metric},none"] = _value(getattr(r, column))
        se = _value(getattr(r, stderr)) if stderr else None
        out[f"{metric}_stderr,none"] = "N/A" if se is None else se
    return out


def software_versions(prov: dict) -> dict:
    """lenx, transformers and python of the environment writing the file; torch as the first run recorded it."""
    from . import __version__

    def installed(name: str):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {"lenx": __version__, "torch": prov.get("torch_version") or installed("torch"),
            "transformers": installed("transformers"), "python": platform.python_version()}


def lm_eval_json(summary: pd.DataFrame | None, prov: dict, config, probes=None) -> dict:
    """The results file: per-task results, configs, versions, higher_is_better and n-samples in the harness's
    layout; the sweep and training configs under `config`; software versions and provenance under their own keys.
    `probes` (`lenx.stats.ProbeTables`): their pooled rows as tasks of their own."""
    rows = list(summary.itertuples()) if summary is not None else []
    tasks = [task_name(r) for r in rows]
    probe_rows = list(probes.pooled.itertuples()) if probes is not None else []
    probe_tasks = [probe_task_name(r) for r in probe_rows]

    def probe_alias(r):
        return f"{r.scheme} at {r.eval_len} tokens, {r.probe}"

    higher = {metric: h for metric, (_, _, h) in METRICS.items()}
    probe_higher = {metric: h for metric, (_, _, h) in PROBE_METRICS.items()}
    return {
        "results": {**{t: task_results(r) for t, r in zip(tasks, rows)},
                    **{t: task_results(r, PROBE_METRICS, probe_task_name, probe_alias)
                       for t, r in zip(probe_tasks, probe_rows)}},
        "configs": {**{t: {"task": t, "task_alias": task_alias(r),
                           "scheme": r.scheme, "protocol": r.protocol, "train_len": int(r.train_len),
                           "eval_len": int(r.eval_len)} for t, r in zip(tasks, rows)},
                    **{t: {"task": t, "task_alias": probe_alias(r), "scheme": r.scheme, "probe": r.probe,
                           "train_len": int(r.train_len), "eval_len": int(r.eval_len), "trials": int(r.trials),
                           "stderr_over": r.interval or None} for t, r in zip(probe_tasks, probe_rows)}},
        "versions": {t: TASK_VERSION for t in tasks + probe_tasks},
        "n-shot": {t: 0 for t in tasks + probe_tasks},
        "higher_is_better": {**{t: dict(higher) for t in tasks}, **{t: dict(probe_higher) for t in probe_tasks}},
        "n-samples": {**{t: {"original": int(r.evaluated_seeds), "effective": int(r.seeds)}
                         for t, r in zip(tasks, rows)},
                      **{t: {"original": int(r.evaluated_seeds), "effective": int(r.seeds)}
                         for t, r in zip(probe_tasks, probe_rows)}},
        "config": {"sweep": config.raw if config is not None else None, "training": prov.get("training_config")},
        "git_hash": prov.get("git_commit"),
        "date": datetime.now(timezone.utc).timestamp(),
        "software_versions": software_versions(prov),
        "provenance": {k: v for k, v in prov.items() if k != "training_config"},
    }
