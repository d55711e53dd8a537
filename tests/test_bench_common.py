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


def test_rotated_puts_every_name_in_every_position():
    from bench.timing import rotated
    names = ["ours", "fa2", "cudnn"]
    orders = [rotated(names, r) for r in range(6)]
    assert orders[0] == names and orders[1] == ["fa2", "cudnn", "ours"]
    for pos in range(len(names)):
        counts = {n: sum(o[pos] == n for o in orders) for n in names}
        assert counts == {n: 2 for n in names}
    assert rotated({"a": 1, "b": 2}, 1) == ["b", "a"] and rotated([], 3) == []
