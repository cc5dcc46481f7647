"""The packages: pipeline/ and stages/ install under one name, as `exitflow.pipeline` and
`exitflow.stages` (their subpackages found, not listed), beside `exitflow/` itself. The rest of the
metadata is in pyproject.toml; this file exists because pyproject.toml cannot map folders to names
under a namespace."""

from setuptools import find_packages, setup

FOLDERS = ("pipeline", "stages")

setup(
    packages=["exitflow", *(f"exitflow.{p}" for p in find_packages(include=[f"{f}*" for f in FOLDERS]))],
    package_dir={"exitflow": "exitflow", **{f"exitflow.{f}": f for f in FOLDERS}},
)
