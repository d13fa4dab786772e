"""Any Hugging Face causal LM as something `lenx eval --model` scores, through the same cells as lenx runs.

A model is a local directory (`save_pretrained`: config.json + model.safetensors + its tokenizer) or a hub
name (the usual HF cache; offline, a one-line error says how to supply a local copy). It is loaded with
`AutoConfig` / `AutoModelForCausalLM` / `AutoTokenizer`, safetensors only, never remote code, with its own
attention implementation (transformers picks `sdpa` where the model has one).

- 1x (the `train_len` column) is the config's `max_position_embeddings` (`n_positions`; MPT: `max_seq_len`)
  unless `--train-len` says otherwise.
- `pe` is `<model_type>/<scheme>`, the scheme from `SCHEMES` (Falcon per config), else `unknown`.
- RoPE extensions go through transformers' own `rope_parameters` (set on the config before the weights are
  loaded): pi -> `linear`, dynamic-ntk -> `dynamic`, yarn, llama3 and longrope -> their namesakes, with their
  parameters (`lenx.positional.rope_scaling.hf_parameters`); each (extension, factor) loads the model afresh. Static NTK has no transformers rope type, so it is refused for HF models.
- Attention-level extensions (self-extend, rerope, dca, sinks, lambda, ...) go through transformers' attention
  registry (`lenx.hf_extend`), for the architectures it names; other models are refused with one line.
- Learned absolute positions (GPT-2, OPT, GPT-Neo, ...) past the table: the cell gets an empty ppl and a note
  (the length is checked before the model runs, as lenx's own learned scheme does).
- Position tables that transformers computes from a config attribute alone, with no weights in them (MPT's ALiBi
  bias: `max_seq_len`; GPT-J's and CodeGen's rotary sin/cos: `n_positions`) are built for the longest length
  evaluated (`TABLES`): the model is scored as its scheme extends, not stopped at the table's end (a shape or
  index error). Shorter positions keep their values (ALiBi up to a constant per query row, which softmax ignores).
- A `lenx export` directory (model_type `lenx`) is an `ExportedRun`: loaded and recorded as any HF model, its
  positions handled as a lenx run's (its scheme and training length from its config, lenx's own extensions).
"""

from __future__ import annotations

import copy
import inspect
from pathlib import Path

import numpy as np
import torch

from .data import HFTokenizer
from .errors import LengthNotSupported, LenxError, first_line, is_oom
from .hub import is_path, offline_reason, unreachable_note
from .ids import files_id, short_hash
from .positional.rope import scaling_plan
from .runinfo import quiet_hf
from .subject import Subject

# model_type -> positional scheme (Falcon's is decided per config in `scheme_of`; an MPT without ALiBi is refused)
SCHEMES = {
    **dict.fromkeys(["gpt2", "gpt_neo", "opt", "gpt_bigcode", "biogpt", "imagegpt"], "learned"),
    **dict.fromkeys(["xglm"], "sinusoidal"),
    **dict.fromkeys(["bloom", "mpt"], "alibi"),
    **dict.fromkeys([
        "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text",
        "phi", "phi3", "gpt_neox", "gpt_neox_japanese", "gptj", "codegen", "stablelm", "olmo", "olmo2", "starcoder2",
        "cohere", "persimmon", "falcon", "granite", "smollm3", "helium", "glm", "exaone4",
    ], "rope"),
    **dict.fromkeys(["mamba", "mamba2", "rwkv"], "none"),
}
# model_type -> the config attribute that sizes a position table transformers computes with no weights in it
TABLES = {"mpt": "max_seq_len", "gptj": "n_positions", "codegen": "n_positions"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LONG_LEN = 2048  # at and past this window length an HF model is run one window at a time


def scheme_of(config) -> str:
    """The positional scheme of a transformers config, `unknown` for model types lenx does not know."""
    mt = config.model_type
    if mt == "falcon":
        return "alibi" if getattr(config, "alibi", False) else "rope"
    return SCHEMES.get(mt, "unknown")  # MPT: transformers' MptModel always adds ALiBi (it has no position table)


def max_positions(config) -> int | None:
    """The config's position count (its own idea of 1x), or None when it has none (ALiBi models)."""
    for attr in ("max_seq_len", "max_position_embeddings", "n_positions") if config.model_type == "mpt" else (
            "max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def rope_scaled(config, scaling: str, factor: float | None, train_len: int, name: str):
    """A copy of `config` whose `rope_parameters` ask transformers for the RoPE extension `scaling` (a setting
    with its parameters) with scale s = factor (dynamic-ntk without a factor: s = 1, i.e.
    base * (n / train_len)^(d/(d-2)) per length n), original length train_len."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from .positional.rope_scaling import METHODS, ScalingError, hf_parameters, method_of

    hf_type = METHODS[method_of(scaling)].hf_type
    if hf_type not in ROPE_INIT_FUNCTIONS:
        takes = [n for n, m in METHODS.items() if m.hf_type in ROPE_INIT_FUNCTIONS]
        raise LenxError(
            f"--rope-scaling {method_of(scaling)} has no transformers rope type (this transformers has "
            f"{', '.join(ROPE_INIT_FUNCTIONS)}), so it cannot be applied to the HF model {name}; use "
            f"{', '.join(takes)} (lenx runs take every method)"
        )
    config = copy.deepcopy(config)
    rp = dict(config.rope_parameters)
    new = {k: rp[k] for k in ("rope_theta", "partial_rotary_factor") if k in rp}
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    try:
        new.update(hf_parameters(scaling, factor, train_len, head_dim, float(rp["rope_theta"]),
                                 float(rp.get("partial_rotary_factor", 1.0))))
    except ScalingError as e:
        raise LenxError(f"model {name}: {e}") from None
    if hf_type == "dynamic":
        config.max_position_embeddings = train_len  # transformers' dynamic NTK reads its original length here
    config.rope_parameters = new
    return config


class HFForward:
    """What `score_windows` calls: the model without a KV cache; a window past a learned position table raises
    `LengthNotSupported` before the model sees it."""

    def __init__(self, model, limit: int | None, name: str):
        self.model, self.limit, self.name = model, limit, name
        self.kwargs = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}

    def __call__(self, input_ids: torch.Tensor):
        T = input_ids.shape[1]
        if self.limit is not None and T > self.limit:
            raise LengthNotSupported(
                f"learned positions of {self.name} end at {self.limit}; position {T - 1} has no vector"
            )
        return self.model(input_ids=input_ids, **self.kwargs)

    @property
    def decodes(self) -> bool:
        """Whether `greedy` is worth calling: the model has a KV cache (a lenx model has none: its greedy answer is
        read off the teacher-forced pass instead)."""
        # lenx models have no cache; lenx_extend (attention-level extensions) scores whole windows only
        cfg = self.model.config
        return getattr(cfg, "model_type", None) != "lenx" and getattr(cfg, "_attn_implementation", None) != "lenx_extend"

    @torch.no_grad()
    def greedy(self, prompt, max_new_tokens: int):
        """Greedy decoding of up to `max_new_tokens` after `prompt` (1-D token ids) with the model's KV cache, never
        past a learned position table: the new token ids."""
        from transformers import GenerationConfig

        ids = torch.as_tensor(np.asarray(prompt, dtype=np.int64))[None].to(self.model.device)
        T = ids.shape[1]
        if self.limit is not None:
            max_new_tokens = min(max_new_tokens, self.limit - T)
        if max_new_tokens <= 0:
            return np.zeros(0, dtype=np.int64)
        eos = self.model.config.eos_token_id
        pad = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                                  pad_token_id=pad if isinstance(pad, int) else 0, eos_token_id=eos)
        out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
        return out[0, T:].cpu().numpy()


class Location:
    """Where `--model NAME` is read from: a local directory (`save_pretrained`; resolved, so that one directory
    however it is named is one model) or a hub name (the HF cache; without the Hub, the cache at once)."""

    def __init__(self, name: str):
        quiet_hf()
        self.given = name
        path = Path(name).expanduser()
        self.local = path.exists()
        if self.local:
            if not path.is_dir() or not (path / "config.json").exists():
                raise LenxError(
                    f"--model {name} is not a model directory (no config.json); give a save_pretrained directory "
                    "or a hub name"
                )
            path = path.resolve()
            self.source, self.name = str(path), path.name
        elif is_path(name):  # and it is not there
            raise LenxError(f"--model {name}: no such directory; give a save_pretrained directory or a hub name")
        else:
            self.source = self.name = name
        self.path = path
        self.offline = None if self.local else offline_reason()
        self.cache_only = self.local or self.offline is not None

    def revision(self) -> str | None:
        """A hub model's commit as the HF cache holds it ("hub:<sha>", from the snapshot its config.json was read
        from), None where the cache cannot say."""
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return None
        found = try_to_load_from_cache(self.source, "config.json")
        if not isinstance(found, str):
            return None
        snapshot = Path(found).parent
        return f"hub:{snapshot.name}" if snapshot.parent.name == "snapshots" else None

    def hub_hint(self) -> str:
        return (f"{unreachable_note(self.offline)}without network, save it once online (`AutoModelForCausalLM.from_pretrained('{self.given}')."
                "save_pretrained(DIR)` and the same for its tokenizer, or `hf download "
                f"{self.given} --local-dir DIR`) and pass --model DIR")

    def load_config(self):
        import json

        import transformers
        from transformers import AutoConfig
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        try:
            return AutoConfig.from_pretrained(self.source, trust_remote_code=False, local_files_only=self.cache_only)
        except Exception as e:
            raw = {}
            if self.local:
                try:
                    raw = json.loads((self.path / "config.json").read_text())
                except (OSError, ValueError):
                    pass
            mt = raw.get("model_type") if isinstance(raw, dict) else None
            if isinstance(mt, str) and mt not in CONFIG_MAPPING_NAMES:
                if raw.get("auto_map"):
                    raise LenxError(
                        f"model {self.given} (model_type '{mt}') needs its own Python code (auto_map in config.json), "
                        "and lenx never runs remote code; use a model type transformers implements"
                    ) from None
                raise LenxError(
                    f"model {self.given} has model_type '{mt}', which transformers {transformers.__version__} does not "
                    "implement; upgrade transformers (pip install -U transformers) or use a supported model"
                ) from None
            hint = "check its config.json" if self.local else self.hub_hint()
            raise LenxError(f"cannot load model '{self.given}' ({first_line(e)}); {hint}") from None


def model_subject(name: str, train_len: int | None = None, dtype: str | None = None) -> HFModel:
    """The subject of `--model NAME`: an `ExportedRun` for a `lenx export` directory (model_type lenx), else an
    `HFModel`. `train_len`: its 1x (default: its config's position count); `dtype`: of its weights."""
    where = Location(name)
    dtype = dtype or "float32"
    if dtype not in DTYPES:
        raise LenxError(f"unknown --dtype '{dtype}'; known: {', '.join(DTYPES)}")
    config = where.load_config()
    return (ExportedRun if config.model_type == "lenx" else HFModel)(where, config, train_len, dtype)


class HFModel(Subject):
    """A transformers causal LM as an evaluation subject: its own tokenizer, its weights in `dtype`, its own
    attention implementation; RoPE extensions through transformers' rope_parameters (the model reloaded)."""

    kind = "hf"
    seed = None
    default_data = "stdlib"
    # a pretrained model is probed as papers probe it (the Landmark / YaRN wording); mqar's token pairs mean
    # something only to a model trained on them
    probes = ("passkey", "repeat")
    passkey_format = "landmark"

    def __init__(self, where: Location, config, train_len: int | None, dtype: str):
        self.where, self.config, self.dtype = where, config, dtype
        self.given, self.name, self.source = where.given, where.name, where.source
        self.local, self.cache_only = where.local, where.cache_only
        self.run_dir = self.tokenizer_name = where.source
        self.config_id = short_hash({"model": self.source, "dtype": dtype})  # one model, one dtype: one experiment
        # a local directory can be saved again in place (its config, its weights): fingerprinted, as a lenx run is;
        # a hub name is the revision the HF cache holds (an updated model is not mixed with an older one's cells)
        self.weights_id = (files_id([where.path / "config.json", *sorted(where.path.glob("*.safetensors"))])
                           if self.local else where.revision())
        self._check_loadable(where.path)
        self.scheme, self.positions = self.describe(config)
        self.pe = f"{config.model_type}/{self.scheme}"
        if train_len is not None and train_len <= 0:
            raise LenxError(f"--train-len must be a positive integer, got {train_len}")
        if train_len is None and self.positions is None:
            raise LenxError(
                f"model {self.given} ({self.pe}) has no max_position_embeddings in its config; give its 1x length "
                "with --train-len N"
            )
        self.train_len = int(train_len or self.positions)
        self.limit = self.table_end()
        self._check_mpt()
        self.model = self.forward = None
        self.loaded_as = None
        self.device = None
        self.longest = None  # the longest length to be evaluated (`plan_lengths`): sizes `TABLES`

    def describe(self, config) -> tuple[str, int | None]:
        """Its positional scheme and its position count (None: it has none)."""
        return scheme_of(config), max_positions(config)

    def table_end(self) -> int | None:
        """Where its learned positions end, checked before a window runs (past it transformers fails with an
        index error); None: no limit."""
        return self.positions if self.scheme == "learned" else None

    # ------------------------------------------------------------------ loading

    def _check_mpt(self) -> None:
        if self.config.model_type == "mpt":
            ac = getattr(self.config, "attn_config", None)
            if not (ac.get("alibi", True) if isinstance(ac, dict) else getattr(ac, "alibi", True)):
                raise LenxError(
                    f"model {self.given} is an MPT with attn_config.alibi false (learned positions), which "
                    "transformers' MPT does not implement (it always applies ALiBi and would drop its position table); "
                    "it cannot be scored"
                )

    def _check_loadable(self, path: Path) -> None:
        """Before any text is read: the config has a causal LM class, and a local directory has safetensors weights
        (pickled ones are refused: unpickling can run code)."""
        from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

        if type(self.config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
            raise LenxError(
                f"model {self.given} ({self.config.model_type}) has no causal LM class in transformers "
                "(AutoModelForCausalLM); lenx scores decoder-only language models"
            )
        if not self.local or any(path.glob("*.safetensors")):
            return
        pickled = sorted(f.name for ext in ("bin", "pt", "pth", "ckpt") for f in path.glob(f"*.{ext}"))
        if pickled:
            raise LenxError(
                f"model {self.given} has only pickled weights ({', '.join(pickled[:3])}), which lenx never reads "
                "(unpickling can run code); convert them once where you trust the files "
                "(AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(DIR) writes model.safetensors)"
            )
        raise LenxError(
            f"model {self.given} has no weights (no *.safetensors beside its config.json); save the model into it "
            "with save_pretrained"
        )

    def open(self, device: str, attn_backend: str | None = None):
        """Load the tokenizer (the model's own, wrapped for lenx: exact byte counts where it is byte-level).
        `attn_backend` is lenx's, for the lenx runs beside it: an HF model keeps its own implementation."""
        from transformers import AutoTokenizer

        self.device = device
        try:
            tok = AutoTokenizer.from_pretrained(self.source, trust_remote_code=False, local_files_only=self.cache_only)
        except Exception as e:
            hint = self.where.hub_hint() if not self.local else (
                f"it is a lenx run: evaluate it as `lenx eval {self.given}`, or `lenx export` it first"
                if (Path(self.source) / "run.json").exists() else "save the model's tokenizer into its directory")
            raise LenxError(f"cannot load the tokenizer of model '{self.given}' ({first_line(e)}); {hint}") from None
        self.tokenizer = HFTokenizer(tok, self.source, eod_id=self._eod(tok))
        return self.tokenizer

    def _eod(self, tok) -> int | None:
        """Documents are separated by a token the model knows: the tokenizer's eos, else the config's."""
        if tok.eos_token_id is not None:
            return None
        for cand in (self.config.eos_token_id, self.config.bos_token_id):
            cand = cand[0] if isinstance(cand, (list, tuple)) and cand else cand
            if isinstance(cand, int):
                return cand
        raise LenxError(
            f"model {self.given}: neither its tokenizer nor its config names an end-of-text token to "
            "separate documents; set eos_token in its tokenizer_config.json"
        )

    def check_tokens(self, stream) -> None:
        """Every token id of the scored text must have a row in the model's embedding."""
        n = self.config.get_text_config(decoder=True).vocab_size
        top = int(stream.max()) if len(stream) else 0
        if top >= n:
            raise LenxError(
                f"model {self.given}: its tokenizer produced token id {top} but the model has {n} embeddings; "
                "the tokenizer does not belong to the model"
            )

    def plan_lengths(self, lengths: list[int]) -> list[int]:
        """Ascending: transformers' dynamic NTK keeps the frequencies of the longest length seen."""
        lengths = sorted(set(lengths))
        self.longest = lengths[-1]
        return lengths

    def scaling_plan(self, scalings: list[str] | None, factors: list[float] | None) -> list[tuple[str, float | None]]:
        """(RoPE extension, factor) cells, as for lenx runs: a model without RoPE takes none (and refuses an
        extension asked for alone); an extension transformers cannot express is refused."""
        from .hf_extend import refusal
        from .positional.rope_scaling import extends_attention, is_attention

        scalings = scalings or ["none"]
        for s in scalings:
            why = refusal(self.config, self.given, s) if extends_attention(s) and self.scheme == "rope" else None
            if why:
                raise LenxError(why)
        asked = [s for s in scalings if s != "none"]
        if asked and self.scheme != "rope":
            if len(scalings) == 1:
                raise LenxError(
                    f"--rope-scaling {asked[0]} applies to RoPE models; {self.given} is {self.pe}, without RoPE"
                )
            return [("none", None)]
        rescaled = [s for s in asked if not is_attention(s)]
        if rescaled:
            self._check_rescalable(rescaled)
        return [(s, f) for s in scalings for f in ([None] if s == "none" else factors or [None])]

    def _check_rescalable(self, asked: list[str]) -> None:
        rp = getattr(self.config, "rope_parameters", None)
        if not isinstance(rp, dict) or "rope_theta" not in rp:
            raise LenxError(
                f"model {self.given} ({self.pe}) has no flat rope_parameters in its config; transformers cannot "
                "rescale its RoPE through it"
            )
        own = rp.get("rope_type", "default")
        if own != "default":
            raise LenxError(
                f"model {self.given} already uses RoPE scaling '{own}'; lenx only applies --rope-scaling to "
                "models with plain RoPE (rope_type default)"
            )
        for s in asked:
            rope_scaled(self.config, s, None, self.train_len, self.given)  # refuses what transformers lacks

    def prepare(self, scaling: str, factor: float | None):
        """The callable to score with, the model (re)loaded for this RoPE extension and factor."""
        from .positional.rope_scaling import extends_attention, is_attention

        key = (scaling, factor)
        attention = is_attention(scaling)
        if key != self.loaded_as:
            config = self.config if scaling == "none" or attention else rope_scaled(
                self.config, scaling, factor, self.train_len, self.given)
            attr = TABLES.get(config.model_type)
            if attr and self.longest and self.longest > getattr(config, attr):
                config = copy.deepcopy(config)
                setattr(config, attr, self.longest)
            self.model = self.forward = None
            if self.device and self.device.startswith("cuda"):
                torch.cuda.empty_cache()
            self._load(config, None if scaling == "none" or attention else config.rope_parameters["rope_type"])
            if extends_attention(scaling):  # through transformers' attention registry (lenx.hf_extend)
                from .positional.extension import Extension
                from .hf_extend import attach

                attach(self.model, Extension(scaling, factor, self.train_len, "rotation"))
            self.loaded_as = key
        return self.forward

    def _load(self, config, rope_type: str | None) -> None:
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(
                self.source, config=config, dtype=DTYPES[self.dtype], use_safetensors=True, trust_remote_code=False,
                local_files_only=self.cache_only,
            )
        except Exception as e:
            hint = "check that its weights belong to its config.json" if self.local else self.where.hub_hint()
            raise LenxError(f"cannot load the weights of model '{self.given}' ({first_line(e)}); {hint}") from None
        if rope_type is not None:
            used = {m.rope_type for m in model.modules() if isinstance(getattr(m, "rope_type", None), str)}
            if used != {rope_type}:
                raise LenxError(
                    f"model {self.given} does not build its RoPE from rope_parameters (found {sorted(used) or 'none'}); "
                    "--rope-scaling cannot be applied to it"
                )
        if getattr(model.config, "use_cache", None):
            model.config.use_cache = False
        try:
            model = model.to(self.device).eval()
        except Exception as e:
            if is_oom(e):
                raise LenxError(f"model {self.given} does not fit on {self.device}; try --dtype bfloat16") from None
            raise
        self.model = model
        self.forward = HFForward(model, self.limit, self.given)

    @property
    def attn_backend(self) -> str | None:
        if self.model is None:
            return None
        cfg = self.model.config
        return getattr(cfg, "attn_backend", None) or getattr(cfg, "_attn_implementation", None)

    def batch_tokens(self, eval_len: int, batch_tokens: int) -> int:
        """Long windows go one at a time (the activations and the logits of one window are already large)."""
        return eval_len if eval_len >= LONG_LEN else batch_tokens


class ExportedRun(HFModel):
    """A `lenx export` directory (model_type lenx): an HF model in how it is loaded and recorded (its files, its
    tokenizer, --dtype, --train-len), a lenx run in its positions: its scheme and training length from its
    config, lenx's own RoPE extensions (ntk included) set on the loaded scheme, and past a learned table the
    scheme's own refusal; probed as a lenx run."""

    probes = ("passkey", "mqar", "repeat")
    passkey_format = "short"

    def describe(self, config) -> tuple[str, int | None]:
        return config.pe, int(config.train_len)

    @property
    def moved_positions(self) -> str | None:
        from .positional import get_scheme

        return get_scheme(self.config.pe).moved_positions

    def table_end(self) -> None:
        return None  # lenx's learned scheme refuses positions past its table itself

    def scaling_plan(self, scalings: list[str] | None, factors: list[float] | None) -> list[tuple[str, float | None]]:
        return scaling_plan(self.config.pe, scalings, factors)

    def prepare(self, scaling: str, factor: float | None):
        if self.model is None:
            self._load(self.config, None)
        self.model.pe.set_eval_scaling(scaling, factor)
        return self.forward
