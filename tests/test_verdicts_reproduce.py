"""docs/verdicts.py rebuilt from docs/data (the documented recipe: every archive unpacked into one
directory) reproduces the committed docs/verdicts.json and every verdict table of docs/RESULTS.md."""

import importlib.util
import json
import sys
import tarfile
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _verdicts_module():
    spec = importlib.util.spec_from_file_location("docs_verdicts", DOCS / "verdicts.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


@pytest.fixture(scope="module")
def unpacked(tmp_path_factory):
    """`for f in docs/data/*.tgz; do tar xzf $f -C DIR; done`, and the member files of each archive."""
    root = tmp_path_factory.mktemp("rd")
    members = {}
    for archive in sorted((DOCS / "data").glob("*.tgz")):
        with tarfile.open(archive) as tar:
            members[archive.name] = {m.name.removeprefix("./") for m in tar.getmembers() if m.isfile()}
            tar.extractall(root, filter="data")
    return root, members


def test_no_archive_overwrites_another(unpacked):
    """Each archive unpacks into its own study directory: no file of one archive is a file of another
    (teacher_stability_stable_gpu.tgz once unpacked into teacher_stability_gpu/ and replaced its cells)."""
    _, members = unpacked
    names = sorted(members)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not members[a] & members[b], f"{a} and {b} write the same files"
    tops = {a: {n.split("/")[0] for n in m} for a, m in members.items()}
    assert tops["teacher_stability_stable_gpu.tgz"] == {"teacher_stability_stable_gpu"}


def test_verdicts_and_results_tables_reproduce_from_the_data(unpacked):
    root, _ = unpacked
    V = _verdicts_module()
    content, _ = V.build(root)
    committed = json.loads((DOCS / "verdicts.json").read_text())
    assert [r["id"] for r in content["claims"]] == [r["id"] for r in committed["claims"]]
    for new, old in zip(content["claims"], committed["claims"]):
        assert new == old, new["id"]
    assert content == committed
    text = (DOCS / "RESULTS.md").read_text()
    assert V.missing_blocks(text) == []
    assert V.results_with_tables(text, content["claims"]) == text
    # every row stands in exactly one RESULTS table
    shown = [r["id"] for name in V.SECTIONS for r in V.section_rows(content["claims"], name)]
    assert sorted(shown) == sorted(r["id"] for r in content["claims"])
