"""The ScapSparseMatMul operator: its contract, numpy reference, lowering to standard ops, the
compiled library, the session factory and the onnxruntime-extensions fallback."""
