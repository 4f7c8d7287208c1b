"""The temperature sweep (ours: the reference hard-codes tau = 0.2 for both the Gumbel softmax of
the hyperedge assignments and the hypergraph InfoNCE; config key ``tau``). All values share one
program, so the whole sweep trains as one group.
"""

VALUES = (0.05, 0.1, 0.2, 0.5, 1.0)


def sweep(add, ctx):
    del ctx  # the same values on every dataset
    for value in VALUES:
        add(tau=value)
