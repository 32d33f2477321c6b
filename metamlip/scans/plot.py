"""PNG overlay of several model scans and a reference, energies relative to each curve's minimum."""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from metamlip.errors import InputError
from metamlip.scans.scan import Scan


def plot_scans(path_png: str | Path, scans: dict[str, Scan], reference: Scan | None = None, title: str = "") -> Path:
    """Draw each scan (label -> Scan) and the reference (black dashed) into a PNG; return its path.

    Energies are in eV relative to each curve's own minimum; the x axis is the scan coordinate in
    degrees (torsion) or Angstrom (bond). Uses the Agg canvas directly, no pyplot state.
    """
    curves = list(scans.items())
    if not curves and reference is None:
        raise InputError(f"{path_png}: nothing to plot, no scans given")
    kinds = {scan.kind for _, scan in curves} | ({reference.kind} if reference is not None else set())
    if len(kinds) > 1:
        raise InputError(f"{path_png}: cannot overlay scans of different kinds {sorted(kinds)}")
    figure = Figure(figsize=(6.4, 4.4), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for label, scan in curves:
        axes.plot(scan.coordinate, scan.relative_energies_ev, marker="o", markersize=3, linewidth=1.4, label=label)
    if reference is not None:
        axes.plot(reference.coordinate, reference.relative_energies_ev, color="black", linestyle="--",
                  marker="x", markersize=4, linewidth=1.4, zorder=3, label=f"reference: {reference.name}")
    first = curves[0][1] if curves else reference
    axes.set_xlabel(first.coordinate_label)
    axes.set_ylabel("energy relative to minimum (eV)")
    if title:
        axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    path = Path(path_png)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path
