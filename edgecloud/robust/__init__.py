"""Adversarial robustness on simulated CiM hardware: attacks, threat models, discretisation."""
