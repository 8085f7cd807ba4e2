"""Model graphs: files (lazy load, atomic save, external data, fingerprint), the one resolver of
constant weights, node builders for both representations, and the target MatMuls."""
