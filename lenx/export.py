"""`lenx export RUN_DIR --out DIR`: a run as a self-contained Hugging Face model directory.

DIR holds config.json, model.safetensors, generation_config.json, the run's tokenizer as transformers reads it
(`tokenizer.json` for the `tokenizers` library + `tokenizer_config.json`, so `AutoTokenizer.from_pretrained(DIR)`
works), README.md (a model card: the run's config and its results, if any) and lenx_run.json (the run's
run.json). After `import lenx`, `AutoModelForCausalLM.from_pretrained(DIR)` loads it, so does
lm-evaluation-harness's `hf` model in a process that imported lenx; remote code is never involved.

The byte tokenizer is written as an equivalent `tokenizers` tokenizer: a byte-level pre-tokenizer without
splitting (each UTF-8 byte becomes one alphabet character) and a BPE model without merges whose vocabulary maps
the character of byte b to id b, plus `<|endoftext|>` as the special end-of-document token 256.

The directory is built under a temporary name beside DIR, checked (the tokenizer is reloaded with AutoTokenizer
and must give lenx's ids; the model is reloaded with AutoModelForCausalLM and must give lenx's logits), then
renamed into place. An existing non-empty DIR is refused unless `overwrite`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from .data import EOD_TOKEN, BPETokenizer, ByteTokenizer, HFTokenizer, Tokenizer, byte_decoder as _byte_decoder
from .errors import LenxError
from .subject import check_run_matches, load_model, read_run, run_tokenizer

CHECK_TEXT = "def f(x):\n    return x  # naïve café, 日本語, emoji 🙂, tab\t, CRLF\r\n, NUL \x00 end"


def byte_tokenizer_json():
    """lenx's ByteTokenizer as a `tokenizers` Tokenizer: byte b -> id b, `<|endoftext|>` -> 256."""
    from tokenizers import AddedToken, Tokenizer as HFTok, decoders, models, pre_tokenizers

    char_of = {b: c for c, b in _byte_decoder().items()}
    tk = HFTok(models.BPE(vocab={char_of[b]: b for b in range(256)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(EOD_TOKEN, special=True, normalized=False)])
    if tk.token_to_id(EOD_TOKEN) != ByteTokenizer.eod_id:
        raise RuntimeError("byte tokenizer: <|endoftext|> did not get id 256")
    return tk


def hf_tokenizer(tok: Tokenizer, max_len: int | None):
    """The run's tokenizer as a transformers tokenizer object (saved with save_pretrained). Its model_max_length
    is the longest sequence the model's scheme represents (a learned table's length), else transformers'
    "no limit": a length-extrapolation model is meant to read past its training length."""
    from transformers import PreTrainedTokenizerFast

    if isinstance(tok, (ByteTokenizer, BPETokenizer)):
        if isinstance(tok, ByteTokenizer):
            tk = byte_tokenizer_json()
        else:
            from tokenizers import Tokenizer as HFTok

            tk = HFTok.from_str(tok.tk.to_str())  # a copy: the run's tokenizer object stays as it is
        limit = {} if max_len is None else {"model_max_length": max_len}
        return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=EOD_TOKEN, **limit)
    if isinstance(tok, HFTokenizer):
        # without an eos token, lenx gave it one extra id for end of document: name that token
        return tok.tok if tok.tok.eos_token_id is not None else _copy_with_eos(tok)
    raise LenxError(f"cannot export a tokenizer of kind '{tok.kind}'")


def _copy_with_eos(tok: HFTokenizer):
    import copy

    t = copy.deepcopy(tok.tok)
    name = next(n for n in (EOD_TOKEN, "<|lenx_eod|>", "<|lenx_end_of_document|>") if n not in t.get_vocab())
    t.add_special_tokens({"eos_token": name})
    if t.eos_token_id != tok.eod_id:
        raise LenxError(
            f"the run's tokenizer has no eos token and {EOD_TOKEN} would get id {t.eos_token_id}, not the run's "
            f"end-of-document id {tok.eod_id}; cannot export it faithfully"
        )
    return t


def model_card(run_dir: Path, info: dict, results, name: str | None = None) -> str:
    """The exported directory's README; `name`: what the loading code reads from (the export's directory name)."""
    cfg = info["config"]
    name = name or run_dir.name
    lines = [
        "---",
        "library_name: transformers",
        "tags: [lenx, length-extrapolation, positional-encoding]",
        "---",
        "",
        f"# {name}",
        "",
        f"A small causal language model trained by lenx (a length-extrapolation benchmark) with the **{cfg['pe']}** positional "
        f"scheme at a training length of {cfg['train_len']} tokens, exported with `lenx export`.",
        "",
        "## Load it",
        "",
        "```python",
        "import lenx  # registers the `lenx` model type with transformers; no remote code",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{name}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
        "```",
        "",
        "lm-evaluation-harness (`hf` model), from a process that imported lenx:",
        "",
        "```python",
        "import lenx, lm_eval",
        f'lm_eval.simple_evaluate(model="hf", model_args="pretrained={name}", tasks=["lambada_openai"])',
        "```",
        "",
        "The model has no KV cache: `generate()` re-reads the whole prefix at every step.",
        "",
        "## Training configuration",
        "",
        "| key | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {_cell(v)} |" for k, v in cfg.items()]
    for key in ("lenx_version", "torch_version", "git_commit", "device_name", "train_seconds", "tokens_per_s"):
        if info.get(key) is not None:
            lines.append(f"| {key} | {_cell(info[key])} |")
    lines += ["", "## Results", ""]
    if results is not None and len(results):
        cols = [c for c in ("eval_len", "ratio", "protocol", "stride", "rope_scaling", "rope_factor", "dataset", "tokens",
                            "ppl", "bpb", "note") if c in results]
        if "stride" in results:  # whole tokens (a float column, empty for truncate), not 1.638e+04
            results = results.assign(stride=results["stride"].round().astype("Int64"))
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for _, r in results[cols].iterrows():
            lines.append("| " + " | ".join(_cell(r[c]) for c in cols) + " |")
        lines += ["", "Perplexity at each evaluation length (`lenx eval`); an empty ppl has its reason in the note."]
    else:
        lines.append("No `lenx eval` results were found for this run.")
    return "\n".join(lines) + "\n"


def _cell(v) -> str:
    try:
        import pandas as pd

        if v is None or (not isinstance(v, (list, dict)) and pd.isna(v)):
            return ""
    except (TypeError, ValueError):
        pass
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def run_results(run_dir: Path, results_dir: Path | None):
    """This run's rows of results_dir/results.parquet (matched by run directory, else by run name), or None."""
    import pandas as pd

    from .store import sync

    if results_dir is None:
        return None
    sync(results_dir)
    if not (Path(results_dir) / "results.parquet").exists():
        return None
    try:
        df = pd.read_parquet(Path(results_dir) / "results.parquet")
    except Exception:
        return None
    if "run_dir" in df and (df["run_dir"].astype(str) == str(run_dir)).any():
        return df[df["run_dir"].astype(str) == str(run_dir)]
    return df[df["run"].astype(str) == run_dir.name] if "run" in df else None


def export(run_dir: str | Path, out: str | Path, overwrite: bool = False, results_dir: str | Path | None = "results",
           ) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .io import readable, umask, write_json, write_text
    from .runinfo import quiet_hf

    quiet_hf()
    run_dir, out = Path(run_dir), Path(out)
    info = read_run(run_dir)
    if out.resolve() == run_dir.resolve():
        raise LenxError(f"--out {out} is the run directory itself; choose another directory")
    if run_dir.resolve().is_relative_to(out.resolve()):  # --overwrite would delete the run (and its neighbours)
        raise LenxError(f"--out {out} holds the run directory {run_dir}; choose another directory")
    if Path.cwd().resolve().is_relative_to(out.resolve()):  # e.g. --out . (or ""): it cannot be renamed into place
        raise LenxError(f"--out '{out}' holds the current directory; choose another directory")
    if out.exists() and not out.is_dir():
        raise LenxError(f"--out {out} is a file; choose a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise LenxError(f"--out {out} exists and is not empty; choose another directory or pass --overwrite")
    model = load_model(run_dir, "cpu")
    tok = run_tokenizer(run_dir, info)
    check_run_matches(run_dir, model, info["config"], tok)
    hf_tok = hf_tokenizer(tok, model.pe.max_len)

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as e:
        raise LenxError(f"cannot write beside {out}: {e.strerror}; choose another --out") from None
    try:
        model.save_pretrained(tmp)
        hf_tok.save_pretrained(tmp)
        write_json(tmp / "lenx_run.json", info)
        write_text(tmp / "README.md", model_card(run_dir, info, run_results(run_dir, results_dir), name=out.name))
        _check(tmp, model, tok, AutoModelForCausalLM, AutoTokenizer)
        for f in tmp.rglob("*"):
            if f.is_file():  # temporary files are created 0600: give the directory the usual permissions
                readable(f)
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        os.chmod(tmp, 0o777 & ~umask())
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / "dir")
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


@torch.no_grad()
def _check(tmp: Path, model, tok: Tokenizer, auto_model, auto_tok) -> None:
    """The written directory must load with plain transformers and agree with lenx."""
    t = auto_tok.from_pretrained(tmp, trust_remote_code=False, local_files_only=True)
    want = [int(i) for i in tok.encode(CHECK_TEXT)]
    got = t(CHECK_TEXT, add_special_tokens=False)["input_ids"]
    if got != want or t.eos_token_id != tok.eod_id:
        raise LenxError("the exported tokenizer does not reproduce the run's tokens; nothing was written")
    m = auto_model.from_pretrained(tmp, use_safetensors=True, trust_remote_code=False, local_files_only=True).eval()
    ids = torch.tensor([want[: model.config.train_len]])
    if not torch.equal(m(ids).logits, model(ids).logits):
        raise LenxError("the exported model does not reproduce the run's logits; nothing was written")
