"""Training defaults per backbone."""

# Classifier defaults per backbone, chosen on held-out batches of real PBMCs (leave-one-batch-out): a wider,
# shallower MLP than scTab's 8 × 128 generalises better across batches at small and medium scale.
DEFAULT_BACKBONE_KWARGS = {
    "mlp": {"n_hidden": 256, "n_layers": 3, "dropout": 0.2, "input_dropout": 0.2},
    "linear": {},
    # scTab's TabNet with a variance floor in its input batch norm, so eval-mode inputs stay in the range that small
    # training batches produce (docs/training.md).
    "tabnet": {"initial_bn_eps": 1.0},
}
# Standardised inputs by default: they help the MLP across batches and, with L-BFGS and an L2 penalty, the linear
# model (docs/training.md); TabNet's input batch norm already standardises.
DEFAULT_STANDARDIZE = {"mlp": True, "linear": True, "tabnet": False}
# AdamW (lr, weight decay) per backbone; TabNet's are the published recipe, which it needs to train at all.
DEFAULT_OPTIMIZER = {"linear": (5e-4, 0.01), "mlp": (5e-4, 0.01), "tabnet": (5e-3, 0.05)}
# L2 strength of the full-batch L-BFGS linear model: symphony leave-one-batch-out needs ≥ 0.03 to transfer across
# batches (0.81 -> 0.84 corrected macro F1); pancreas prefers more, pbmc68k is flat (docs/training.md).
LBFGS_L2 = 0.1
