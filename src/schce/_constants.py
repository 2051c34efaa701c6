"""Names shared across layers: the legacy registry section, the monitored metric, output and sampling constants.

Kept free of heavy imports so every layer (and ``schce --help``) can read them cheaply.
"""

#: Where model files of format 2 and earlier kept schce's set-up: inside the saved scvi-tools registry.
SETUP_KEY = "schce"
#: The validation metric that early stopping, best-weight selection and checkpoints follow with
#: ``early_stopping_monitor="f1"`` (the default follows the class-weighted validation loss); ``schce train`` prints it.
MONITOR = "validation_corrected_macro_f1"
#: Default prefix of the keys :meth:`~schce.HCEClassifier.predict` writes.
KEY_ADDED = "schce"
#: Cells an atlas datamodule's shuffled training loader contributes to the gene scaling (plenty for a mean and a std).
SCALING_SAMPLE = 200_000
#: Cells per batch of validation, calibration and inference passes over in-memory data.
EVAL_BATCH_SIZE = 4096
#: Training losses: annotation-aware HCE (each cell's acceptable labels follow what its source's annotation can
#: mean), plain HCE (a label's whole subtree is acceptable) and flat cross-entropy.
LOSSES = ("hce-aware", "hce", "ce")
#: The loss :class:`~schce.HCEClassifier` trains with unless told otherwise.
DEFAULT_LOSS = "hce-aware"
