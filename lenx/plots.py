"""One look for every figure: a colour-blind-safe palette, the same colour and marker for a
scheme everywhere, readable axes, the legend outside the data."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# Paul Tol's 'muted' palette (colour-blind safe), plus his pale grey, in registry order.
_PALETTE = ["#CC6677", "#332288", "#DDCC77", "#117733", "#88CCEE", "#882255", "#44AA99", "#999933", "#AA4499",
            "#6699CC", "#555555", "#DDDDDD"]
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "*", "h", "p"]


def base_scheme(label: str) -> str:
    """The registered scheme of a report label: "alibi+yarn×4 [bpe:4096] on stdlib (L16)" -> alibi."""
    return label.split(" ")[0].split("+")[0]


def style(scheme: str) -> dict:
    """Colour and marker of a scheme: fixed by its place in the registry (others hash to a slot)."""
    from .positional import SCHEMES

    names = list(SCHEMES)
    base = base_scheme(scheme)
    i = names.index(base) if base in names else sum(map(ord, base)) % len(_PALETTE)
    s = {"color": _PALETTE[i % len(_PALETTE)], "marker": _MARKERS[i % len(_MARKERS)]}
    tags = scheme.split(" ", 1)[1] if " " in scheme else ""
    if tags:  # "alibi [bpe:4096] on files (L16)": a tokenizer, evaluation dataset or training variant among several
        k = sum(map(ord, tags))  # (lenx.report.label): its own marker and dashes
        s["marker"] = _marker_apart(i, k)
        s["linestyle"] = _VARIANT_DASHES[k % len(_VARIANT_DASHES)]
    if "+" in scheme:  # a RoPE extension: the scheme's colour; its own dash pattern and hollow marker
        ext, _, factor = scheme.split(" ")[0].split("+", 1)[1].partition("×")
        s["linestyle"] = _EXTENSION_DASHES.get(ext, "--")
        s["markerfacecolor"] = "white"
        if factor:  # a factor given at evaluation ("rope+yarn×4"): a marker of its own per factor
            s["marker"] = _marker_apart(i, sum(map(ord, factor)))
    return s


def styles(labels) -> dict:
    """style() of each label in one figure, in the given order; a label that would look exactly like an earlier
    one (tagged labels hash to their markers and dashes, and two can meet) takes the next marker still free."""
    return apart({lab: style(lab) for lab in labels})


def apart(looks: dict) -> dict:
    """The styles of one figure's lines (key -> style, in drawing order), each that looks exactly like an earlier
    one given the next marker still free: for a figure that changes styles() (e.g. sets each protocol's dashes)."""
    out, taken = {}, set()
    look = lambda s: (s["color"], s["marker"], str(s.get("linestyle", "-")), s.get("markerfacecolor"))  # noqa: E731
    for key, s in looks.items():
        s = dict(s)
        for _ in range(len(_MARKERS)):
            if look(s) not in taken:
                break
            s["marker"] = _MARKERS[(_MARKERS.index(s["marker"]) + 1) % len(_MARKERS)]
        taken.add(look(s))
        out[key] = s
    return out


def _marker_apart(i: int, k: int) -> str:
    """A marker other than scheme slot i's own, picked by k (a hash of the variant's tag)."""
    return _MARKERS[(i + 1 + k % (len(_MARKERS) - 1)) % len(_MARKERS)]


_VARIANT_DASHES = ["-", "--", "-.", ":"]
_EXTENSION_DASHES = {"pi": ":", "ntk": "--", "dynamic-ntk": (0, (6, 2, 1, 2)), "yarn": "-."}


def readable_log_y(ax) -> None:
    """Plain numbers (6, 8, 10, 20) on a log y axis instead of a lone 10^1; fewer of them the more decades it spans
    (call it once the limits are set)."""
    import math

    from matplotlib.ticker import LogLocator

    low, high = ax.get_ylim()
    decades = math.log10(high / low) if low > 0 else math.inf
    subs = ((1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0) if decades <= 0.5  # 65-110: 70, 80, 90, 100
            else (1.0, 1.5, 2.0, 3.0, 5.0, 7.0) if decades <= 2 else (1.0, 2.0, 5.0) if decades <= 4 else (1.0,))
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=subs))
    ax.yaxis.set_major_formatter(lambda x, _: f"{x:,.10g}")  # 7, 1.5, 150, 2,000: no trailing ".0"
    ax.yaxis.set_minor_formatter(lambda *_: "")


def new_figure(width: float = 8.0, height: float = 4.8, ncols: int = 1, sharey: bool = False):
    """(fig, ax), or (fig, [ax, ...]) for ncols > 1."""
    plt.rcParams.update({"font.size": 11, "axes.grid": True, "grid.alpha": 0.3})
    fig, ax = plt.subplots(1, ncols, figsize=(width, height), dpi=120, sharey=sharey, squeeze=False)
    return fig, (ax[0, 0] if ncols == 1 else list(ax[0]))


def finish(fig, ax, path, legend_title: str | None = None) -> None:
    if ax.get_legend_handles_labels()[0]:  # nothing drawn (every cell empty): no legend, and no matplotlib warning
        ax.legend(title=legend_title, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
