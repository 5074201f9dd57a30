"""The weight formats' names (``--weights``), torch-free: the command line and the ONNX Runtime runner read them
without importing the quantizers (:mod:`kvexport.models.weights`)."""

TORCHAO_FORMATS = ("fp32", "8da8w", "8da4w", "q4", "q4-h8", "q4-h4", "q4-q8")
NBITS_FORMATS = {"int8": 8, "int4": 4}  # onnx/ort: MatMulNBits, weight-only, symmetric, blocks of NBITS_BLOCK
NBITS_BLOCK = 32
REFERENCE_FORMATS = TORCHAO_FORMATS + tuple(NBITS_FORMATS)  # what quantize_weights (the eager reference) applies
