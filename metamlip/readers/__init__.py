"""Dataset readers: files of the public QM datasets in, `LevelDataset`s (eV, Angstrom) out.

    from metamlip.readers import read_dataset, read_level
    datasets = read_dataset("ani1x.h5", levels=["ccsd(t)/cbs"])
    md17 = read_level("ethanol.npz", level="pbe+vdw-ts", energy_unit="kcal/mol")

Layouts: MD17/sGDML and QM7-X npz (`npz`), ANI-1x/ANI-1ccx release and ANI/COMP6 HDF5
(`ani_hdf5`, `ani1x_release`), SPICE HDF5 (`spice_hdf5`), anything ASE reads (`ase_files`).
"""

from metamlip.readers.dispatch import READERS, read_dataset, read_level

__all__ = ["READERS", "read_dataset", "read_level"]
