"""The hyper_num sweep of the reference's search grid (SPEC §4.5): 2, 4, 8, ..., 256 hyperedges.

hyper_num changes the shapes of the hyperedge matrices, so every value is its own program.
"""

VALUES = tuple(2 ** k for k in range(1, 9))


def sweep(add):
    for value in VALUES:
        add(hyper_num=value)
