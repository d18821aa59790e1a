"""Quality scoring: the masked-LM pseudo-NLL (``nll``) and the seed-set threshold
calibration (``calibration``). Imports transformers and the kernel, no stage."""
