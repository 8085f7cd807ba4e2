"""Model rewriting: the sparsify pass, the fusion pass and the one pipeline that runs them and saves."""
