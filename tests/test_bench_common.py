"""bench/common.py's JSON writing (CPU only)."""
import json
import os

from bench import common


def test_write_json_replaces_whole_and_leaves_no_temporary(tmp_path):
    path = str(tmp_path / "sub" / "r.json")
    common.write_json(path, {"rows": [1]}, quiet=True)
    common.write_json(path, {"rows": [1, 2], "meta": {"complete": True}})
    with open(path) as f:
        assert json.load(f) == {"rows": [1, 2], "meta": {"complete": True}}
    assert os.listdir(tmp_path / "sub") == ["r.json"]
