"""The frontend extension: valid module syntax, only the frontend's shim imports, the pack version it shows."""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import tomllib

from ..pack import ROOT

SCRIPT = ROOT / "web" / "colorflow.js"
#: Shim modules the ComfyUI frontend (1.27) serves to extensions under /scripts/.
FRONTEND_SHIMS = {"../../scripts/app.js", "../../scripts/widgets.js", "../../scripts/api.js"}


def test_extension_shows_the_pack_version():
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert re.search(r'const VERSION = "([^"]+)";', SCRIPT.read_text()).group(1) == version


def test_extension_imports_only_frontend_shims():
    imports = set(re.findall(r'^import .* from "([^"]+)";$', SCRIPT.read_text(), flags=re.M))
    assert imports and imports <= FRONTEND_SHIMS


def test_extension_reacts_to_what_the_nodes_send(pack):
    """The ui key and node ids the script listens for are the ones the Python nodes use."""
    text = SCRIPT.read_text()
    assert 'const INFO_WIDGET = "colorflow_info";' in text
    for node_id in re.search(r"new Set\(\[(.*?)\]\)", text).group(1).replace('"', "").split(", "):
        assert node_id in pack.NODE_CLASS_MAPPINGS


@pytest.mark.skipif(shutil.which("node") is None, reason="node (JavaScript) is not installed")
def test_extension_is_valid_module_syntax():
    checked = subprocess.run(["node", "--input-type=module", "--check"], input=SCRIPT.read_text(), capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
