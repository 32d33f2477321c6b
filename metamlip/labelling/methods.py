"""Which levels of theory `metamlip label` can compute, and with which program.

A level ``method/basis`` is resolved into a `LevelSpec`: the backend (PySCF for
HF, DFT, MP2 and coupled cluster; tblite for GFN1/GFN2-xTB), the method, the
basis and whether analytic forces exist. The prefix ``df-`` (``df-hf/6-31g(d)``,
``df-b3lyp/def2-svp``) runs HF or DFT with density fitting of the Coulomb and
exchange integrals (PySCF's default auxiliary basis for the orbital basis): a
different level from the exact one, 5x cheaper for HF gradients here. A DFT
method may carry a dispersion correction (``b3lyp-d3bj/def2-svp``: D3(BJ), D3
zero damping ``-d3zero``, D4 ``-d4``), computed by the ``pyscf-dispersion`` package. Unknown methods and missing optional
packages are reported as `InputError` before any calculation starts.
"""

from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass

from metamlip.errors import InputError
from metamlip.levels import normalise_level

QM_EXTRA_HINT: str = "pip install 'metamlip[qm]'"

# Wave-function methods run through PySCF: method -> has analytic forces.
WAVEFUNCTION_METHODS: dict[str, bool] = {"hf": True, "mp2": True, "ccsd": False, "ccsd(t)": False}

# Tight-binding methods run through tblite: metamlip name -> tblite name.
TBLITE_METHODS: dict[str, str] = {"gfn1-xtb": "GFN1-xTB", "gfn2-xtb": "GFN2-xTB"}

# DFT functionals known by name; any other exchange-correlation functional that
# PySCF's libxc interface accepts works too.
DFT_FUNCTIONALS: tuple[str, ...] = (
    "lda", "pbe", "blyp", "bp86", "tpss", "scan", "r2scan", "pbe0", "b3lyp", "b3p86", "b97",
    "camb3lyp", "wb97", "wb97x", "m06", "m06-2x", "tpssh",
)

# Dispersion corrections a DFT method may end with, as PySCF spells them.
DISPERSION_SUFFIXES: tuple[str, ...] = ("-d3bj", "-d3zero", "-d3bjm", "-d3zerom", "-d3op", "-d4")

# Method prefix asking for density-fitted (RI-JK) HF or DFT.
DENSITY_FITTING_PREFIX: str = "df-"

BACKEND_PACKAGES: dict[str, str] = {"pyscf": "PySCF", "tblite": "tblite", "pyscf.dispersion": "pyscf-dispersion"}


@dataclass(frozen=True)
class LevelSpec:
    """A level of theory resolved to a program and method.

    Attributes:
        name: normalised level name, e.g. ``'hf/sto-3g'`` or ``'gfn2-xtb'``.
        backend: ``'pyscf'`` or ``'tblite'``.
        method: method as the backend spells it (``'hf'``, ``'mp2'``, a functional, ``'GFN2-xTB'``).
        basis: basis-set name for PySCF, None for tight binding.
        is_dft: whether `method` is an exchange-correlation functional run by Kohn-Sham DFT.
        has_forces: whether the backend gives analytic forces for this method.
        density_fitting: whether the SCF runs with density-fitted integrals (``df-`` levels).
    """

    name: str
    backend: str
    method: str
    basis: str | None
    is_dft: bool
    has_forces: bool
    density_fitting: bool = False


def known_methods() -> list[str]:
    """Method names accepted by name (besides any libxc functional when PySCF is installed)."""
    return sorted(WAVEFUNCTION_METHODS) + sorted(TBLITE_METHODS) + sorted(DFT_FUNCTIONALS)


def require_backend(backend: str, level: str) -> None:
    """Raise `InputError` with the install hint if the package behind `backend` cannot be imported."""
    try:
        importlib.import_module(backend)
    except ImportError as error:
        package = BACKEND_PACKAGES[backend]
        raise InputError(f"level {level} needs {package}: {QM_EXTRA_HINT}") from error


def _unknown_method(method: str, level: str) -> InputError:
    return InputError(
        f"unknown method {method!r} in level {level!r}; known: {', '.join(known_methods())} "
        "(and other exchange-correlation functionals known to PySCF's libxc)"
    )


def _is_libxc_functional(method: str) -> bool:
    """Whether PySCF's libxc interface parses `method` as a functional (PySCF must be importable)."""
    from pyscf.dft import libxc

    try:
        libxc.parse_xc(method)
    except (KeyError, ValueError):
        return False
    return True


def _check_basis(basis: str, level: str) -> None:
    """Raise `InputError` if PySCF does not know the basis set `basis` (checked on hydrogen)."""
    from pyscf import gto

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PySCF suggests basis-set-exchange for unknown names
            gto.basis.load(basis, "H")
    except (KeyError, RuntimeError, ValueError, OSError) as error:  # BasisNotFoundError is a RuntimeError
        raise InputError(f"unknown basis set {basis!r} in level {level!r}") from error


def resolve_level(level: str) -> LevelSpec:
    """Resolve a level name (``'HF/STO-3G'``, ``'gfn2-xtb'``) into a `LevelSpec`.

    Raises `InputError` for an unknown method or basis, a missing or superfluous basis,
    or a missing optional package (PySCF, tblite).
    """
    try:
        name = normalise_level(level)
    except ValueError as error:
        raise InputError(f"level of theory: {error}") from None
    method, _, basis = name.partition("/")
    density_fitting = method.startswith(DENSITY_FITTING_PREFIX)
    if density_fitting:
        method = method.removeprefix(DENSITY_FITTING_PREFIX)
        if method in TBLITE_METHODS or method in ("mp2", "ccsd", "ccsd(t)"):
            raise InputError(f"level {name!r}: density fitting ('df-') is available for HF and DFT only")
    if method in TBLITE_METHODS:
        if basis:
            raise InputError(f"level {name!r}: {method} takes no basis set; write just {method!r}")
        require_backend("tblite", name)
        return LevelSpec(name, "tblite", TBLITE_METHODS[method], None, is_dft=False, has_forces=True)
    functional = method
    for suffix in DISPERSION_SUFFIXES:
        if method.endswith(suffix):
            functional = method.removesuffix(suffix)
            if functional in WAVEFUNCTION_METHODS or functional in TBLITE_METHODS:
                raise InputError(f"level {name!r}: a dispersion correction ({suffix[1:]}) goes with a DFT functional")
            require_backend("pyscf.dispersion", name)
    is_dft = functional in DFT_FUNCTIONALS
    if method not in WAVEFUNCTION_METHODS and not is_dft:
        try:
            importlib.import_module("pyscf")
        except ImportError:
            raise _unknown_method(method, name) from None
        if not _is_libxc_functional(functional):
            raise _unknown_method(method, name)
        is_dft = True
    if not basis:
        raise InputError(f"level {name!r} needs a basis set, e.g. '{method}/6-31g(d)'")
    require_backend("pyscf", name)
    _check_basis(basis, name)
    has_forces = True if is_dft else WAVEFUNCTION_METHODS[method]
    return LevelSpec(name, "pyscf", method, basis, is_dft=is_dft, has_forces=has_forces, density_fitting=density_fitting)
