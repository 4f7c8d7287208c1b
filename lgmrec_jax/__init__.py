"""lgmrec-jax: a JAX/Flax trainer for LGMRec, faithful to the authors' PyTorch code.

Map of the package (see WORKSPACE.md for the data flow):
  data      MMRec-format datasets on disk -> validated host arrays (SPEC §1)
  graph     R and the normalised adjacency as sorted BCOO (or ELL blocks), three propagation kernels (SPEC §3.3)
  model     the LGMRec forward pass in Flax, with explicit or recorded noise (SPEC §3)
  losses    BPR, hypergraph InfoNCE, regulariser (SPEC §4)
  metrics   MMRec top-k metrics (SPEC §5)
  parity    replays the authors' golden vectors
  train     the absl entry point
"""

__version__ = "0.1.0"
