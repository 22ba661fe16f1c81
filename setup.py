"""Package layout that pyproject.toml cannot express alone: the top-level ``models/`` folder
(trained bundles) ships inside the installed package as ``edgecloud.models``."""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["edgecloud", "edgecloud.*"]) + ["edgecloud.models"],
    package_dir={"edgecloud.models": "models"},
)
