from . import register
from .base import PositionalScheme


@register
class NoPE(PositionalScheme):
    name = "nope"
    acts = ()
    formula = "nothing: the causal mask alone lets the decoder infer position"
    paper = "Haviv et al. 2022, 'Transformer LMs without positional encodings still learn positional information'; Kazemnejad et al. 2023"
    used_by = "none of the large LLMs as their only scheme (SmolLM3 and Llama 4 interleave NoPE layers)"
    details = (
        "No position information is added anywhere. A causal decoder can still tell positions apart:\n"
        "the number of keys a query attends to grows with its position, so attention averages carry\n"
        "a signal of absolute position (Haviv et al. 2022). Kazemnejad et al. (2023) found NoPE\n"
        "extrapolating further than absolute and rotary schemes at small scale."
    )
