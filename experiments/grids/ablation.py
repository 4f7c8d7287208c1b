"""The paper's ablation study: LGMRec and four variants, each removing one part.

  LGMRec    the full model
  w/o CGE   use_cge=False: the fused output omits the collaborative graph embedding C, and the
            hypergraph propagates the unpropagated item ID embeddings instead of C's item rows
  w/o MGE   use_mge=False: no modality graph embeddings (nrm(M_v) + nrm(M_t) dropped)
  w/o GHE   use_ghe=False: no global hypergraph embedding, hence no hypergraph contrastive loss
  w/o HCL   cl_weight=0: the hypergraph embedding stays, its contrastive loss is off

The switches are model fields (lgmrec_jax/model.py); use_* change the program, so each variant is
its own compiled program, while w/o HCL shares LGMRec's. Run it with several seeds for error bars:
``--grid=ablation --seeds=0,1,2``.
"""

UNKNOWN_KEY_NOTE = ("the ablation switches use_cge/use_mge/use_ghe are config keys of lgmrec_jax/configs/"
                    "default.py and fields of the model; this checkout lacks them")

VARIANTS = (
    ("LGMRec", {}),
    ("w/o CGE", {"use_cge": False}),
    ("w/o MGE", {"use_mge": False}),
    ("w/o GHE", {"use_ghe": False}),
    ("w/o HCL", {"cl_weight": 0.0}),
)


def sweep(add):
    for label, overrides in VARIANTS:
        add(label=label, **overrides)
