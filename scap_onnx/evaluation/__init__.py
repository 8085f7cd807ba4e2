"""Dense against sparse: model pairing by the rewriter's metadata, accuracy and sparsity metrics,
latency, the environment, and the report."""
