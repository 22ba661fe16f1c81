"""Trained model bundles shipped with edgecloud (installed as ``edgecloud.models``)."""
