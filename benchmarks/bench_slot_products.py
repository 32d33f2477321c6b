"""The per-atom slot products of HIP-NN's native kernels (`hipnn_native.cpp`: `slot_product_into`,
`slot_dots_into`) next to ATen's batched matrix products (`torch.bmm`, `baddbmm`) on the same tensors,
at the sizes of the benchmark batches: MD17 ethanol (batch of 64 conformers: 576 atoms, 8 slots) and
the 27-atom SPICE molecule (1728 atoms, 26 slots), 20 sensitivities, 64 features (and the first
interaction's 3 one-hot inputs), one thread. Microseconds per call, median [min - max] of
interleaved repetitions, and bmm's time / the kernel's per back-to-back pair.

    python benchmarks/bench_slot_products.py [--repeats 15] [--calls 50] [--float64]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from interleaved_timing import interleaved, paired_speedups, spread

from metamlip.model.hipnn_native import native_module

SHAPES = {"ethanol": (576, 8), "spice": (1728, 26)}  # atoms in a batch of 64, neighbour slots
SENSITIVITIES = 20


def products(atoms: int, slots: int, features: int, dtype: torch.dtype) -> dict[str, tuple[Callable[[], None], Callable[[], None]]]:
    """Each product of the kernels as (ATen, native) calls on random tensors of one shape."""
    generator = torch.Generator().manual_seed(0)
    values = torch.rand(atoms, slots, SENSITIVITIES, generator=generator, dtype=dtype)
    rows = torch.randn(atoms, slots, features, generator=generator, dtype=dtype)
    environment = torch.randn(atoms, SENSITIVITIES, features, generator=generator, dtype=dtype)
    by_sensitivity = torch.empty(atoms, SENSITIVITIES, features, dtype=dtype)
    by_slot = torch.empty(atoms, slots, features, dtype=dtype)
    dots = torch.empty(atoms, slots, SENSITIVITIES, dtype=dtype)
    native = native_module()
    return {
        "s^T x (environment)": (
            lambda: torch.bmm(values.transpose(1, 2), rows, out=by_sensitivity),
            lambda: native.slot_product_into(by_sensitivity, values, True, rows, False),
        ),
        "s e (messages)": (lambda: torch.bmm(values, environment, out=by_slot), lambda: native.slot_product_into(by_slot, values, False, environment, False)),
        "x e^T (slot dots)": (
            lambda: torch.bmm(rows, environment.transpose(1, 2), out=dots),
            lambda: native.slot_dots_into(dots, rows, environment, False),
        ),
        "+= s^T x (accumulated)": (
            lambda: by_sensitivity.baddbmm_(values.transpose(1, 2), rows),
            lambda: native.slot_product_into(by_sensitivity, values, True, rows, True),
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="interleaved repetitions of each pair")
    parser.add_argument("--calls", type=int, default=50, help="calls per timed repetition")
    parser.add_argument("--float64", action="store_true", help="float64 tensors instead of float32")
    arguments = parser.parse_args()
    torch.set_num_threads(1)
    dtype = torch.float64 if arguments.float64 else torch.float32
    print(f"torch {torch.__version__}, one thread, {dtype}; microseconds per call, median [min - max]; bmm time / native time per pair")
    print(f"{'shape':34s} {'product':24s} {'ATen bmm':>22s} {'native':>22s} {'speed-up':>20s}")
    for molecule, (atoms, slots) in SHAPES.items():
        for features in (3, 64):
            for product, (aten, native) in products(atoms, slots, features, dtype).items():
                runs = {"aten": lambda: [aten() for _ in range(arguments.calls)], "native": lambda: [native() for _ in range(arguments.calls)]}
                timings = interleaved(runs, arguments.repeats, arguments.calls)
                microseconds = {name: [1e6 * s / arguments.calls for s in timing.seconds] for name, timing in timings.items()}
                shape = f"{molecule}: {atoms} atoms x {slots} slots, f {features}"
                print(
                    f"{shape:34s} {product:24s} {spread(microseconds['aten'], 0):>22s} {spread(microseconds['native'], 0):>22s} "
                    f"{spread(paired_speedups(timings, 'native', 'aten')):>20s}"
                )


if __name__ == "__main__":
    main()
