"""Level-of-theory names: one level is one string.

A level is written ``method/basis`` in lower case (``wb97x/6-31g(d)``), or just
``method`` where no basis applies (``gfn2-xtb``, ``pbe+vdw-ts``). Common aliases of
the same basis set or method are folded together, so ``wB97X/6-31G*`` and
``wb97x/6-31g(d)`` name the same level.
"""

import re

_METHOD_ALIASES: dict[str, str] = {
    "\u03c9b97x": "wb97x",
    "wb97x-d": "wb97x-d",
    "\u03c9b97m-d3bj": "wb97m-d3bj",
    "gfn2": "gfn2-xtb",
    "gfn2xtb": "gfn2-xtb",
    "gfn2_xtb": "gfn2-xtb",
    "gfn1": "gfn1-xtb",
    "gfn1xtb": "gfn1-xtb",
    "gfn1_xtb": "gfn1-xtb",
    "rhf": "hf",
    "scf": "hf",
    "ccsd(t)*": "ccsd(t)",
}

_BASIS_ALIASES: dict[str, str] = {
    "6-31g*": "6-31g(d)",
    "6-31g**": "6-31g(d,p)",
    "6-31+g*": "6-31+g(d)",
    "6-31+g**": "6-31+g(d,p)",
    "6-311g*": "6-311g(d)",
    "6-311g**": "6-311g(d,p)",
    "631gd": "6-31g(d)",
    "6-31gd": "6-31g(d)",
    "sto3g": "sto-3g",
    "ccpvdz": "cc-pvdz",
    "ccpvtz": "cc-pvtz",
    "ccpvqz": "cc-pvqz",
    "vdz": "cc-pvdz",
    "vtz": "cc-pvtz",
    "augccpvdz": "aug-cc-pvdz",
    "augccpvtz": "aug-cc-pvtz",
    "avdz": "aug-cc-pvdz",
    "avtz": "aug-cc-pvtz",
    "def2tzvp": "def2-tzvp",
    "def2tzvpp": "def2-tzvpp",
    "def2tzvppd": "def2-tzvppd",
    "def2svp": "def2-svp",
}


def normalise_level(name: str) -> str:
    """Canonical spelling of a level-of-theory name (``'wB97X/6-31G*'`` -> ``'wb97x/6-31g(d)'``)."""
    text = " ".join(str(name).strip().lower().split())
    if not text:
        raise ValueError("empty level-of-theory name")
    method, _, basis = text.partition("/")
    method = re.sub(r"\s+", "", method)
    basis = re.sub(r"\s+", "", basis)
    if not method:
        raise ValueError(f"no method before '/' in level-of-theory name {name!r}")
    method = _METHOD_ALIASES.get(method, method)
    basis = _BASIS_ALIASES.get(basis, basis)
    return f"{method}/{basis}" if basis else method


def level_slug(name: str) -> str:
    """A level or strategy name as a file-name part: letters, digits, '-' and '+' kept, others '_'."""
    return "".join(character if character.isalnum() or character in "-+" else "_" for character in name)


def same_level(first: str, second: str) -> bool:
    """Whether two names denote the same level of theory."""
    return normalise_level(first) == normalise_level(second)
