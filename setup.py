"""Package discovery, the one thing pyproject.toml cannot say: every HFSAMCore subpackage is found
(a new stage folder is never left out of the wheel), and the extension-level Resources/ folder
travels inside it as HFSAMCore.Resources (mapped in pyproject.toml's [tool.setuptools.package-dir])."""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["HFSAMCore", "HFSAMCore.*"]), "HFSAMCore.Resources"])
