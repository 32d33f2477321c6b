"""Checks shipped with the package so that any potential (a new backbone, a new head) can be
tested against the contracts every interatomic potential must meet.

    from metamlip.testing import check_all_contracts
    check_all_contracts(model, molecules=[ethanol, water], periodic=box, level="pbe+vdw-ts")
"""

from metamlip.testing.model_contract import (
    Tolerance,
    check_all_contracts,
    check_batch_independence,
    check_forces_finite_difference,
    check_periodic_images,
    check_permutation,
    check_rotation_translation,
    default_tolerance,
    predict_structures,
)

__all__ = [
    "Tolerance",
    "check_all_contracts",
    "check_batch_independence",
    "check_forces_finite_difference",
    "check_periodic_images",
    "check_permutation",
    "check_rotation_translation",
    "default_tolerance",
    "predict_structures",
]
