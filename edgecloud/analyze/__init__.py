"""Model analyses that guide design choices (Hybrid-Net PCA layer significance)."""
