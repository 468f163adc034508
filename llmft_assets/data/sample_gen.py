"""Deterministic stand-in for ServiceNow-AI/R1-Distill-SFT, in the dataset's own schema.

The hub is unreachable on the project's machines, so the pipeline is exercised on rows made here:
arithmetic word problems whose assistant text looks like DeepSeek-R1 output (a ``<think>`` block with
step-by-step reasoning and self-checks, then a short answer with ``\\boxed{}``). Every number in the
reasoning is computed, so the boxed answer is always correct. Reasoning length varies from a few hundred
to several thousand characters, like R1's, because packing and truncation behave differently on that spread.

Pure module: no Dagster, no heavy imports.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

SchemaVersion = Literal["v0", "v1"]

V0_COLUMNS: tuple[str, ...] = (
    "id",
    "reannotated_assistant_content",
    "problem",
    "source",
    "solution",
    "verified",
    "quality_metrics",
)
V1_COLUMNS: tuple[str, ...] = (
    "id",
    "reannotated_assistant_content",
    "source",
    "reannotated_messages",
    "messages",
    "source_dataset",
    "verified",
    "quality_metrics",
)
SCHEMA_COLUMNS: dict[str, tuple[str, ...]] = {"v0": V0_COLUMNS, "v1": V1_COLUMNS}

# The seed of the bundled sample files (scripts/make_sample.py). Anything that must NOT see the bundled
# rows (the tiny model's pretraining text) uses a different seed.
SAMPLE_SEED_V0 = 20250101
SAMPLE_SEED_V1 = 20250202
SAMPLE_ROWS = 1200
SAMPLE_DATA_DIR = Path(__file__).resolve().parent.parent / "sample_data"
HUB_DATASET_ID = "ServiceNow-AI/R1-Distill-SFT"
DATASET_LICENSE = "cc-by-nc-sa-4.0"

# NuminaMath-style source names (v0 was re-annotated from NuminaMath-CoT).
_V0_SOURCES = ("orca_math", "gsm8k", "synthetic_math", "cn_k12", "math")
_V1_SOURCES = ("numina_math", "gsm8k", "openmath_2", "tulu_3_personas_math")
_V1_SOURCE_DATASETS = (
    "ai2-adapt-dev/openmath-2-math",
    "ai2-adapt-dev/numinamath-tir",
    "allenai/tulu-3-sft-personas-math-grade",
)

_NAMES = (
    "Ava",
    "Ben",
    "Chloe",
    "Diego",
    "Emma",
    "Farid",
    "Grace",
    "Hiro",
    "Isla",
    "Jamal",
    "Kira",
    "Liam",
    "Maya",
    "Noah",
    "Olga",
    "Priya",
    "Quinn",
    "Rosa",
    "Sami",
    "Tara",
)
_ITEMS = (
    "apples",
    "marbles",
    "stickers",
    "pencils",
    "cookies",
    "stamps",
    "books",
    "coins",
    "shells",
    "cards",
)
_CONTAINERS = {
    "box": "boxes",
    "crate": "crates",
    "bag": "bags",
    "jar": "jars",
    "basket": "baskets",
    "carton": "cartons",
}
_VEHICLES = ("train", "car", "cyclist", "bus", "boat", "truck")
_GOODS = ("notebooks", "pens", "mugs", "scarves", "tickets", "lamps", "plants", "puzzles")


# --------------------------------------------------------------------------------------------------
# Arithmetic steps and their explanations (every explanation is computed, never templated numbers)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    """One arithmetic step of a solution: ``left <kind> right = result`` and what it means."""

    kind: Literal["add", "sub", "mul", "div"]
    left: int
    right: int
    result: int
    meaning: str


def _op(kind: Literal["add", "sub", "mul", "div"], left: int, right: int, meaning: str) -> Op:
    if kind == "add":
        result = left + right
    elif kind == "sub":
        result = left - right
    elif kind == "mul":
        result = left * right
    else:
        if right == 0 or left % right:
            raise ValueError(f"{left} / {right} is not an exact division")
        result = left // right
    return Op(kind, left, right, result, meaning)


_SYMBOL = {"add": "+", "sub": "-", "mul": "\\times", "div": "\\div"}
# Unicode signs, as R1 writes them in prose (escaped here so linters don't mistake them for "x").
_TIMES, _DIVIDED_BY = "\u00d7", "\u00f7"
_PLAIN_SYMBOL = {"add": "+", "sub": "-", "mul": _TIMES, "div": _DIVIDED_BY}


def _equation(op: Op) -> str:
    return f"{op.left} {_PLAIN_SYMBOL[op.kind]} {op.right} = {op.result}"


def _latex(op: Op) -> str:
    return f"{op.left} {_SYMBOL[op.kind]} {op.right} = {op.result}"


def _explain_detailed(op: Op) -> str:
    """A slower, place-value explanation of one step, as R1 writes when it double-checks."""
    a, b = op.left, op.right
    if op.kind == "add":
        tens, ones = b - b % 10, b % 10
        if tens and ones:
            return (
                f"Breaking {b} into {tens} and {ones}: {a} + {tens} = {a + tens}, "
                f"then {a + tens} + {ones} = {a + b}. So {_equation(op)}."
            )
        return f"Counting on from {a} by {b} gives {a + b}. So {_equation(op)}."
    if op.kind == "sub":
        tens, ones = b - b % 10, b % 10
        if tens and ones:
            return (
                f"Taking away {tens} first: {a} - {tens} = {a - tens}, "
                f"then {a - tens} - {ones} = {a - b}. So {_equation(op)}."
            )
        return f"Counting back {b} from {a} lands on {a - b}. So {_equation(op)}."
    if op.kind == "mul":
        tens, ones = b - b % 10, b % 10
        if tens and ones:
            return (
                f"Splitting {b} as {tens} + {ones}: {a} {_TIMES} {tens} = {a * tens} and {a} {_TIMES} {ones} = {a * ones}, "
                f"and {a * tens} + {a * ones} = {a * b}. So {_equation(op)}."
            )
        return f"{a} added to itself {b} times is {a * b}. So {_equation(op)}."
    q = op.result
    return f"How many {b}s fit into {a}? {b} {_TIMES} {q} = {b * q}, exactly {a}. So {_equation(op)}."


def _inverse_check(op: Op) -> str:
    if op.kind == "add":
        return f"Check: {op.result} - {op.right} = {op.left}. Yes, that matches."
    if op.kind == "sub":
        return f"Check: {op.result} + {op.right} = {op.left}. Good."
    if op.kind == "mul":
        if op.right:
            return f"Check: {op.result} {_DIVIDED_BY} {op.right} = {op.left}. That works."
        return f"Check: anything times 0 is 0, so {op.result} is right."
    return f"Check: {op.result} {_TIMES} {op.right} = {op.left}. Correct."


def _running_totals(terms: Sequence[int], intro: str, unit: str = "after term") -> tuple[str, ...]:
    """A brute-force re-derivation, one running total per line (R1's long enumerations)."""
    lines = [f"Let me also check by {intro}."]
    total = 0
    for index, term in enumerate(terms, start=1):
        lines.append(f"{total} + {term} = {total + term} ({unit} {index})")
        total += term
    lines.append(f"That gives {total} again.")
    return tuple(lines)


# --------------------------------------------------------------------------------------------------
# Problem templates
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """A word problem with its solution steps; ``answer`` is the last step's result."""

    kind: str
    text: str
    ops: tuple[Op, ...]
    unit: str
    goal: str  # what is asked, for restating it in the reasoning
    notes: tuple[str, ...] = field(default_factory=tuple)  # template-specific remarks R1 would make
    long_check: tuple[str, ...] = field(default_factory=tuple)  # a slow brute-force re-derivation

    @property
    def answer(self) -> int:
        return self.ops[-1].result


def _sum_problem(rng: random.Random) -> Problem:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b, c = rng.randint(3, 90), rng.randint(2, 60), rng.randint(1, 40)
    text = (
        f"{name} has {a} {item}. {name} buys {b} more {item} and then receives {c} {item} from a friend. "
        f"How many {item} does {name} have now?"
    )
    first = _op("add", a, b, f"{item} after buying")
    second = _op("add", first.result, c, f"{item} after the gift")
    return Problem("sum", text, (first, second), item, f"the total number of {item} {name} ends up with")


def _product_problem(rng: random.Random) -> Problem:
    item, container = rng.choice(_ITEMS), rng.choice(sorted(_CONTAINERS))
    containers = _CONTAINERS[container]
    a, b = rng.randint(3, 48), rng.randint(2, 36)
    text = f"A {container} holds {a} {item}. How many {item} are there in {b} such {containers}?"
    ops = (_op("mul", a, b, f"{item} in {b} {containers}"),)
    return Problem(
        "product",
        text,
        ops,
        item,
        f"how many {item} fit in {b} {containers}",
        long_check=_running_totals([a] * b, f"adding {a} {item} for each of the {b} {containers}"),
    )


def _rate_problem(rng: random.Random) -> Problem:
    vehicle = rng.choice(_VEHICLES)
    speed, hours = rng.randint(12, 120), rng.randint(2, 9)
    text = (
        f"A {vehicle} travels at a constant speed of {speed} kilometers per hour for {hours} hours. "
        "How many kilometers does it travel?"
    )
    ops = (_op("mul", speed, hours, "distance in kilometers"),)
    notes = ("Distance equals speed multiplied by time, and the units work out: km/h times h gives km.",)
    hourly = _running_totals([speed] * hours, "tracking the distance hour by hour", unit="km after hour")
    return Problem("rate", text, ops, "kilometers", "the distance covered", notes, hourly)


def _age_problem(rng: random.Random) -> Problem:
    first, second = rng.sample(_NAMES, 2)
    age, factor, years = rng.randint(3, 15), rng.randint(2, 5), rng.randint(1, 20)
    text = (
        f"{first} is {age} years old. {second} is {factor} times as old as {first}. "
        f"How old will {second} be in {years} years?"
    )
    now = _op("mul", age, factor, f"{second}'s age now")
    later = _op("add", now.result, years, f"{second}'s age in {years} years")
    notes = (f"The question is about {second}'s future age, not {first}'s, so I add the years to {second}.",)
    return Problem("ages", text, (now, later), "years", f"{second}'s age {years} years from now", notes)


def _shopping_problem(rng: random.Random) -> Problem:
    name, goods = rng.choice(_NAMES), rng.choice(_GOODS)
    quantity, price = rng.randint(2, 9), rng.randint(2, 19)
    cost = quantity * price
    bill = next(note for note in (10, 20, 50, 100, 200) if note > cost)
    text = (
        f"{name} buys {quantity} {goods} that cost ${price} each and pays with a ${bill} bill. "
        f"How much change, in dollars, does {name} receive?"
    )
    total = _op("mul", quantity, price, "total cost in dollars")
    change = _op("sub", bill, total.result, "change in dollars")
    return Problem("shopping", text, (total, change), "dollars", f"the change {name} gets back")


def _rectangle_problem(rng: random.Random) -> Problem:
    length, width = rng.randint(3, 60), rng.randint(2, 40)
    text = (
        f"A rectangle has a length of {length} cm and a width of {width} cm. "
        "What is its area in square centimeters?"
    )
    ops = (_op("mul", length, width, "area in square centimeters"),)
    notes = ("The area of a rectangle is length times width.",)
    return Problem("rectangle", text, ops, "square centimeters", "the rectangle's area", notes)


def _triangle_problem(rng: random.Random) -> Problem:
    base, height = 2 * rng.randint(2, 30), rng.randint(3, 40)
    text = f"A triangle has a base of {base} m and a height of {height} m. What is its area in square meters?"
    product = _op("mul", base, height, "base times height")
    area = _op("div", product.result, 2, "area in square meters")
    notes = ("The area of a triangle is one half of base times height.",)
    return Problem("triangle", text, (product, area), "square meters", "the triangle's area", notes)


def _share_problem(rng: random.Random) -> Problem:
    workers, each = rng.randint(2, 12), rng.randint(15, 250)
    total = workers * each
    text = f"{workers} workers share {total} dollars equally. How many dollars does each worker get?"
    ops = (_op("div", total, workers, "dollars per worker"),)
    return Problem("share", text, ops, "dollars", "each worker's share")


def _discount_problem(rng: random.Random) -> Problem:
    goods = rng.choice(_GOODS)
    price, percent = 20 * rng.randint(1, 25), 5 * rng.randint(1, 15)
    text = f"A set of {goods} costs ${price}. It is on sale for {percent}% off. What is the sale price in dollars?"
    scaled = _op("mul", price, percent, "price times percent")
    discount = _op("div", scaled.result, 100, "discount in dollars")
    sale = _op("sub", price, discount.result, "sale price in dollars")
    notes = (
        f"{percent}% off means I pay {100 - percent}% of the price, so subtracting the discount is right.",
    )
    return Problem(
        "discount", text, (scaled, discount, sale), "dollars", "the price after the discount", notes
    )


def _series_problem(rng: random.Random) -> Problem:
    start = rng.randint(1, 30)
    end = start + rng.randint(4, 40)
    count = end - start + 1
    text = f"What is the sum of all integers from {start} to {end}, inclusive?"
    terms = _op("add", end - start, 1, "number of terms")
    pair = _op("add", start, end, "first plus last term")
    doubled = _op("mul", pair.result, count, "twice the sum")
    total = _op("div", doubled.result, 2, "the sum")
    notes = (
        "Pairing the first and last terms, the second and second-to-last, and so on, every pair has the "
        f"same sum, so the total is (number of terms) {_TIMES} (first + last) {_DIVIDED_BY} 2.",
    )
    return Problem(
        "series",
        text,
        (terms, pair, doubled, total),
        "",
        f"the sum from {start} to {end}",
        notes,
        long_check=_running_totals(list(range(start, end + 1)), "adding the terms one at a time"),
    )


ProblemTemplate = Callable[[random.Random], Problem]
PROBLEM_TEMPLATES: dict[str, ProblemTemplate] = {
    "sum": _sum_problem,
    "product": _product_problem,
    "rate": _rate_problem,
    "ages": _age_problem,
    "shopping": _shopping_problem,
    "rectangle": _rectangle_problem,
    "triangle": _triangle_problem,
    "share": _share_problem,
    "discount": _discount_problem,
    "series": _series_problem,
}


# --------------------------------------------------------------------------------------------------
# R1-style texts
# --------------------------------------------------------------------------------------------------

_OPENERS = (
    "Okay, so I need to figure out {goal}. Let me read the problem again carefully.",
    "Alright, let's see. The problem asks for {goal}.",
    "Let me try to work through this step by step. I'm looking for {goal}.",
    "Hmm, this looks like a straightforward word problem, but I want to be careful. I need {goal}.",
    "First, I should understand what is being asked: {goal}.",
)
_REFLECTIONS = (
    "Wait, let me make sure I didn't misread any of the numbers.",
    "Hmm, is there any trick here? I don't think so, but let me double-check.",
    "Let me verify this a different way to be sure.",
    "Actually, let me redo the arithmetic slowly, since small slips are easy to make.",
    "Just to be thorough, I'll go over each step once more.",
    "Hold on, let me reconsider whether I used the right operation.",
)
_CONCLUSIONS = (
    "So the answer should be {answer}.",
    "Therefore, the final answer is {answer}.",
    "I'm confident the answer is {answer}.",
    "That settles it: {answer}.",
)


def _with_unit(problem: Problem) -> str:
    return f"{problem.answer} {problem.unit}".strip()


def _render_think(problem: Problem, rng: random.Random, passes: int) -> str:
    lines = [rng.choice(_OPENERS).format(goal=problem.goal), "", problem.text, ""]
    lines.extend(problem.notes)
    for op in problem.ops:
        lines.append(f"Step: {op.meaning}. {_equation(op)}.")
    lines.append(_CONCLUSIONS[0].format(answer=_with_unit(problem)))
    # Self-checks make the length spread: each pass re-derives every step a different way.
    for index in range(passes):
        lines.append("")
        lines.append(rng.choice(_REFLECTIONS))
        if index % 3 == 1:
            lines.append(f"The problem says: {problem.text}")
        if index == 5 and problem.long_check:
            lines.extend(problem.long_check)
        else:
            for op in problem.ops:
                lines.append(_explain_detailed(op) if index % 2 == 0 else _inverse_check(op))
        lines.append(f"Yes, {problem.ops[-1].meaning} is {problem.answer}.")
    lines.append("")
    lines.append(rng.choice(_CONCLUSIONS).format(answer=_with_unit(problem)))
    return "\n".join(lines)


def _render_final(problem: Problem, rng: random.Random) -> str:
    steps = "\n".join(
        f"{number}. {op.meaning.capitalize()}: \\( {_latex(op)} \\)"
        for number, op in enumerate(problem.ops, start=1)
    )
    unit = f" {problem.unit}" if problem.unit else ""
    if rng.random() < 0.5:
        closing = f"The answer is \\(\\boxed{{{problem.answer}}}\\){unit}."
    else:
        closing = f"**Final Answer**\n\\[\n\\boxed{{{problem.answer}}}\n\\]"
    return f"To find {problem.goal}:\n\n{steps}\n\n{closing}"


def render_assistant_content(problem: Problem, rng: random.Random, passes: int) -> str:
    """R1-shaped assistant text: ``<think>`` reasoning, then a short answer with ``\\boxed{}``."""
    return f"<think>\n{_render_think(problem, rng, passes)}\n</think>\n\n{_render_final(problem, rng)}"


def render_short_solution(problem: Problem) -> str:
    """A source-dataset-style worked solution (no reasoning trace) ending in ``\\boxed{}``."""
    steps = " ".join(f"{op.meaning.capitalize()}: ${_latex(op)}$." for op in problem.ops)
    return f"{steps} The answer is $\\boxed{{{problem.answer}}}$."


def _reasoning_passes(rng: random.Random) -> int:
    """Self-check passes: mostly short traces, a long tail of very long ones (R1's length spread)."""
    roll = rng.random()
    if roll < 0.2:
        return 0
    if roll < 0.6:
        return rng.randint(1, 4)
    if roll < 0.88:
        return rng.randint(5, 12)
    return rng.randint(14, 40)


def _row_id(schema: str, seed: int, index: int, family: str = "word") -> str:
    key = f"{schema}:{seed}:{index}" if family == "word" else f"{family}:{schema}:{seed}:{index}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return f"{schema}_{digest}"


def generate_problem(rng: random.Random) -> Problem:
    kind = rng.choice(sorted(PROBLEM_TEMPLATES))
    return PROBLEM_TEMPLATES[kind](rng)


# --------------------------------------------------------------------------------------------------
# The easy arithmetic family (the bundled sample): short, verifiable, learnable by the tiny model
# --------------------------------------------------------------------------------------------------

ARITHMETIC_ADDENDS = (10, 99)  # two-digit addends: each step is a one-digit fact plus a carry
_ARITHMETIC_QUESTIONS = (
    "What is {a} + {b}?",
    "Compute {a} + {b}.",
    "Add {a} and {b}.",
    "Find the sum of {a} and {b}.",
)
_ARITHMETIC_OPENERS = (
    "I need {a} + {b}. I add column by column.",
    "Let me add {a} and {b} one column at a time.",
    "Adding {a} + {b}, ones first, then tens.",
)


def arithmetic_schema_of(a: int, b: int) -> SchemaVersion:
    """Which schema's rows may hold the problem a + b: the pair space is split in two by a hash, so the
    v0 and v1 files never share a problem (whatever their seeds)."""
    low, high = sorted((a, b))
    return "v0" if hashlib.sha256(f"{low}+{high}".encode()).digest()[0] % 2 == 0 else "v1"


def arithmetic_problem(
    rng: random.Random, schema: SchemaVersion, used: set[tuple[int, int]]
) -> tuple[int, int]:
    """Two two-digit addends not in ``used`` (as an unordered pair), from ``schema``'s half of the pairs.

    No problem repeats within a file or across the two files, so rows split by id are also disjoint by
    problem: a test row is never a training row in other words.
    """
    low, high = ARITHMETIC_ADDENDS
    capacity = (high - low + 1) * (high - low + 2) // 2 // 2  # about half the unordered pairs
    if len(used) >= capacity * 9 // 10:
        raise ValueError(f"the arithmetic family has about {capacity} distinct problems per schema")
    while True:
        a, b = rng.randint(low, high), rng.randint(low, high)
        key = (min(a, b), max(a, b))
        if key not in used and arithmetic_schema_of(a, b) == schema:
            used.add(key)
            return a, b


def column_addition_lines(a: int, b: int) -> list[str]:
    """The column-by-column working of a + b, one one-digit fact a line (the core of the sample's trace)."""
    ones = a % 10 + b % 10
    carry = ones // 10
    tens = a // 10 + b // 10 + carry
    if carry:
        lines = [
            f"Ones: {a % 10} + {b % 10} = {ones}, write {ones % 10} and carry 1.",
            f"Tens: {a // 10} + {b // 10} + 1 = {tens}.",
        ]
    else:
        lines = [f"Ones: {a % 10} + {b % 10} = {ones}.", f"Tens: {a // 10} + {b // 10} = {tens}."]
    return [*lines, f"So {a} + {b} = {a + b}."]


def render_arithmetic_think(a: int, b: int, rng: random.Random) -> str:
    """A short column-addition trace: every line is a one-digit fact, so a small model can learn it."""
    return "\n".join([rng.choice(_ARITHMETIC_OPENERS).format(a=a, b=b), *column_addition_lines(a, b)])


def worked_addition(a: int, b: int, rng: random.Random, gap: str = "") -> str:
    """A question as the sample asks it, ``gap``, then its column-by-column working, as plain text (no
    ``<think>``, no boxed answer): the worksheet form the tiny base model is pretrained on."""
    question = rng.choice(_ARITHMETIC_QUESTIONS).format(a=a, b=b)
    return f"{question}\n{gap}{render_arithmetic_think(a, b, rng)}"


def sample_arithmetic_pairs() -> set[tuple[int, int]]:
    """Every problem of the bundled sample files, as unordered addend pairs: what pretraining must not see."""
    import re

    pairs: set[tuple[int, int]] = set()
    for schema, seed in (("v0", SAMPLE_SEED_V0), ("v1", SAMPLE_SEED_V1)):
        for row in generate_rows(SAMPLE_ROWS, schema=schema, seed=seed, family=SAMPLE_FAMILY):
            a, b = (int(n) for n in re.findall(r"\d+", row["reannotated_assistant_content"])[:2])
            pairs.add((min(a, b), max(a, b)))
    return pairs


def _arithmetic_example(
    rng: random.Random, schema: SchemaVersion, used: set[tuple[int, int]]
) -> tuple[str, str, str]:
    """(problem, R1-shaped assistant text, short solution) of one easy addition."""
    a, b = arithmetic_problem(rng, schema, used)
    question = rng.choice(_ARITHMETIC_QUESTIONS).format(a=a, b=b)
    content = (
        f"<think>\n{render_arithmetic_think(a, b, rng)}\n</think>\n\n"
        f"{a} + {b} = {a + b}, so the answer is \\(\\boxed{{{a + b}}}\\)."
    )
    solution = f"${a} + {b} = {a + b}$. The answer is $\\boxed{{{a + b}}}$."
    return question, content, solution


def _word_example(
    rng: random.Random, schema: SchemaVersion, used: set[tuple[int, int]]
) -> tuple[str, str, str]:
    """(problem, R1-shaped assistant text, short solution) of one multi-step word problem (problems may
    repeat: ``schema`` and ``used`` are the arithmetic family's)."""
    problem = generate_problem(rng)
    content = render_assistant_content(problem, rng, _reasoning_passes(rng))
    return problem.text, content, render_short_solution(problem)


Family = Literal["word", "arithmetic"]
FAMILIES: dict[str, Callable[[random.Random, SchemaVersion, set[tuple[int, int]]], tuple[str, str, str]]] = {
    "word": _word_example,
    "arithmetic": _arithmetic_example,
}
# The bundled sample is the easy family: the tiny model learns it in the demo's few minutes of training,
# so the eval shows a real difference (the word problems stay for long, R1-like traces in tests).
SAMPLE_FAMILY: Family = "arithmetic"


def generate_rows(
    n: int, *, schema: SchemaVersion, seed: int, family: Family = "word"
) -> list[dict[str, Any]]:
    """``n`` rows in R1-Distill-SFT's ``schema`` ("v0" or "v1") columns, a pure function of the arguments.

    ``family``: "word" (multi-step word problems, R1's long and uneven traces) or "arithmetic" (two-digit
    additions with a short column-by-column trace; each problem at most once per file, at most about
    2000 rows per schema, and v0 and v1 never share a problem).
    """
    if schema not in SCHEMA_COLUMNS:
        raise ValueError(f"unknown schema {schema!r}; expected 'v0' or 'v1'")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {sorted(FAMILIES)}")
    example = FAMILIES[family]
    # The schema is part of the stream so that v0 and v1 with the same seed hold different problems; the
    # word family keeps its historical stream (no family prefix) so its rows stay byte-identical.
    rng = random.Random(f"{schema}:{seed}" if family == "word" else f"{family}:{schema}:{seed}")
    rows: list[dict[str, Any]] = []
    used: set[tuple[int, int]] = set()
    for index in range(n):
        problem_text, content, solution = example(rng, schema, used)
        row_id = _row_id(schema, seed, index, family)
        if schema == "v0":
            rows.append(
                {
                    "id": row_id,
                    "reannotated_assistant_content": content,
                    "problem": problem_text,
                    "source": rng.choice(_V0_SOURCES),
                    "solution": solution,
                    "verified": None,
                    "quality_metrics": None,
                }
            )
        else:
            user = {"role": "user", "content": problem_text}
            rows.append(
                {
                    "id": row_id,
                    "reannotated_assistant_content": content,
                    "source": rng.choice(_V1_SOURCES),
                    "reannotated_messages": [user, {"role": "assistant", "content": content}],
                    # `messages` is the source dataset's original conversation, before R1 re-annotation.
                    "messages": [user, {"role": "assistant", "content": solution}],
                    "source_dataset": rng.choice(_V1_SOURCE_DATASETS),
                    "verified": None,
                    "quality_metrics": None,
                }
            )
    return rows


def plain_texts(rows: Iterable[dict[str, Any]]) -> list[str]:
    """Problem + reasoning + answer as plain prose (no chat markup), e.g. for pretraining the tiny model."""
    texts: list[str] = []
    for row in rows:
        problem = row.get("problem")
        if problem is None:
            problem = next(m["content"] for m in row["reannotated_messages"] if m["role"] == "user")
        texts.append(f"{problem}\n\n{row['reannotated_assistant_content']}")
    return texts


# --------------------------------------------------------------------------------------------------
# Parquet files
# --------------------------------------------------------------------------------------------------


def arrow_schema(schema: SchemaVersion) -> Any:
    """The pyarrow schema of the hub's parquet files for ``schema`` (verified/quality_metrics are all-null)."""
    import pyarrow as pa

    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    types: dict[str, Any] = {
        "id": pa.string(),
        "reannotated_assistant_content": pa.string(),
        "problem": pa.string(),
        "source": pa.string(),
        "solution": pa.string(),
        "reannotated_messages": pa.list_(message),
        "messages": pa.list_(message),
        "source_dataset": pa.string(),
        "verified": pa.null(),
        "quality_metrics": pa.null(),
    }
    return pa.schema([(column, types[column]) for column in SCHEMA_COLUMNS[schema]])


def rows_to_table(rows: Sequence[dict[str, Any]], schema: SchemaVersion) -> Any:
    import pyarrow as pa

    return pa.Table.from_pylist(list(rows), schema=arrow_schema(schema))


def write_parquet(rows: Sequence[dict[str, Any]], path: Path, schema: SchemaVersion) -> Path:
    """Write rows deterministically (same rows -> same bytes) with zstd compression."""
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        rows_to_table(rows, schema),
        path,
        compression="zstd",
        compression_level=19,
        row_group_size=256,
    )
    return path


def bundled_sample_path(schema: SchemaVersion) -> Path:
    """The bundled sample file for ``schema`` (made by scripts/make_sample.py)."""
    if schema not in SCHEMA_COLUMNS:
        raise ValueError(f"unknown schema {schema!r}; expected 'v0' or 'v1'")
    path = SAMPLE_DATA_DIR / f"r1_distill_sft_{schema}.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"bundled sample {path} is missing; run scripts/make_sample.py")
    return path


_HUB_README = """---
license: {license}
task_categories:
- text-generation
configs:
- config_name: v0
  data_files:
  - split: train
    path: v0/train-*
- config_name: v1
  data_files:
  - split: train
    path: v1/train-*
---

# R1-Distill-SFT (offline stand-in)

Synthetic rows in the schema of [{hub_id}](https://huggingface.co/datasets/{hub_id}), generated by
`llmft_assets.data.sample_gen`. Two configs, `v0` and `v1`, each with a single `train` split.
"""


def write_hub_layout(
    root: Path,
    rows_v0: Sequence[dict[str, Any]],
    rows_v1: Sequence[dict[str, Any]],
    shards: int = 2,
) -> Path:
    """Lay out ``root`` like the hub dataset repo (README configs + sharded parquet per config).

    ``datasets.load_dataset(str(root), "v0", split="train", streaming=True)`` then reads it offline,
    through the same code path as the real ``ServiceNow-AI/R1-Distill-SFT``.
    """
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    root.mkdir(parents=True, exist_ok=True)
    (root / "README.md").write_text(_HUB_README.format(license=DATASET_LICENSE, hub_id=HUB_DATASET_ID))
    schema_rows: tuple[tuple[SchemaVersion, Sequence[dict[str, Any]]], ...] = (
        ("v0", rows_v0),
        ("v1", rows_v1),
    )
    for schema, rows in schema_rows:
        per_shard = -(-len(rows) // shards) if rows else 0
        for shard in range(shards):
            chunk = rows[shard * per_shard : (shard + 1) * per_shard]
            write_parquet(chunk, root / schema / f"train-{shard:05d}-of-{shards:05d}.parquet", schema)
    return root
