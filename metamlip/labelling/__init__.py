"""Label structures with energies and forces at a level of theory (PySCF, tblite).

    from metamlip.labelling import label_structures
    report = label_structures(frames, "hf/sto-3g", "out.xyz", workers=2)

PySCF and tblite are the optional extra ``pip install 'metamlip[qm]'``.
"""

from metamlip.labelling.calculation import CalculationFailed, Label, calculate
from metamlip.labelling.methods import LevelSpec, known_methods, resolve_level
from metamlip.labelling.runner import LabelReport, label_structures

__all__ = [
    "CalculationFailed",
    "Label",
    "LabelReport",
    "LevelSpec",
    "calculate",
    "known_methods",
    "label_structures",
    "resolve_level",
]
