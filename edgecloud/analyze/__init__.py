"""Model analyses that guide design choices: Hybrid-Net PCA layer significance (pca) and activation SNR under a backend's noise (snr)."""
