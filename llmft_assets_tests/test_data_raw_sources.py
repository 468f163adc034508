"""Raw readers: every source kind, and every way a source can be broken."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmft_assets.data.raw_sources import DataSourceError, RawBatch, iter_raw_batches
from llmft_assets.data.sample_gen import generate_rows, write_hub_layout, write_parquet
from llmft_assets.data.schema import QUARANTINE_SCHEMA, StageCounts


def read_all(source: str, **kwargs: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]], StageCounts]:
    counts = StageCounts(stage="raw")
    rows: list[dict[str, Any]] = []
    quarantine: list[dict[str, Any]] = []
    for batch in iter_raw_batches(source, counts=counts, **kwargs):
        assert isinstance(batch, RawBatch)
        rows.extend(batch.rows)
        quarantine.extend(batch.quarantine)
    counts.check_balanced()
    assert counts.rows_out == len(rows) and counts.quarantined == len(quarantine)
    # Quarantine rows must fit the table schema as they are.
    pa.Table.from_pylist(quarantine, schema=QUARANTINE_SCHEMA)
    return rows, quarantine, counts


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_jsonl_with_malformed_broken_utf8_and_non_object_lines(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    good = [{"id": "a", "problem": "p"}, {"id": "b", "problem": "q"}, {"id": "c", "problem": "r"}]
    lines = [
        json.dumps(good[0]).encode(),
        b'{"id": "broken", "problem": ',  # malformed JSON
        json.dumps(good[1]).encode(),
        b'{"id": "bad-bytes", "problem": "caf\xc3\x28"}',  # invalid UTF-8 continuation byte
        b"",  # blank lines are not rows
        b"[1, 2, 3]",  # valid JSON, not an object
        json.dumps(good[2]).encode(),
    ]
    path.write_bytes(b"\r\n".join(lines) + b"\r\n")

    rows, quarantine, counts = read_all(str(path))

    assert [row["id"] for row in rows] == ["a", "b", "c"]
    assert [row["origin"] for row in rows] == [f"{path}#0", f"{path}#2", f"{path}#6"]
    reasons = {row["origin"]: row["reason"] for row in quarantine}
    assert reasons[f"{path}#1"].startswith("malformed_json:")
    assert reasons[f"{path}#3"].startswith("invalid_utf8:") and "line 4" in reasons[f"{path}#3"]
    assert reasons[f"{path}#5"].startswith("not_an_object:") and "list" in reasons[f"{path}#5"]
    assert all(row["stage"] == "raw" for row in quarantine)
    assert counts.rows_in == 6
    assert counts.reasons == {"malformed_json": 1, "invalid_utf8": 1, "not_an_object": 1}


def test_json_array_file_and_json_lines_in_a_dot_json_file(tmp_path: Path) -> None:
    array_path = tmp_path / "array.json"
    array_path.write_text(json.dumps([{"id": "x"}, "not an object", {"id": "y"}]), encoding="utf-8")
    lines_path = write_jsonl(tmp_path / "lines.json", [{"id": "z"}])

    rows, quarantine, _ = read_all(str(array_path))
    assert [row["id"] for row in rows] == ["x", "y"]
    assert [row["origin"] for row in quarantine] == [f"{array_path}#1"]

    rows, quarantine, _ = read_all(str(lines_path))
    assert [row["id"] for row in rows] == ["z"] and quarantine == []


def test_malformed_json_array_is_one_quarantine_row(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('[{"id": "x"}, {"id": ', encoding="utf-8")
    rows, quarantine, _ = read_all(str(path))
    assert rows == []
    assert len(quarantine) == 1 and quarantine[0]["reason"].startswith("malformed_json:")


def test_gzipped_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write(json.dumps({"id": "g"}) + "\n")
    rows, _, _ = read_all(str(path))
    assert [row["id"] for row in rows] == ["g"]


def test_parquet_file_batches_and_max_rows(tmp_path: Path) -> None:
    path = tmp_path / "v0.parquet"
    pq.write_table(pa.Table.from_pylist(generate_rows(25, schema="v0", seed=3)), path, row_group_size=7)

    batches = list(iter_raw_batches(str(path), batch_size=10))
    assert [len(batch) for batch in batches] == [10, 10, 5]
    assert batches[0].rows[0]["origin"] == f"{path}#0"
    assert batches[2].rows[-1]["origin"] == f"{path}#24"

    rows, _, counts = read_all(str(path), max_rows=12, batch_size=5)
    assert len(rows) == 12 and counts.rows_in == 12


def test_unreadable_parquet_is_quarantined_and_the_rest_is_read(tmp_path: Path) -> None:
    (tmp_path / "a_corrupt.parquet").write_bytes(b"PAR1 this is not a parquet file")
    write_jsonl(tmp_path / "b_good.jsonl", [{"id": "ok"}])
    rows, quarantine, _ = read_all(str(tmp_path))
    assert [row["id"] for row in rows] == ["ok"]
    assert len(quarantine) == 1 and quarantine[0]["reason"].startswith("unreadable_parquet:")
    assert quarantine[0]["origin"].startswith(str(tmp_path / "a_corrupt.parquet"))


def test_empty_files_give_zero_rows_and_a_warning(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "blank.jsonl").write_text("\n\n  \n", encoding="utf-8")
    pq.write_table(pa.table({"id": pa.array([], pa.string())}), tmp_path / "no_rows.parquet")
    rows, quarantine, counts = read_all(str(tmp_path))
    assert rows == [] and quarantine == []
    assert counts.extra["empty_files"] == 3 and len(counts.warnings) == 3
    assert any("empty.jsonl" in warning for warning in counts.warnings)


def test_glob_and_directory_sources(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "one.jsonl", [{"id": "1"}])
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "sub" / "two.jsonl", [{"id": "2"}])
    (tmp_path / "notes.txt").write_text("ignored", encoding="utf-8")

    rows, _, _ = read_all(str(tmp_path / "*.jsonl"))
    assert [row["id"] for row in rows] == ["1"]
    rows, _, counts = read_all(str(tmp_path))
    assert sorted(row["id"] for row in rows) == ["1", "2"] and counts.extra["files"] == 2


def test_missing_and_unreadable_paths_raise_data_source_error(tmp_path: Path) -> None:
    with pytest.raises(DataSourceError, match="no such file or directory"):
        iter_raw_batches(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataSourceError, match="matches the pattern"):
        iter_raw_batches(str(tmp_path / "*.parquet"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataSourceError, match="holds no"):
        iter_raw_batches(str(tmp_path / "empty_dir"))
    (tmp_path / "data.csv").write_text("id\n1\n", encoding="utf-8")
    with pytest.raises(DataSourceError, match="unsupported file type"):
        iter_raw_batches(str(tmp_path / "data.csv"))
    if os.geteuid() != 0:  # root reads anything
        locked = write_jsonl(tmp_path / "locked.jsonl", [{"id": "x"}])
        locked.chmod(0)
        try:
            with pytest.raises(DataSourceError, match=r"locked\.jsonl"):
                list(iter_raw_batches(str(locked)))
        finally:
            locked.chmod(0o644)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"config": "v2"}, "config must be one of"),
        ({"config": ""}, "config must be one of"),
        ({"max_rows": 0}, "max_rows must be a positive integer"),
        ({"max_rows": -5}, "max_rows must be a positive integer"),
        ({"max_rows": 1.5}, "max_rows must be a positive integer"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        iter_raw_batches("sample", **kwargs)


@pytest.fixture
def sample_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Sample files laid out like the bundled ones (the real ones are made by scripts/make_sample.py)."""
    import llmft_assets.data.raw_sources as raw_sources

    directory = tmp_path / "sample_data"
    write_parquet(generate_rows(60, schema="v0", seed=1), directory / "r1_distill_sft_v0.parquet", "v0")
    write_parquet(generate_rows(20, schema="v1", seed=1), directory / "r1_distill_sft_v1.parquet", "v1")
    monkeypatch.setattr(raw_sources, "SAMPLE_DIR", directory)
    return directory


def test_missing_bundled_sample_is_a_data_source_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import llmft_assets.data.raw_sources as raw_sources

    monkeypatch.setattr(raw_sources, "SAMPLE_DIR", tmp_path)
    with pytest.raises(DataSourceError, match=r"r1_distill_sft_v1\.parquet is missing"):
        iter_raw_batches("sample", config="v1")


def test_bundled_sample_configs(sample_dir: Path) -> None:
    v0_rows, v0_quarantine, _ = read_all("sample", max_rows=50)
    assert len(v0_rows) == 50 and v0_quarantine == []
    assert "problem" in v0_rows[0]
    assert v0_rows[0]["origin"] == "llmft_assets/sample_data/r1_distill_sft_v0.parquet#0"
    v1_rows, _, _ = read_all("sample", config="v1", max_rows=5)
    assert "messages" in v1_rows[0]
    all_rows, _, counts = read_all("sample", config="all")
    assert {"v0", "v1"} == {row["origin"].split("_")[-1].split(".")[0] for row in all_rows}
    assert counts.extra["files"] == 2


def test_hugging_face_loader_on_a_local_copy_of_the_hub_layout(tmp_path: Path) -> None:
    root = write_hub_layout(
        tmp_path / "R1-Distill-SFT",
        generate_rows(6, schema="v0", seed=1),
        generate_rows(4, schema="v1", seed=1),
    )
    rows, quarantine, _ = read_all(f"hf:{root}", config="v1", batch_size=3)
    assert len(rows) == 4 and quarantine == []
    assert rows[0]["origin"] == f"hf://{root}/v1#0"
    assert isinstance(rows[0]["messages"], list) and rows[0]["messages"][0]["role"] == "user"
    rows, _, _ = read_all(f"hf:{root}", config="all")
    assert len(rows) == 10
    # As a plain directory with a config, only that config's sub-directory is read.
    rows, _, _ = read_all(str(root), config="v0")
    assert len(rows) == 6 and all("problem" in row for row in rows)


def test_hugging_face_failure_is_a_data_source_error(tmp_path: Path) -> None:
    with pytest.raises(DataSourceError, match="cannot load Hugging Face dataset"):
        list(iter_raw_batches(f"hf:{tmp_path / 'nothing-here'}", config="v0"))


def test_s3_prefix_through_an_in_process_mock() -> None:
    import boto3
    from moto import mock_aws

    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="raw")
        client.put_object(Bucket="raw", Key="drop/a.jsonl", Body=b'{"id": "s1"}\n{bad json\n')
        table = pa.Table.from_pylist([{"id": "s2"}, {"id": "s3"}])
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        client.put_object(Bucket="raw", Key="drop/b.parquet", Body=sink.getvalue().to_pybytes())
        client.put_object(Bucket="raw", Key="drop/readme.txt", Body=b"ignored")

        rows, quarantine, _ = read_all("s3://raw/drop/", s3_client=client)
        assert [row["id"] for row in rows] == ["s1", "s2", "s3"]
        assert rows[1]["origin"] == "s3://raw/drop/b.parquet#0"
        assert [row["origin"] for row in quarantine] == ["s3://raw/drop/a.jsonl#1"]

        with pytest.raises(
            DataSourceError, match=r"no \.jsonl/\.json/\.parquet objects under s3://raw/empty"
        ):
            iter_raw_batches("s3://raw/empty/", s3_client=client).__next__()
        with pytest.raises(DataSourceError, match="cannot list s3://missing-bucket"):
            iter_raw_batches("s3://missing-bucket/x", s3_client=client).__next__()


@pytest.mark.slow
def test_s3_through_a_real_server(s3_bucket: str) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    body = "".join(json.dumps(row) + "\n" for row in generate_rows(30, schema="v0", seed=5))
    client.put_object(Bucket=s3_bucket, Key="incoming/part-0.jsonl", Body=body.encode())
    rows, quarantine, _ = read_all(f"s3://{s3_bucket}/incoming", s3_client=client, batch_size=8)
    assert len(rows) == 30 and quarantine == []


def test_pathological_lines_are_quarantined_with_a_reason_and_reading_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "hostile.jsonl"
    deep_beyond_parser = b'{"id": "deep", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    deep_but_parseable = b'{"id": "deep2", "x": ' + b"[" * 200 + b"]" * 200 + b"}"
    lines = [
        json.dumps({"id": "a", "problem": "p"}).encode(),
        deep_beyond_parser,
        b'{"id": "huge", "n": ' + b"9" * 50_000 + b"}",  # beyond Python's int digit limit
        deep_but_parseable,
        b'{"id": "surrogate", "problem": "x\\ud800y"}',  # valid JSON, not valid Unicode
        json.dumps({"id": "b", "problem": "q", "n": 1e308}).encode(),
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")

    rows, quarantine, counts = read_all(str(path))

    assert [row["id"] for row in rows] == ["a", "b"]
    reasons = {row["origin"]: row["reason"] for row in quarantine}
    assert reasons[f"{path}#1"].startswith("too_deep:")
    assert reasons[f"{path}#2"].startswith("unparseable_value:") and "digit" in reasons[f"{path}#2"]
    assert reasons[f"{path}#3"].startswith("too_deep: nested more than")
    assert reasons[f"{path}#4"].startswith("invalid_unicode:")
    assert counts.reasons == {"too_deep": 2, "unparseable_value": 1, "invalid_unicode": 1}
    # The quarantine keeps what a person needs to find the row, and fits Parquet as UTF-8.
    by_origin = {row["origin"]: row for row in quarantine}
    assert by_origin[f"{path}#4"]["id"] == "surrogate" and "\\ud800" in by_origin[f"{path}#4"]["payload"]
    assert by_origin[f"{path}#3"]["id"] == "deep2"


def test_a_deep_json_array_file_is_one_quarantine_row(tmp_path: Path) -> None:
    path = tmp_path / "deep.json"
    path.write_bytes(b"[" * 100_000 + b"]" * 100_000)
    rows, quarantine, _ = read_all(str(path))
    assert rows == [] and len(quarantine) == 1 and quarantine[0]["reason"].startswith("too_deep:")


def _nested(levels: int, innermost: object) -> object:
    value = innermost
    for level in range(levels):
        value = [value] if level % 2 else {"k": value}
    return value


def test_encode_row_gives_the_payload_or_why_not_at_the_nesting_limit() -> None:
    from llmft_assets.data.raw_sources import MAX_NESTING_DEPTH, encode_row, row_problem

    # The row is level 1, its values level 2: 30 more containers put the scalar at level 32, the limit.
    at_limit = {"id": "a", "x": _nested(MAX_NESTING_DEPTH - 2, 0)}
    assert encode_row(at_limit) == (json.dumps(at_limit, ensure_ascii=False, default=str), None)
    assert row_problem(at_limit) is None
    beyond = {"id": "b", "x": _nested(MAX_NESTING_DEPTH - 1, 0)}
    assert encode_row(beyond) == (None, f"too_deep: nested more than {MAX_NESTING_DEPTH} levels")
    # An empty container at the last level holds nothing deeper.
    assert encode_row({"x": _nested(MAX_NESTING_DEPTH - 2, [])})[1] is None
    assert encode_row({"x": _nested(MAX_NESTING_DEPTH - 2, [1])})[1] == (
        f"too_deep: nested more than {MAX_NESTING_DEPTH} levels"
    )
    assert encode_row({"id": "c", "text": "x\ud800y"})[1].startswith("invalid_unicode:")
    assert encode_row({"id": "d", "when": b"\x00"}) == ('{"id": "d", "when": "b\'\\\\x00\'"}', None)
