"""The R1-Distill-SFT-shaped sample: schema, determinism, correct answers, length spread, hub layout."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from llmft_assets.data.sample_gen import (
    SAMPLE_ROWS,
    V0_COLUMNS,
    V1_COLUMNS,
    arithmetic_schema_of,
    bundled_sample_path,
    generate_rows,
    plain_texts,
    write_hub_layout,
)

_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_TIMES, _DIVIDED_BY = "\u00d7", "\u00f7"
_EQUATION = re.compile(rf"(\d+) ([+\-{_TIMES}{_DIVIDED_BY}]) (\d+) = (\d+)")


def _recompute(problem: str) -> int:
    """Independent answers from the numbers in the problem text, one rule per template."""
    rules: list[tuple[str, Any]] = [
        (r"has (\d+) \w+\. \w+ buys (\d+) more \w+ and then receives (\d+)", lambda a, b, c: a + b + c),
        (r"holds (\d+) \w+\. How many \w+ are there in (\d+) such", lambda a, b: a * b),
        (r"speed of (\d+) kilometers per hour for (\d+) hours", lambda v, t: v * t),
        (
            r"is (\d+) years old\. \w+ is (\d+) times as old as \w+\. How old will \w+ be in (\d+) years",
            lambda a, k, y: a * k + y,
        ),
        (
            r"buys (\d+) \w+ that cost \$(\d+) each and pays with a \$(\d+) bill",
            lambda q, p, bill: bill - q * p,
        ),
        (r"length of (\d+) cm and a width of (\d+) cm", lambda length, width: length * width),
        (r"base of (\d+) m and a height of (\d+) m", lambda base, height: base * height / 2),
        (r"^(\d+) workers share (\d+) dollars equally", lambda n, total: total / n),
        (r"costs \$(\d+)\. It is on sale for (\d+)% off", lambda price, pct: price - price * pct / 100),
        (r"from (\d+) to (\d+), inclusive", lambda a, b: sum(range(a, b + 1))),
    ]
    for pattern, rule in rules:
        match = re.search(pattern, problem)
        if match:
            value = rule(*(int(group) for group in match.groups()))
            assert value == int(value), f"non-integer answer {value} for {problem!r}"
            return int(value)
    raise AssertionError(f"no template recognises {problem!r}")


def _last_boxed(text: str) -> int:
    found = _BOXED.findall(text)
    assert found, f"no \\boxed{{}} in {text[-200:]!r}"
    return int(found[-1])


def _user_and_assistant(row: dict[str, Any]) -> tuple[str, str]:
    if "problem" in row:
        return row["problem"], row["reannotated_assistant_content"]
    return row["reannotated_messages"][0]["content"], row["reannotated_assistant_content"]


@pytest.mark.parametrize(("schema", "columns"), [("v0", V0_COLUMNS), ("v1", V1_COLUMNS)])
def test_rows_have_exactly_the_dataset_columns(schema: str, columns: tuple[str, ...]) -> None:
    rows = generate_rows(50, schema=schema, seed=1)
    assert len(rows) == 50
    for row in rows:
        assert tuple(row) == columns
        assert row["verified"] is None
        assert row["quality_metrics"] is None
    assert len({row["id"] for row in rows}) == 50


def test_generation_is_deterministic_and_seeded() -> None:
    assert generate_rows(40, schema="v0", seed=3) == generate_rows(40, schema="v0", seed=3)
    first = {row["reannotated_assistant_content"] for row in generate_rows(40, schema="v0", seed=3)}
    other_seed = {row["reannotated_assistant_content"] for row in generate_rows(40, schema="v0", seed=4)}
    other_schema = {row["reannotated_assistant_content"] for row in generate_rows(40, schema="v1", seed=3)}
    assert not first & other_seed
    assert not first & other_schema


def test_bad_arguments_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown schema"):
        generate_rows(1, schema="v2", seed=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n must be"):
        generate_rows(-1, schema="v0", seed=0)


@pytest.mark.parametrize("schema", ["v0", "v1"])
def test_answers_and_every_step_are_arithmetically_correct(schema: str) -> None:
    for row in generate_rows(300, schema=schema, seed=5):
        problem, content = _user_and_assistant(row)
        expected = _recompute(problem)
        assert _last_boxed(content) == expected
        short_solution = row["solution"] if schema == "v0" else row["messages"][1]["content"]
        assert _last_boxed(short_solution) == expected
        for left, symbol, right, result in _EQUATION.findall(content):
            a, b, c = int(left), int(right), int(result)
            assert {"+": a + b, "-": a - b, _TIMES: a * b, _DIVIDED_BY: a / b}[symbol] == c, (
                left,
                symbol,
                right,
                result,
            )


@pytest.mark.parametrize("schema", ["v0", "v1"])
def test_assistant_text_is_r1_shaped(schema: str) -> None:
    for row in generate_rows(100, schema=schema, seed=6):
        content = row["reannotated_assistant_content"]
        assert content.startswith("<think>\n")
        think, sep, answer = content.partition("\n</think>\n\n")
        assert sep and think and "\\boxed{" in answer and "<think>" not in answer


def test_v1_messages_are_user_then_assistant() -> None:
    for row in generate_rows(60, schema="v1", seed=8):
        for key in ("messages", "reannotated_messages"):
            assert [message["role"] for message in row[key]] == ["user", "assistant"]
            assert set(row[key][0]) == {"role", "content"}
        assert row["reannotated_messages"][1]["content"] == row["reannotated_assistant_content"]
        assert row["messages"][0] == row["reannotated_messages"][0]
        # The original (pre-R1) answer has no reasoning trace.
        assert "<think>" not in row["messages"][1]["content"]
        assert row["source_dataset"].count("/") == 1


def test_plain_texts_carry_no_chat_markup() -> None:
    rows = generate_rows(10, schema="v1", seed=9)
    texts = plain_texts(rows)
    assert len(texts) == 10
    for text, row in zip(texts, rows, strict=True):
        assert text.startswith(row["reannotated_messages"][0]["content"])
        assert "<|im_start|>" not in text


_ADDITION = re.compile(r"^(?:What is|Compute|Add|Find the sum of) (\d+)(?: \+ | and )(\d+)[?.]$")
_ARITHMETIC_LINE = re.compile(r"^(Ones|Tens): (\d) \+ (\d)(?: \+ (1))? = (\d+)")


def _check_arithmetic_row(problem: str, content: str) -> tuple[int, int]:
    """The row is an addition whose every trace line and boxed answer are right; returns its addends."""
    match = _ADDITION.match(problem)
    assert match, problem
    a, b = int(match.group(1)), int(match.group(2))
    assert 10 <= a <= 99 and 10 <= b <= 99
    assert _last_boxed(content) == a + b
    think, sep, answer = content.partition("\n</think>\n\n")
    assert sep and think.startswith("<think>\n") and "<think>" not in answer
    lines = [_ARITHMETIC_LINE.match(line) for line in think.splitlines()]
    ones, tens = (next(m for m in lines if m and m.group(1) == column) for column in ("Ones", "Tens"))
    assert (int(ones.group(2)), int(ones.group(3))) == (a % 10, b % 10)
    assert ones.group(4) is None and int(ones.group(5)) == a % 10 + b % 10
    carry = int(a % 10 + b % 10 >= 10)
    assert (int(tens.group(2)), int(tens.group(3))) == (a // 10, b // 10)
    assert bool(tens.group(4)) == bool(carry)  # "+ 1" exactly when the ones carried
    assert int(tens.group(5)) == a // 10 + b // 10 + carry
    assert f"So {a} + {b} = {a + b}." in think
    return a, b


@pytest.mark.parametrize("schema", ["v0", "v1"])
def test_arithmetic_family_is_correct_short_and_never_repeats_a_problem(schema: str) -> None:
    rows = generate_rows(1200, schema=schema, seed=12, family="arithmetic")
    assert rows == generate_rows(1200, schema=schema, seed=12, family="arithmetic")
    pairs = set()
    for row in rows:
        problem, content = _user_and_assistant(row)
        a, b = _check_arithmetic_row(problem, content)
        assert len(content) < 300  # short traces: the tiny model learns them in minutes
        assert arithmetic_schema_of(a, b) == schema  # v0 and v1 hold disjoint halves of the problems
        pairs.add((min(a, b), max(a, b)))
        short_solution = row["solution"] if schema == "v0" else row["messages"][1]["content"]
        assert _last_boxed(short_solution) == a + b
    assert len(pairs) == len(rows)
    # Both shapes of the trace occur: with and without a carry into the tens.
    assert {"carry 1" in row["reannotated_assistant_content"] for row in rows} == {True, False}
    with pytest.raises(ValueError, match="distinct problems per schema"):
        generate_rows(2000, schema=schema, seed=12, family="arithmetic")
    with pytest.raises(ValueError, match="unknown family"):
        generate_rows(1, schema=schema, seed=12, family="geometry")  # type: ignore[arg-type]


@pytest.mark.parametrize(("schema", "columns"), [("v0", V0_COLUMNS), ("v1", V1_COLUMNS)])
def test_bundled_sample_files(schema: str, columns: tuple[str, ...]) -> None:
    table = pq.read_table(bundled_sample_path(schema))
    assert table.num_rows == SAMPLE_ROWS
    assert tuple(table.column_names) == columns
    assert table.column("id").to_pylist() == list(dict.fromkeys(table.column("id").to_pylist()))
    # The easy arithmetic family: every answer right, short traces.
    for row in table.to_pylist():
        _check_arithmetic_row(*_user_and_assistant(row))


def test_bundled_files_never_share_a_problem() -> None:
    pairs = []
    for schema in ("v0", "v1"):
        for row in pq.read_table(bundled_sample_path(schema)).to_pylist():
            a, b = _check_arithmetic_row(*_user_and_assistant(row))
            pairs.append((min(a, b), max(a, b)))
    assert len(set(pairs)) == len(pairs) == 2 * SAMPLE_ROWS


def test_bundled_files_are_small_and_distinct() -> None:
    paths = [bundled_sample_path("v0"), bundled_sample_path("v1")]
    assert sum(path.stat().st_size for path in paths) < 3 * 1024 * 1024
    v0 = set(pq.read_table(paths[0]).column("reannotated_assistant_content").to_pylist())
    v1 = set(pq.read_table(paths[1]).column("reannotated_assistant_content").to_pylist())
    assert not v0 & v1


def test_make_sample_reproduces_the_bundled_bytes(tmp_path: Path) -> None:
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "scripts" / "make_sample.py"
    spec = importlib.util.spec_from_file_location("make_sample", script)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    written = module.make_sample(tmp_path)
    for schema in ("v0", "v1"):
        name = f"r1_distill_sft_{schema}.parquet"
        assert written[name]["rows"] == SAMPLE_ROWS
        assert (tmp_path / name).read_bytes() == bundled_sample_path(schema).read_bytes(), (
            f"{name} is stale: run scripts/make_sample.py"
        )


def test_hub_layout_streams_with_datasets(tmp_path: Path) -> None:
    import datasets

    rows_v0 = generate_rows(30, schema="v0", seed=10)
    rows_v1 = generate_rows(21, schema="v1", seed=10)
    root = write_hub_layout(tmp_path / "R1-Distill-SFT", rows_v0, rows_v1, shards=3)
    assert sorted(path.name for path in (root / "v1").iterdir()) == [
        "train-00000-of-00003.parquet",
        "train-00001-of-00003.parquet",
        "train-00002-of-00003.parquet",
    ]
    streamed_v0 = list(datasets.load_dataset(str(root), "v0", split="train", streaming=True))
    assert [row["id"] for row in streamed_v0] == [row["id"] for row in rows_v0]
    assert set(streamed_v0[0]) == set(V0_COLUMNS)
    streamed_v1 = list(datasets.load_dataset(str(root), "v1", split="train", streaming=True))
    assert len(streamed_v1) == 21
    assert streamed_v1[4]["reannotated_messages"] == rows_v1[4]["reannotated_messages"]
    assert streamed_v1[4]["verified"] is None
