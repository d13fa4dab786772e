"""lenx: a length-extrapolation benchmark for positional encodings.

`import lenx` makes the `lenx` model type known to transformers' Auto classes (AutoConfig, AutoModelForCausalLM)
without importing transformers itself, which takes seconds: `lenx.model` registers it, and it is imported at once
if transformers already is, else right after transformers' own import. Commands that never load a model
(`lenx --help`, `lenx schemes`, `lenx report`) so start in a fraction of that time.
"""

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"
__all__ = ["LenxConfig", "LenxForCausalLM", "__version__"]


def __getattr__(name: str):
    if name in ("LenxConfig", "LenxForCausalLM"):
        return getattr(importlib.import_module(".model", __name__), name)
    raise AttributeError(f"module 'lenx' has no attribute '{name}'")


class _AfterTransformers(importlib.abc.MetaPathFinder):
    """Finds nothing itself: hands on transformers' own spec, its loader made to import lenx.model (which
    registers the model type) once transformers is loaded. Unless lenx.model is what is importing transformers:
    it registers at its own end. It stays on sys.meta_path until transformers is actually loaded: a mere lookup
    (`importlib.util.find_spec("transformers")`, the usual is-it-installed probe) must not disarm it."""

    _looking = False

    def find_spec(self, name, path=None, target=None):
        if name != "transformers" or self._looking:
            return None
        self._looking = True  # the lookup below passes through sys.meta_path, this finder included
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self._looking = False
        if spec is not None and spec.loader is not None:
            load = spec.loader.exec_module

            def exec_module(module):
                if self in sys.meta_path:
                    sys.meta_path.remove(self)
                load(module)
                if f"{__name__}.model" not in sys.modules:
                    importlib.import_module(".model", __name__)

            spec.loader.exec_module = exec_module
        return spec


if "transformers" in sys.modules:
    importlib.import_module(".model", __name__)
else:
    sys.meta_path.insert(0, _AfterTransformers())
