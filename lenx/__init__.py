"""lenx: a length-extrapolation benchmark for positional encodings."""

__version__ = "0.1.0"

from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from .model import LenxConfig, LenxForCausalLM  # noqa: E402

AutoConfig.register("lenx", LenxConfig, exist_ok=True)
AutoModelForCausalLM.register(LenxConfig, LenxForCausalLM, exist_ok=True)

__all__ = ["LenxConfig", "LenxForCausalLM", "__version__"]
