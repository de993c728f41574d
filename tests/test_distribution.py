"""What a non-editable install ships: an editable one finds every subpackage on disk whether pyproject.toml
lists it or not, so a package missing from the list only shows up for users of a wheel."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_subpackage_is_listed_for_the_wheel():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "ftcluster").rglob("__init__.py")}
    listed = set(setuptools["packages"])
    assert on_disk - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    for package, folder in setuptools["package-dir"].items():
        assert (ROOT / folder).is_dir() and package in listed, package
