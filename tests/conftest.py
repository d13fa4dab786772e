import atexit
import os
import random
import shutil
import tempfile
from pathlib import Path

# Before anything imports datasets / huggingface_hub (they read these once): no test touches the network,
# and the token, tokenizer and datasets caches live in a scratch directory, not the user's.
_SCRATCH = tempfile.mkdtemp(prefix="lenx-tests-")
atexit.register(shutil.rmtree, _SCRATCH, ignore_errors=True)
os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", LENX_CACHE=os.path.join(_SCRATCH, "lenx"),
                  HF_DATASETS_CACHE=os.path.join(_SCRATCH, "datasets"))

import pytest
import torch

from lenx.model import LenxConfig, LenxForCausalLM
from lenx.positional import REGISTRY

torch.set_num_threads(2)
ALL_SCHEMES = list(REGISTRY)


def tiny_config(pe: str, **kw) -> LenxConfig:
    base = dict(vocab_size=64, n_layer=2, d_model=32, n_head=4, d_ff=64, train_len=16, pe=pe, eod_token_id=63)
    base.update(kw)
    return LenxConfig(**base)


def tiny_model(pe: str, seed: int = 0, **kw) -> LenxForCausalLM:
    torch.manual_seed(seed)
    model = LenxForCausalLM(tiny_config(pe, **kw)).eval()
    # Random (non-initial) values for every scheme parameter, so tests see them act.
    with torch.no_grad():
        for p in model.pe.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture
def text_dataset(tmp_path: Path) -> Path:
    """A directory of 30 small .txt documents that the test writes itself."""
    rng = random.Random(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(30):
        text = "\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(40))
        (root / f"doc{i:02d}.txt").write_text(text)
    return root
