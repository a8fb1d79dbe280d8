"""matplotlib for the library's PNG plots, without touching the process's matplotlib setup.

matplotlib is optional (``pip install 'opentrans-hf[plot]'``) and imported only when a plot is drawn, never
by ``import opentrans_hf``. The plots are drawn on a ``matplotlib.figure.Figure`` with the Agg canvas,
outside pyplot: the process's backend (an interactive one in a notebook, say) is neither chosen nor
switched, and no figure stays open in pyplot's list of figures. Every plot of the library (spectral
reports, masks, training curves, the reproduce figure) gets its figure here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.colors import Colormap
    from matplotlib.figure import Figure

INSTALL_HINT = "plotting needs matplotlib: pip install 'opentrans-hf[plot]'"


def require_matplotlib():
    """The ``matplotlib`` module; an ImportError saying how to install it when it is missing."""
    try:
        import matplotlib
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError(INSTALL_HINT) from None
    return matplotlib


def figure(**kwargs) -> Figure:
    """A new ``matplotlib.figure.Figure(**kwargs)`` (``figsize=...``) on an Agg canvas, not registered with
    pyplot: save it with ``fig.savefig``; it needs no ``plt.close``."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def colormap(name: str, lut: int | None = None) -> Colormap:
    """The registered colormap ``name``, resampled to ``lut`` colours when given (``pyplot.get_cmap(name, lut)``)."""
    cmap = require_matplotlib().colormaps[name]
    return cmap if lut is None else cmap.resampled(lut)
