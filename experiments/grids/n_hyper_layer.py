"""The n_hyper_layer sweep (hypergraph propagation depth; SPEC §4.5): 1, 2, 3, 4.

Depth changes the program (the propagation is unrolled), so each value is its own program.
"""

VALUES = (1, 2, 3, 4)


def sweep(add):
    for value in VALUES:
        add(n_hyper_layer=value)
