"""docs/benchmarks.md is exactly what its committed benchmark records give: a page edited by
hand, or a record changed without regenerating the page (`python -m benchmarks.report`),
fails here. Reads JSON only; runs no benchmark."""

import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# First on the path: opacus installs a top-level `benchmarks` package that would shadow ours.
if sys.path[0] != str(ROOT):
    sys.path.insert(0, str(ROOT))

from benchmarks import report  # noqa: E402


def test_the_benchmarks_page_is_its_records():
    committed = (ROOT / report.PAGE).read_text(encoding="utf-8")
    assert committed == report.render(ROOT), "docs/benchmarks.md differs from its records: run python -m benchmarks.report"


def test_a_record_missing_a_field_is_refused_in_one_line_naming_file_and_field(tmp_path):
    for relative in report.RECORDS.values():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / relative, tmp_path / relative)
    broken = tmp_path / report.RECORDS["full"]
    record = json.loads(broken.read_text(encoding="utf-8"))
    del record["pfl"]["fedtune_over_pfl_wall"]
    broken.write_text(json.dumps(record), encoding="utf-8")

    with pytest.raises(report.RecordError) as raised:
        report.render(tmp_path)
    message = str(raised.value)
    assert "\n" not in message
    assert "docs/benchmark-runs/full.json" in message and "pfl.fedtune_over_pfl_wall" in message
