"""The paper's studies as sweeps, and the analyses of the questions it left open.

A package beside `jaxsae`, not part of it (setuptools installs only jaxsae*): run its drivers
from the repository root as modules, `python -m experiments.run --study=size`, which puts the
root on the path, as pytest's `pythonpath` does for the tests.
"""
