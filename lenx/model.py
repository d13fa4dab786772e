"""A pre-LN decoder-only transformer, identical for every scheme except its positional part.

The positional scheme (``self.pe``) is consulted in three places: the embedding, the queries and
keys of every layer, and the attention scores of every layer (given the layer's normed input, queries and keys).
Nothing here knows which scheme it is.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutput

from .attention import causal_attention
from .extend import attend
from .positional import PositionalScheme, build_scheme
from .positional.base import Positions


class LenxConfig(PretrainedConfig):
    model_type = "lenx"

    def __init__(
        self,
        vocab_size: int = 257,
        n_layer: int = 4,
        d_model: int = 128,
        n_head: int = 4,
        d_ff: int = 512,
        train_len: int = 128,
        train_positions: int | None = None,
        pe: str = "rope",
        pe_options: dict | None = None,
        attn_backend: str = "sdpa",
        attn_block_size: int = 512,
        initializer_range: float = 0.02,
        eod_token_id: int = 256,
        tie_word_embeddings: bool = True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.n_layer = n_layer
        self.d_model = d_model
        self.n_head = n_head
        self.d_ff = d_ff
        self.train_len = train_len
        # positions training drew from: [0, train_positions) under random positions (`lenx train
        # --random-positions`), where a learned table has that many rows; None: 0..train_len-1 (older runs too)
        self.train_positions = train_positions
        self.pe = pe
        self.pe_options = dict(pe_options or {})
        self.attn_backend = attn_backend
        self.attn_block_size = attn_block_size
        self.initializer_range = initializer_range
        self.eod_token_id = eod_token_id
        kwargs.setdefault("eos_token_id", eod_token_id)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


class Attention(nn.Module):
    def __init__(self, config: LenxConfig):
        super().__init__()
        self.n_head = config.n_head
        self.backend = config.attn_backend
        self.block_size = config.attn_block_size
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=False)
        self.proj._residual_proj = True

    def forward(self, x: Tensor, layer: int, p: Positions, pe: PositionalScheme) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        ext = pe.extension  # an evaluation-time attention extension (lenx.extend), if one is set and acts here
        if ext is not None and ext.active(T) and not ext.only_scales:
            y = attend(ext, q, k, v, x, layer, p, pe, self.block_size)
        else:
            q = q if ext is None else ext.scaled(q)  # a frequency method's log-length query scale, if on
            q, k = pe.rotate(q, k, p, layer)
            bias = pe.bias(layer, p, x=x, q=q, k=k)
            y = causal_attention(q, k, v, bias, self.backend, self.block_size)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: LenxConfig):
        super().__init__()
        self.fc = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.proj = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.proj._residual_proj = True

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, config: LenxConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model)
        self.attn = Attention(config)
        self.ln_2 = nn.LayerNorm(config.d_model)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, layer: int, p: Positions, pe: PositionalScheme) -> Tensor:
        x = x + self.attn(self.ln_1(x), layer, p, pe)
        return x + self.mlp(self.ln_2(x))


def _rng_devices() -> list[int]:
    return [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []


def _peek_seed() -> int:
    """A seed drawn from the global RNG without advancing it."""
    with torch.random.fork_rng(devices=[]):
        return int(torch.randint(0, 2**62, (), device="cpu").item())


@contextmanager
def _own_rng(seed: int):
    """Run with the CPU (and current CUDA device's) RNG seeded with `seed`, restoring their states afterwards."""
    devices = _rng_devices()
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        for d in devices:
            torch.cuda.default_generators[d].manual_seed(seed)
        yield


class LenxForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = LenxConfig
    config: LenxConfig
    base_model_prefix = "lenx"
    main_input_name = "input_ids"
    _tied_weights_keys = {"lm_head.weight": "wte.weight"}
    _no_split_modules = ["Block"]

    def __init__(self, config: LenxConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        # The scheme's own parameters draw from a stream of their own (seeded from the global one, which they leave
        # untouched): every scheme, with or without parameters, starts from the same shared weights for one seed.
        self._pe_seed = _peek_seed()
        with _own_rng(self._pe_seed):
            self.pe = build_scheme(config)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        for m in self.pe.modules():
            m._lenx_pe_owned = True
        self.post_init()
        if getattr(self, "generation_config", None) is not None:
            self.generation_config.use_cache = False  # no KV cache: generate() re-reads the whole prefix

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, PositionalScheme):
            if not all(getattr(p, "_is_hf_initialized", False) for p in module.parameters()):
                with _own_rng(self._pe_seed):
                    module.reset_parameters()
        elif getattr(module, "_lenx_pe_owned", False):
            return  # the scheme initialises its own parts, as its paper does
        elif isinstance(module, nn.Linear):
            # GPT-2: projections back into the residual stream are scaled by 1/sqrt(2 * n_layer)
            residual = getattr(module, "_residual_proj", False)
            init.normal_(module.weight, std=std / (2 * self.config.n_layer) ** 0.5 if residual else std)
        elif isinstance(module, nn.Embedding):  # the token embeddings (tied to the output layer)
            init.normal_(module.weight, std=self.pe.token_embedding_std(std))
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)

    def set_attention(self, backend: str | None = None, block_size: int | None = None) -> None:
        """Switch every layer's attention backend and/or query block size (an evaluation-time choice;
        every backend gives the same numbers as the materialised reference)."""
        from .attention import BACKENDS

        if backend is not None:
            if backend not in BACKENDS:
                from .errors import LenxError, did_you_mean

                raise LenxError(f"unknown attention backend '{backend}'{did_you_mean(backend, BACKENDS)}; known: "
                                f"{', '.join(BACKENDS)}")
            self.config.attn_backend = backend
        if block_size is not None:
            self.config.attn_block_size = block_size
        for block in self.blocks:
            block.attn.backend = self.config.attn_backend
            block.attn.block_size = self.config.attn_block_size

    def get_input_embeddings(self) -> nn.Module:
        return self.wte

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.wte = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def hidden(self, input_ids: Tensor, position_ids: Tensor | None = None) -> Tensor:
        T = input_ids.shape[1]
        if position_ids is None:
            pos = torch.arange(T, device=input_ids.device)
        else:  # one set of positions serves the whole batch (every hook takes pos of shape (T,))
            rows = position_ids.reshape(-1, T)
            pos = rows[0]
            if rows.shape[0] > 1 and not bool((rows == pos).all()):
                raise ValueError("lenx models take one set of positions per batch: the rows of position_ids differ; "
                                 "run sequences with different positions one at a time")
        p = self.pe.positions(pos)  # the scheme's per-forward state (rotation tables), made once for every layer
        x = self.pe.embed(self.wte(input_ids), p)
        for layer, block in enumerate(self.blocks):
            x = block(x, layer, p, self.pe)
        return self.ln_f(x)

    def forward(
        self,
        input_ids: Tensor,
        labels: Tensor | None = None,
        position_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutput:
        """``attention_mask`` is accepted when it masks nothing (as generate() passes for unpadded prompts);
        lenx attention has no padding mask, so a batch with padding is refused rather than scored wrongly."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError(
                "lenx models take no padding: attention_mask has zeros; run padded sequences one at a time "
                "(or batch sequences of equal length)"
            )
        logits = self.lm_head(self.hidden(input_ids, position_ids))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        return CausalLMOutput(loss=loss, logits=logits)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate() must not build a DynamicCache for this model (it has no KV cache and no
        # num_hidden_layers for the cache to size itself by), even when a caller asks for use_cache=True
        return False

    def prepare_inputs_for_generation(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs) -> dict:
        # No KV cache: every step re-reads the whole prefix (positions restart at 0 each step).
        # The mask goes on to forward, which refuses a padded batch (generate extends the mask by ones per new token).
        return {"input_ids": input_ids, "attention_mask": attention_mask}


# `import lenx` (see lenx/__init__.py) or any import of this module: AutoConfig / AutoModelForCausalLM know "lenx"
AutoConfig.register("lenx", LenxConfig, exist_ok=True)
AutoModelForCausalLM.register(LenxConfig, LenxForCausalLM, exist_ok=True)
