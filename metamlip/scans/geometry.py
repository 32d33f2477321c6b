"""Scan geometries: rigid torsion rotations and bond stretches of one molecule.

The moving part of the molecule is found in the covalent bond graph (ASE's
``natural_cutoffs``, scaled by BOND_CUTOFF_MULTIPLIER): cut the scanned bond and take the fragment on the far side.
A bond inside a ring does not split the graph and is refused. Positions are in
Angstrom, angles in degrees, atom indices 0-based as in the structure file.
"""

from __future__ import annotations

from collections import deque
from typing import Literal, Sequence

import numpy as np
from ase import Atoms
from ase.neighborlist import natural_cutoffs, neighbor_list

from metamlip.errors import InputError

ScanKind = Literal["torsion", "bond"]
SCAN_KINDS: tuple[str, ...] = ("torsion", "bond")
INDEX_COUNT: dict[str, int] = {"torsion": 4, "bond": 2}

# Keys written into ``atoms.info`` of every scan geometry, read back by ``read_scan``.
INFO_COORDINATE = "scan_coordinate"  # float: degrees (torsion) or Angstrom (bond)
INFO_KIND = "scan_kind"  # "torsion" | "bond"
INFO_INDICES = "scan_indices"  # 0-based atom indices of the scanned coordinate

# Two atoms are bonded when closer than 1.2 x the sum of their covalent radii. Exactly 1.0 misses
# ordinary bonds (ethanol's C-O is 1.43 Angstrom against 0.76 + 0.66 = 1.42); 1.2 still keeps
# geminal atoms (H-C-H at ~1.8 Angstrom against 0.74) apart.
BOND_CUTOFF_MULTIPLIER: float = 1.2


def bond_graph(atoms: Atoms) -> list[set[int]]:
    """Covalent neighbours of each atom: pairs closer than BOND_CUTOFF_MULTIPLIER x (r_i + r_j)."""
    first, second = neighbor_list("ij", atoms, natural_cutoffs(atoms, mult=BOND_CUTOFF_MULTIPLIER))
    neighbours: list[set[int]] = [set() for _ in range(len(atoms))]
    for a, b in zip(first.tolist(), second.tolist()):
        neighbours[a].add(b)
    return neighbours


def moving_fragment(atoms: Atoms, fixed: int, moving: int) -> np.ndarray:
    """Indices (sorted) of the fragment holding `moving` once the `fixed`-`moving` bond is cut.

    Raises InputError when the two atoms are not bonded or the bond is in a ring.
    """
    neighbours = bond_graph(atoms)
    if moving not in neighbours[fixed]:
        raise InputError(f"atoms {fixed} and {moving} are not bonded (covalent radii), cannot scan that bond")
    seen = {moving}
    queue = deque([moving])
    while queue:
        atom = queue.popleft()
        for other in neighbours[atom]:
            if atom == moving and other == fixed:
                continue  # the cut bond
            if other not in seen:
                seen.add(other)
                queue.append(other)
    if fixed in seen:
        raise InputError(
            f"the bond between atoms {fixed} and {moving} is in a ring: cutting it does not split the "
            "molecule, so it cannot be scanned rigidly"
        )
    return np.array(sorted(seen), dtype=int)


def _check_indices(atoms: Atoms, kind: str, indices: Sequence[int]) -> tuple[int, ...]:
    if kind not in SCAN_KINDS:
        raise InputError(f"scan kind must be one of {SCAN_KINDS}, got {kind!r}")
    checked = tuple(int(index) for index in indices)
    if len(checked) != INDEX_COUNT[kind]:
        raise InputError(f"a {kind} scan needs {INDEX_COUNT[kind]} atom indices, got {list(checked)}")
    if len(set(checked)) != len(checked):
        raise InputError(f"{kind} scan atom indices must be distinct, got {list(checked)}")
    for index in checked:
        if not 0 <= index < len(atoms):
            raise InputError(f"atom index {index} out of range: the structure has {len(atoms)} atoms (0-based)")
    return checked


def _torsion_geometries(atoms: Atoms, indices: tuple[int, ...], angles_degree: np.ndarray) -> list[Atoms]:
    i, j, k, l = indices
    fragment = moving_fragment(atoms, j, k)
    if l not in fragment or i in fragment:
        raise InputError(
            f"torsion {list(indices)}: atom {i} must be on the side of atom {j} and atom {l} on the side "
            f"of atom {k} of the {j}-{k} bond"
        )
    geometries = []
    for angle in angles_degree:
        geometry = atoms.copy()
        geometry.set_dihedral(i, j, k, l, float(angle), indices=fragment.tolist())
        geometries.append(geometry)
    return geometries


def _bond_geometries(atoms: Atoms, indices: tuple[int, ...], distances_angstrom: np.ndarray) -> list[Atoms]:
    i, j = indices
    if np.any(distances_angstrom <= 0.0):
        raise InputError(f"bond scan {i}-{j}: distances must be positive, got {distances_angstrom.min():g} Angstrom")
    fragment = moving_fragment(atoms, i, j)
    bond_vector = atoms.positions[j] - atoms.positions[i]
    current_angstrom = float(np.linalg.norm(bond_vector))
    direction = bond_vector / current_angstrom
    geometries = []
    for distance in distances_angstrom:
        geometry = atoms.copy()
        geometry.positions[fragment] += (float(distance) - current_angstrom) * direction
        geometries.append(geometry)
    return geometries


def scan_geometries(atoms: Atoms, kind: ScanKind, indices: Sequence[int], coordinates: np.ndarray) -> list[Atoms]:
    """Geometries of a 1-D scan, one copy of `atoms` per coordinate, without energies.

    kind "torsion": indices (I, J, K, L), coordinates (n,) dihedral angles I-J-K-L in degrees; the
    fragment on the side of L rotates rigidly about the J-K axis. kind "bond": indices (I, J),
    coordinates (n,) distances in Angstrom; the fragment on the side of J moves along I->J.
    Each copy carries ``info['scan_coordinate']``, ``info['scan_kind']`` and ``info['scan_indices']``.
    """
    checked = _check_indices(atoms, kind, indices)
    values = np.asarray(coordinates, dtype=float).reshape(-1)
    if kind == "torsion":
        geometries = _torsion_geometries(atoms, checked, values)
    else:
        geometries = _bond_geometries(atoms, checked, values)
    for geometry, value in zip(geometries, values):
        geometry.calc = None
        geometry.info[INFO_COORDINATE] = float(value)
        geometry.info[INFO_KIND] = kind
        geometry.info[INFO_INDICES] = list(checked)
    return geometries


def current_coordinate(atoms: Atoms, kind: ScanKind, indices: Sequence[int]) -> float:
    """Present value of the scanned coordinate: dihedral in degrees (-180, 180] or distance in Angstrom."""
    checked = _check_indices(atoms, kind, indices)
    if kind == "torsion":
        angle = float(atoms.get_dihedral(*checked))
        return angle - 360.0 if angle > 180.0 else angle
    return float(atoms.get_distance(*checked))
