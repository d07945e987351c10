"""Package map: the design card's top-level folders install as sub-packages of `attnc`.

compiler/, passes/, plugins/ and models/ stay at the top of the repository (so a
newcomer finds `passes/neighborhood.py` at once) but install as `attnc.compiler`,
`attnc.passes`, ... so a user's environment never gets generic top-level packages
named `models` or `compiler`. Everything else lives in pyproject.toml.
"""

from setuptools import find_packages, setup

ROOTS = {
    "attnc": "attnc",
    "attnc.compiler": "compiler",
    "attnc.passes": "passes",
    "attnc.plugins": "plugins",
    "attnc.models": "models",
}

packages: list[str] = []
for package, folder in ROOTS.items():
    packages.append(package)
    packages += [f"{package}.{sub}" for sub in find_packages(folder)]

setup(
    packages=packages,
    package_dir=ROOTS,
    package_data={"attnc.plugins": ["*/*.cpp", "*/*.h", "*/*.cu", "agent/routes.json"]},
)
