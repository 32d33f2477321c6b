"""Single-point energies and gradients with PySCF (HF, Kohn-Sham DFT, MP2, CCSD, CCSD(T)).

Works in PySCF's own units: energies in Hartree, gradients in Hartree/bohr.
Geometries are handed over in Angstrom (``unit='Angstrom'``). Closed shells run
restricted (RHF/RKS), open shells unrestricted (UHF/UKS), as PySCF's
``scf.HF`` / ``dft.KS`` choose from the spin. ``df-`` levels density-fit the
SCF integrals with PySCF's default auxiliary basis (``pyscf.df.make_auxbasis``).
"""

from __future__ import annotations

import numpy as np

from metamlip.labelling.calculation import CalculationFailed
from metamlip.labelling.methods import LevelSpec


def build_molecule(
    spec: LevelSpec, numbers: np.ndarray, positions_angstrom: np.ndarray, charge: int, multiplicity: int
):
    """A built `pyscf.gto.Mole` for one structure (spin = multiplicity - 1 unpaired electrons)."""
    from pyscf import gto

    atoms = [(int(z), tuple(float(x) for x in r)) for z, r in zip(numbers, positions_angstrom)]
    return gto.M(
        atom=atoms, basis=spec.basis, unit="Angstrom", charge=int(charge), spin=int(multiplicity) - 1, verbose=0
    )


def _mean_field(spec: LevelSpec, molecule):
    """Converged HF or Kohn-Sham object: DIIS, then PySCF's second-order (Newton) solver if DIIS did
    not converge; raises `CalculationFailed` if neither converged."""
    from pyscf import dft, scf

    if spec.is_dft:
        mean_field = dft.KS(molecule)
        mean_field.xc = spec.method
    else:
        mean_field = scf.HF(molecule)
    if spec.density_fitting:
        mean_field = mean_field.density_fit()
    mean_field.kernel()
    if not mean_field.converged:  # DIIS failed: second-order SCF from where it stopped
        first_cycles = mean_field.max_cycle
        mean_field = mean_field.newton()
        mean_field.kernel(dm0=mean_field.make_rdm1())
        if not mean_field.converged:
            raise CalculationFailed(
                f"SCF did not converge in {first_cycles} DIIS cycles nor {mean_field.max_cycle} second-order (Newton) cycles"
            )
    return mean_field


def _coupled_cluster_energy_hartree(spec: LevelSpec, mean_field) -> float:
    from pyscf import cc

    coupled_cluster = cc.CCSD(mean_field)
    coupled_cluster.kernel()
    if not coupled_cluster.converged:
        raise CalculationFailed("CCSD amplitudes did not converge")
    energy = float(coupled_cluster.e_tot)
    if spec.method == "ccsd(t)":
        energy += float(coupled_cluster.ccsd_t())
    return energy


def energy_and_gradient(
    spec: LevelSpec, numbers: np.ndarray, positions_angstrom: np.ndarray, charge: int, multiplicity: int
) -> tuple[float, np.ndarray | None]:
    """Total energy (Hartree) and its gradient (n_atoms, 3) in Hartree/bohr, or None without analytic forces."""
    molecule = build_molecule(spec, numbers, positions_angstrom, charge, multiplicity)
    mean_field = _mean_field(spec, molecule)
    if spec.method in ("ccsd", "ccsd(t)"):
        return _coupled_cluster_energy_hartree(spec, mean_field), None
    if spec.method == "mp2":
        from pyscf import mp

        perturbation = mp.MP2(mean_field)
        perturbation.kernel()
        gradient = perturbation.nuc_grad_method().kernel()
        return float(perturbation.e_tot), np.asarray(gradient, dtype=np.float64)
    gradient = mean_field.nuc_grad_method().kernel()
    return float(mean_field.e_tot), np.asarray(gradient, dtype=np.float64)
