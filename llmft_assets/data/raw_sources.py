"""Raw readers: stream rows out of the bundled sample, local files, S3 or the Hugging Face hub.

Every reader yields `RawBatch`es: the rows that parsed (dicts, each with an ``origin`` of
``<file or uri>#<row index>``) and quarantine rows (QUARANTINE_SCHEMA) for what could not be parsed.
Nothing is read whole into memory except a ``.json`` file holding one JSON array (the format forces
it); parquet goes row group by row group, JSON lines line by line, S3 objects through a temporary file.

``source`` forms:

- ``"sample"``: the bundled ``llmft_assets/sample_data/r1_distill_sft_{v0,v1}.parquet``
  (``config`` ``"v0"`` (default), ``"v1"`` or ``"all"``);
- a local ``.jsonl``/``.json``/``.parquet`` file (``.gz`` allowed for JSON), a glob, or a directory
  (read recursively; with ``config`` v0/v1 and a sub-directory of that name, only that one, which is how
  a downloaded copy of the hub repository is laid out);
- ``s3://bucket/prefix``: every supported object under the prefix, through ``s3_client``;
- ``hf:<id or local dir>`` or a bare ``owner/name`` that is not a local path: a Hugging Face dataset
  read with ``datasets.load_dataset(id, config, split="train", streaming=True)``.
"""

from __future__ import annotations

import glob as globlib
import gzip
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from llmft_assets.data.formats import RowRejected, apply_column_mapping, check_column_mapping
from llmft_assets.data.schema import StageCounts, quarantine_row

STAGE = "raw"
SAMPLE_SOURCE = "sample"
VALID_CONFIGS: tuple[str, ...] = ("v0", "v1", "all")
SUPPORTED_SUFFIXES: tuple[str, ...] = (".jsonl", ".json", ".parquet", ".jsonl.gz", ".json.gz")
SAMPLE_DIR = Path(__file__).resolve().parent.parent / "sample_data"
_GLOB_CHARS = frozenset("*?[")
_UTF8_BOM = b"\xef\xbb\xbf"
# A conversation row nests a few levels (row -> messages -> message); anything far deeper is not data,
# and Python's json recursion would fail on it further down the pipeline.
MAX_NESTING_DEPTH = 32


class DataSourceError(Exception):
    """A source that cannot be read at all: missing or unreadable path, empty listing, hub failure."""


@dataclass
class RawBatch:
    """Rows parsed from a source (each with an ``origin``), each row's JSON payload (`encode_row`, in
    the same order) and quarantine rows for the rest."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    quarantine: list[dict[str, Any]] = field(default_factory=list)
    payloads: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows) + len(self.quarantine)


# A record is either a parsed row (origin, row, None) or a rejected one (origin, None, quarantine row).
_Record = tuple[str, dict[str, Any] | None, dict[str, Any] | None]


def _check_arguments(config: str | None, max_rows: int | None, batch_size: int) -> None:
    if config is not None and config not in VALID_CONFIGS:
        raise ValueError(f"config must be one of {', '.join(VALID_CONFIGS)} or None, got {config!r}")
    if max_rows is not None and (
        isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows <= 0
    ):
        raise ValueError(f"max_rows must be a positive integer or None, got {max_rows!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def _configs(config: str | None) -> list[str]:
    if config in (None, "v0"):
        return ["v0"]
    if config == "all":
        return ["v0", "v1"]
    return [config]


def _is_supported(name: str) -> bool:
    return name.lower().endswith(SUPPORTED_SUFFIXES)


def _bad(origin: str, reason: str, payload: Any = None) -> _Record:
    return (origin, None, quarantine_row(origin=origin, stage=STAGE, reason=reason, row=payload))


# ---------------------------------------------------------------------------------------- file formats


def _open_text_bytes(path: Path) -> IO[bytes]:
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rb")
    return path.open("rb")


def _parse_json_line(origin: str, raw_line: bytes, line_number: int) -> _Record:
    try:
        text = raw_line.decode("utf-8")
    except UnicodeDecodeError as error:
        return _bad(
            origin,
            f"invalid_utf8: {error.reason} at byte {error.start} of line {line_number}",
            raw_line.decode("utf-8", errors="replace"),
        )
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        return _bad(origin, f"malformed_json: {error.msg} at line {line_number} column {error.colno}", text)
    except RecursionError:
        return _bad(
            origin, f"too_deep: line {line_number} nests deeper than Python's JSON parser allows", text
        )
    except ValueError as error:  # e.g. an integer literal beyond Python's digit limit
        return _bad(origin, f"unparseable_value: {error} at line {line_number}", text)
    if not isinstance(value, dict):
        return _bad(origin, f"not_an_object: line {line_number} holds a JSON {type(value).__name__}", value)
    value["origin"] = origin
    return (origin, value, None)


def _iter_json_lines(origin_name: str, handle: IO[bytes]) -> Iterator[_Record]:
    for line_index, raw_line in enumerate(handle):
        if line_index == 0 and raw_line.startswith(_UTF8_BOM):
            raw_line = raw_line[len(_UTF8_BOM) :]
        if not raw_line.strip():
            continue
        yield _parse_json_line(f"{origin_name}#{line_index}", raw_line.rstrip(b"\r\n"), line_index + 1)


def _iter_json_array(origin_name: str, handle: IO[bytes]) -> Iterator[_Record]:
    # One JSON array is one document: it has to be parsed whole.
    data = handle.read()
    try:
        value = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as error:
        yield _bad(f"{origin_name}#0", f"invalid_utf8: {error.reason} at byte {error.start} of the file")
        return
    except json.JSONDecodeError as error:
        yield _bad(
            f"{origin_name}#0",
            f"malformed_json: {error.msg} at line {error.lineno} column {error.colno}; "
            "the whole JSON array is unreadable",
        )
        return
    except (RecursionError, ValueError) as error:
        reason = (
            "too_deep: nested deeper than Python's JSON parser allows"
            if isinstance(error, RecursionError)
            else f"unparseable_value: {error}"
        )
        yield _bad(f"{origin_name}#0", f"{reason}; the whole JSON array is unreadable")
        return
    for index, item in enumerate(value):
        origin = f"{origin_name}#{index}"
        if isinstance(item, dict):
            item["origin"] = origin
            yield (origin, item, None)
        else:
            yield _bad(origin, f"not_an_object: array element {index} is a JSON {type(item).__name__}", item)


def _first_significant_byte(handle: IO[bytes]) -> bytes:
    at_start = True
    while chunk := handle.read(4096):
        if at_start and chunk.startswith(_UTF8_BOM):
            chunk = chunk[len(_UTF8_BOM) :]
        at_start = False
        stripped = chunk.lstrip()
        if stripped:
            return stripped[:1]
    return b""


def _iter_json_file(path: Path, origin_name: str) -> Iterator[_Record]:
    with _open_text_bytes(path) as handle:
        # '[' first means one JSON array, anything else JSON lines.
        first = _first_significant_byte(handle)
        handle.seek(0)
        if first == b"[":
            yield from _iter_json_array(origin_name, handle)
        else:
            yield from _iter_json_lines(origin_name, handle)


def _iter_parquet_file(path: Path, origin_name: str, batch_size: int) -> Iterator[_Record]:
    import pyarrow as pa

    from llmft_assets.storage.tables import open_parquet

    try:
        parquet_file = open_parquet(path)
    except (pa.ArrowException, ValueError) as error:
        yield _bad(f"{origin_name}#0", f"unreadable_parquet: {error}")
        return
    if parquet_file.metadata.num_rows == 0:
        return
    row_index = 0
    try:
        for record_batch in parquet_file.iter_batches(batch_size=batch_size):
            for row in record_batch.to_pylist():
                origin = f"{origin_name}#{row_index}"
                row["origin"] = origin
                row_index += 1
                yield (origin, row, None)
    except (pa.ArrowException, OSError, ValueError) as error:
        yield _bad(
            f"{origin_name}#{row_index}",
            f"unreadable_parquet: reading stopped after {row_index} rows: {error}",
        )


def _iter_local_file(path: Path, origin_name: str, batch_size: int, counts: StageCounts) -> Iterator[_Record]:
    try:
        size = path.stat().st_size
        # Fail early and clearly on permissions rather than deep inside a parser.
        with path.open("rb"):
            pass
    except OSError as error:
        raise DataSourceError(f"cannot read {origin_name}: {error.strerror or error}") from error
    counts.extra["files"] += 1
    if size == 0:
        counts.extra["empty_files"] += 1
        counts.warn(f"empty file: {origin_name} holds no rows")
        return
    records_in_file = 0
    try:
        if path.name.lower().endswith(".parquet"):
            records = _iter_parquet_file(path, origin_name, batch_size)
        else:
            records = _iter_json_file(path, origin_name)
        for record in records:
            records_in_file += 1
            yield record
    except OSError as error:  # e.g. a truncated .gz
        records_in_file += 1
        yield _bad(f"{origin_name}#?", f"unreadable_file: {error}")
    if records_in_file == 0:
        counts.extra["empty_files"] += 1
        counts.warn(f"empty file: {origin_name} holds no rows")


# ------------------------------------------------------------------------------------------ resolution


def _sample_files(config: str | None) -> list[tuple[Path, str]]:
    files = []
    for name in _configs(config):
        path = SAMPLE_DIR / f"r1_distill_sft_{name}.parquet"
        if not path.is_file():
            raise DataSourceError(f"bundled sample {path} is missing; run scripts/make_sample.py")
        files.append((path, f"llmft_assets/sample_data/{path.name}"))
    return files


def _local_files(source: str, config: str | None) -> list[tuple[Path, str]] | None:
    """Files a local source names, or None when ``source`` is not a local path at all."""
    if _GLOB_CHARS & set(source):
        matches = sorted(
            Path(match)
            for match in globlib.glob(os.path.expanduser(source), recursive=True)
            if Path(match).is_file() and _is_supported(match)
        )
        if not matches:
            raise DataSourceError(f"no .jsonl/.json/.parquet file matches the pattern {source!r}")
        return [(path, str(path)) for path in matches]
    path = Path(source).expanduser()
    if path.is_dir():
        root = path / config if config in ("v0", "v1") and (path / config).is_dir() else path
        try:
            matches = sorted(
                candidate
                for candidate in root.rglob("*")
                if candidate.is_file() and _is_supported(candidate.name)
            )
        except OSError as error:
            raise DataSourceError(f"cannot list directory {root}: {error.strerror or error}") from error
        if not matches:
            raise DataSourceError(f"directory {root} holds no .jsonl/.json/.parquet files")
        return [(candidate, str(candidate)) for candidate in matches]
    if path.exists():
        if not _is_supported(path.name):
            raise DataSourceError(
                f"unsupported file type {path}: expected one of {', '.join(SUPPORTED_SUFFIXES)}"
            )
        return [(path, str(path))]
    looks_like_hub_id = (
        source.count("/") == 1 and not source.startswith((".", "/", "~")) and not _is_supported(source)
    )
    if looks_like_hub_id:
        return None
    raise DataSourceError(f"no such file or directory: {source}")


def list_source_files(source: str, config: str | None, s3_client: Any = None) -> list[tuple[str, str | None]]:
    """The files a source is made of, each as a source `iter_raw_batches` reads on its own: (source, config).

    The bundled sample is one file per R1 config; a local file, glob or folder one per data file; an
    s3:// prefix one per data object. A Hugging Face dataset id cannot be listed into files here
    (DataSourceError): download its parquet files into a folder or an S3 prefix first.
    """
    _check_arguments(config, None, 1)
    source = source.strip()
    if source == SAMPLE_SOURCE:
        return [(SAMPLE_SOURCE, name) for name in _configs(config)]
    if source.startswith("s3://"):
        return [(uri, None) for uri in _list_s3_objects(source, s3_client)]
    files = None if source.startswith("hf:") else _local_files(source, config)
    if files is None:
        raise DataSourceError(
            f"{source!r} is a Hugging Face dataset id: its files cannot be listed as shards here; "
            "download its parquet files into a folder or an s3:// prefix and register that"
        )
    return [(str(path), None) for path, _ in files]


def _iter_files(files: Iterable[tuple[Path, str]], batch_size: int, counts: StageCounts) -> Iterator[_Record]:
    for path, origin_name in files:
        yield from _iter_local_file(path, origin_name, batch_size, counts)


def _split_s3_uri(uri: str) -> tuple[str, str]:
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    if not bucket:
        raise DataSourceError(f"S3 uri {uri!r} names no bucket")
    return bucket, prefix


def _s3_client(s3_client: Any) -> Any:
    if s3_client is None:
        import boto3

        # The endpoint (MinIO, R2, a test server) comes from AWS_ENDPOINT_URL.
        s3_client = boto3.client("s3")
    return s3_client


def _list_s3_keys(uri: str, s3_client: Any) -> list[str]:
    """The data objects' keys under an s3:// prefix, sorted; DataSourceError when there are none."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = _split_s3_uri(uri)
    keys: list[str] = []
    try:
        paginator = _s3_client(s3_client).get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            keys.extend(item["Key"] for item in page.get("Contents", []) if _is_supported(item["Key"]))
    except (ClientError, BotoCoreError) as error:
        raise DataSourceError(f"cannot list {uri}: {error}") from error
    if not keys:
        raise DataSourceError(f"no .jsonl/.json/.parquet objects under {uri}")
    return sorted(keys)


def _list_s3_objects(uri: str, s3_client: Any) -> list[str]:
    bucket, _ = _split_s3_uri(uri)
    return [f"s3://{bucket}/{key}" for key in _list_s3_keys(uri, s3_client)]


def _iter_s3(uri: str, s3_client: Any, batch_size: int, counts: StageCounts) -> Iterator[_Record]:
    from botocore.exceptions import BotoCoreError, ClientError

    s3_client = _s3_client(s3_client)
    bucket, _ = _split_s3_uri(uri)
    keys = _list_s3_keys(uri, s3_client)
    with tempfile.TemporaryDirectory(prefix="llmft-raw-") as temp_dir:
        for key in sorted(keys):
            origin_name = f"s3://{bucket}/{key}"
            # Parquet needs random access; a temporary file keeps memory flat for any object size.
            local_path = Path(temp_dir) / ("object" + "".join(Path(key).suffixes[-2:]))
            try:
                with local_path.open("wb") as handle:
                    s3_client.download_fileobj(bucket, key, handle)
            except (ClientError, BotoCoreError) as error:
                raise DataSourceError(f"cannot download {origin_name}: {error}") from error
            try:
                yield from _iter_local_file(local_path, origin_name, batch_size, counts)
            finally:
                local_path.unlink(missing_ok=True)


def _iter_hugging_face(
    dataset_id: str, config: str | None, batch_size: int, counts: StageCounts
) -> Iterator[_Record]:
    import datasets

    for name in [None] if config is None else _configs(config):
        label = f"hf://{dataset_id}" + (f"/{name}" if name else "")
        try:
            dataset = datasets.load_dataset(dataset_id, name, split="train", streaming=True)
        except Exception as error:  # the hub raises many types (network, missing repo, bad config)
            raise DataSourceError(
                f"cannot load Hugging Face dataset {dataset_id!r} (config {name!r}): "
                f"{type(error).__name__}: {error}"
            ) from error
        counts.extra["files"] += 1
        row_index = 0
        try:
            for columns in dataset.iter(batch_size=batch_size):
                names = list(columns)
                for values in zip(*(columns[column] for column in names), strict=True):
                    row = dict(zip(names, values, strict=True))
                    origin = f"{label}#{row_index}"
                    row["origin"] = origin
                    row_index += 1
                    yield (origin, row, None)
        except Exception as error:
            raise DataSourceError(
                f"reading Hugging Face dataset {label} failed after {row_index} rows: "
                f"{type(error).__name__}: {error}"
            ) from error
        if row_index == 0:
            counts.extra["empty_files"] += 1
            counts.warn(f"empty dataset: {label} holds no rows")


def _iter_records(
    source: str, config: str | None, batch_size: int, s3_client: Any, counts: StageCounts
) -> Iterator[_Record]:
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"source must be a non-empty string, got {source!r}")
    source = source.strip()
    if source == SAMPLE_SOURCE:
        return _iter_files(_sample_files(config), batch_size, counts)
    if source.startswith("s3://"):
        return _iter_s3(source, s3_client, batch_size, counts)
    if source.startswith("hf:"):
        return _iter_hugging_face(source[len("hf:") :].removeprefix("//"), config, batch_size, counts)
    files = _local_files(source, config)
    if files is None:
        return _iter_hugging_face(source, config, batch_size, counts)
    return _iter_files(files, batch_size, counts)


def iter_raw_batches(
    source: str,
    *,
    config: str | None = None,
    max_rows: int | None = None,
    batch_size: int = 2048,
    s3_client: Any = None,
    counts: StageCounts | None = None,
    columns: Mapping[str, str] | None = None,
) -> Iterator[RawBatch]:
    """Stream ``source`` as RawBatches of at most ``batch_size`` records (parsed + quarantined).

    ``max_rows`` caps the records read (parsed or not). ``counts`` (stage ``raw``) is updated as rows
    are read: ``rows_in`` records, ``rows_out`` parsed, ``quarantined`` unparseable; warnings name empty
    files. ``columns`` renames the user's columns onto a known format's (`formats.apply_column_mapping`);
    a row without a mapped column is quarantined. Raises ValueError for bad arguments and
    DataSourceError for a source that cannot be read.
    """
    _check_arguments(config, max_rows, batch_size)
    check_column_mapping(columns)
    counts = counts if counts is not None else StageCounts(stage=STAGE)
    # Resolve eagerly so that a missing path fails at the call, not at the first next().
    records = _iter_records(source, config, batch_size, s3_client, counts)
    if columns:
        records = _map_columns(records, columns)
    return _batched(records, max_rows=max_rows, batch_size=batch_size, counts=counts)


def _map_columns(records: Iterator[_Record], columns: Mapping[str, str]) -> Iterator[_Record]:
    for origin, row, bad in records:
        if row is None:
            yield (origin, row, bad)
            continue
        try:
            yield (origin, apply_column_mapping(row, columns), None)
        except RowRejected as rejection:
            yield _bad(origin, str(rejection), row)


def _too_deep(row: Any) -> bool:
    """Whether some value sits deeper than MAX_NESTING_DEPTH levels (the row itself is level 1).

    Iterative (no recursion), and only containers are visited: a container at the last level allowed
    may hold nothing, since its items would be one level deeper."""
    stack: list[tuple[Any, int]] = [(row, 1)]
    while stack:
        value, depth = stack.pop()
        items = value.values() if isinstance(value, dict) else value
        if depth >= MAX_NESTING_DEPTH and items:
            return True
        stack.extend((item, depth + 1) for item in items if isinstance(item, dict | list | tuple))
    return False


def encode_row(row: dict[str, Any]) -> tuple[str | None, str | None]:
    """(the row's JSON payload, None), or (None, why the row cannot travel down the pipeline as a JSON
    payload in Parquet).

    Checked: nesting depth, then the one JSON encoding of the whole row (which is the payload), which
    also catches text that is not valid Unicode (lone surrogates from ``\\ud800`` escapes) and values
    JSON cannot hold.
    """
    if isinstance(row, dict | list | tuple) and _too_deep(row):
        return None, f"too_deep: nested more than {MAX_NESTING_DEPTH} levels"
    try:
        payload = json.dumps(row, ensure_ascii=False, default=str)
        payload.encode("utf-8")
    except UnicodeEncodeError as error:
        return None, f"invalid_unicode: {error.reason} at character {error.start} of the row"
    except (ValueError, TypeError, RecursionError) as error:
        return None, f"unencodable_value: {type(error).__name__}: {error}"
    return payload, None


def row_problem(row: dict[str, Any]) -> str | None:
    """Why a parsed row cannot travel down the pipeline as a JSON payload in Parquet; None when it can."""
    return encode_row(row)[1]


def _batched(
    records: Iterator[_Record], *, max_rows: int | None, batch_size: int, counts: StageCounts
) -> Iterator[RawBatch]:
    batch = RawBatch()
    for records_read, (origin, row, bad) in enumerate(records, start=1):
        counts.rows_in += 1
        payload, problem = encode_row(row) if row is not None else (None, None)
        if problem is not None:
            row, bad = None, quarantine_row(origin=origin, stage=STAGE, reason=problem, row=row)
        if row is not None and payload is not None:
            counts.rows_out += 1
            batch.rows.append(row)
            batch.payloads.append(payload)
        elif bad is not None:
            counts.record_quarantine(bad["reason"])
            batch.quarantine.append(bad)
        if len(batch) >= batch_size:
            yield batch
            batch = RawBatch()
        if max_rows is not None and records_read >= max_rows:
            break
    if len(batch):
        yield batch
