"""Stable hash splits, fraction checks and the cross-split overlap helper."""

from __future__ import annotations

import pytest

from llmft_assets.data.splits import (
    assign_split,
    find_cross_split_overlap,
    problem_key_of_prompt,
    validate_fractions,
)


def splits_of(ids: list[str], **kwargs: float) -> dict[str, str]:
    return {
        row_id: assign_split(
            row_id, validation_fraction=kwargs.get("val", 0.1), test_fraction=kwargs.get("test", 0.1)
        )
        for row_id in ids
    }


def test_adding_rows_never_moves_existing_rows() -> None:
    before = splits_of([f"row-{i}" for i in range(2000)])
    after = splits_of([f"row-{i}" for i in range(6000)])
    assert all(after[row_id] == split for row_id, split in before.items())


def test_fractions_are_respected_roughly() -> None:
    assigned = list(splits_of([f"id-{i}" for i in range(20_000)], val=0.1, test=0.05).values())
    assert abs(assigned.count("validation") / len(assigned) - 0.1) < 0.01
    assert abs(assigned.count("test") / len(assigned) - 0.05) < 0.01


def test_salt_changes_the_assignment_and_zero_fractions_mean_all_train() -> None:
    ids = [f"id-{i}" for i in range(500)]
    a = [assign_split(i, validation_fraction=0.2, test_fraction=0.2) for i in ids]
    b = [assign_split(i, validation_fraction=0.2, test_fraction=0.2, salt="other") for i in ids]
    assert a != b
    assert {assign_split(i, validation_fraction=0.0, test_fraction=0.0) for i in ids} == {"train"}


@pytest.mark.parametrize(
    ("validation", "test", "message"),
    [
        (-0.1, 0.1, "validation_fraction must be in"),
        (0.1, 1.0, "test_fraction must be in"),
        (0.6, 0.5, "must be < 1"),
        (float("nan"), 0.1, "validation_fraction must be in"),
        ("0.1", 0.1, "must be a number"),
        (True, 0.1, "must be a number"),
    ],
)
def test_bad_fractions(validation: float, test: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_fractions(validation, test)


def test_bad_id() -> None:
    with pytest.raises(ValueError, match="split key"):
        assign_split("", validation_fraction=0.1, test_fraction=0.1)


def test_cross_split_overlap() -> None:
    assert find_cross_split_overlap({"train": ["a", "b"], "validation": ["c"], "test": []}) == {}
    overlap = find_cross_split_overlap({"train": ["a", "b"], "validation": ["b"], "test": ["a", "b"]})
    assert overlap == {"a": ["test", "train"], "b": ["test", "train", "validation"]}


# ---- leak-free splits: the normalized problem is the key; near duplicates stay together ---------------

from llmft_assets.data.split_isolation import split_isolation_problems  # noqa: E402
from llmft_assets.data.splits import (  # noqa: E402
    NearDuplicateIndex,
    plan_leak_free_splits,
    problem_key,
)


def _conv(prompt: str, answer: str = "\\boxed{4}") -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def test_problem_key_normalizes_unicode_whitespace_and_case() -> None:
    base = problem_key(_conv("What is 2 + 2?"))
    variants = [
        _conv("  What is 2 +\n 2?  "),  # whitespace
        _conv("WHAT IS 2 + 2?", answer="different re-annotation"),  # case, another answer text
        _conv("What\u00a0is \uff12 + \uff12?"),  # no-break space and full-width digits (NFKC)
        [{"role": "system", "content": "Be brief."}, *_conv("What is 2 + 2?")],  # the first *user* turn
    ]
    assert {problem_key(v) for v in variants} == {base}
    assert problem_key(_conv("What is 2 + 3?")) != base
    assert problem_key([], fallback="id-1") != problem_key([], fallback="id-2")


def _plan(rows: list[tuple[str, str]], **kwargs):
    return plan_leak_free_splits(lambda: iter([rows]), validation_fraction=0.3, test_fraction=0.3, **kwargs)


def test_the_same_problem_under_other_ids_never_crosses_splits() -> None:
    problems = [f"A box holds {i} apples and {i + 7} pears. How many fruits?" for i in range(60)]
    rows = [(f"v0-{i}", p) for i, p in enumerate(problems)]
    rows += [(f"v1-{i}", "  " + p.upper() + " ") for i, p in enumerate(problems)]  # twins, new ids
    plan = _plan(rows)
    assert plan.assignments[:60] == plan.assignments[60:]
    assert {"train", "validation", "test"} == set(plan.assignments)
    # The old rule (hash of the id) splits such twins apart: the key is what makes this hold.
    by_id = [assign_split(row_id, validation_fraction=0.3, test_fraction=0.3) for row_id, _ in rows]
    assert by_id[:60] != by_id[60:]


def test_near_duplicates_are_pulled_into_train_and_template_variants_are_not() -> None:
    # Long enough that one reworded word keeps the true shingle Jaccard at 0.90 (a short prompt falls below 0.8).
    prompt = (
        "A car travels at a constant speed of 93 kilometers per hour for 6 hours along a straight and quiet "
        "country road that winds past fields, a river and two old villages. What distance does it cover?"
    )
    variants = [prompt.replace("car", vehicle) for vehicle in ("train", "bus", "truck", "cyclist", "boat")]
    other_numbers = [prompt.replace("93", str(n)) for n in range(10, 40)]  # other problems, same template
    rows = [(f"r{i}", p) for i, p in enumerate([prompt, *variants, *other_numbers])]
    plain = [
        assign_split(problem_key_of_prompt(p, i), validation_fraction=0.3, test_fraction=0.3) for i, p in rows
    ]
    plan = _plan(rows)
    # The key alone scatters the reworded copies of one problem over all three splits...
    assert plain[:6] == ["train", "validation", "train", "test", "test", "validation"]
    # ...the plan keeps them together, in train (a train copy pulls its evaluation twins in).
    assert plan.assignments[:6] == ["train"] * 6
    assert plan.moved_to_train == 4 and plan.joined_eval_group >= 1
    # Different numbers are different problems: their key decides, untouched.
    assert plan.assignments[6:] == plain[6:]
    # Stable: adding rows never moves an existing row, except an evaluation row into train.
    more = _plan(
        rows + [(f"n{i}", f"Completely new question number {i} about {i * 3} cats?") for i in range(40)]
    )
    for before, after in zip(plan.assignments, more.assignments[: len(rows)], strict=True):
        assert after == before or after == "train"


def test_isolation_check_passes_on_planned_splits_and_fails_on_planted_leaks() -> None:
    prompts = [f"Tom has {i} marbles and buys {2 * i + 1} more. How many marbles now?" for i in range(80)]
    plan = _plan([(str(i), p) for i, p in enumerate(prompts)])
    by_split: dict[str, list] = {"train": [], "validation": [], "test": []}
    for prompt, split in zip(prompts, plan.assignments, strict=True):
        by_split[split].append(_conv(prompt))
    clean = split_isolation_problems(by_split)
    assert clean["counts"] == {"shared_problem_keys": 0, "shared_content_hashes": 0, "near_duplicates": 0}

    test_prompt = by_split["test"][0][0]["content"]
    leaked_key = {**by_split, "train": [*by_split["train"], _conv("  " + test_prompt.lower())]}
    report = split_isolation_problems(leaked_key)
    assert report["counts"] == {"shared_problem_keys": 1, "shared_content_hashes": 0, "near_duplicates": 0}
    assert report["examples"][0]["kind"] == "problem_key"

    reworded = test_prompt.replace("Tom has", "Tommy has")
    leaked_near = {**by_split, "train": [*by_split["train"], _conv(reworded)]}
    report = split_isolation_problems(leaked_near)
    assert report["counts"] == {"shared_problem_keys": 0, "shared_content_hashes": 0, "near_duplicates": 1}
    assert report["examples"][0]["kind"] == "near_duplicate" and report["examples"][0]["jaccard"] >= 0.8

    hashes = {"train": ["h1", "h2"], "validation": ["h3"], "test": ["h2"]}
    assert split_isolation_problems(by_split, hashes)["counts"]["shared_content_hashes"] == 1


def test_near_duplicate_index_needs_the_same_numbers() -> None:
    index = NearDuplicateIndex()
    index.add("a", "A set of pens costs $460. It is on sale for 75% off. What is the sale price in dollars?")
    same = "One set of pens costs $460. It is on sale for 75% off. What is the sale price in dollars?"
    other = "A set of pens costs $460. It is on sale for 25% off. What is the sale price in dollars?"
    assert [item for item, _ in index.query(same)] == ["a"]
    assert index.query(other) == []


def test_streamed_isolation_check_counts_what_the_pairwise_search_finds() -> None:
    """The check streams train against the held evaluation splits; its counts equal the all-pairs
    reference (`find_near_duplicates`, `find_cross_split_overlap`) for any batching, leaks in every pair."""
    from llmft_assets.data.split_isolation import isolation_problems
    from llmft_assets.data.splits import find_near_duplicates, problem_key_of_prompt

    template = (
        "A farmer has {} cows and {} sheep on the hill behind the old red barn, and every morning she walks "
        "out with her dog to count them all before the sun rises over the valley. How many animals are there?"
    )
    prompts = {
        "train": [template.format(i, i + 3) for i in range(0, 60)],
        "validation": [template.format(i, i + 3) for i in range(60, 80)],
        "test": [template.format(i, i + 3) for i in range(80, 100)],
    }
    # Reworded at either end (one or two of ~40 shingles change): near duplicates with another key.
    prompts["train"] += [
        prompts["test"][0].upper(),
        prompts["validation"][1].replace("A farmer", "One farmer"),
    ]
    prompts["test"] += [
        prompts["validation"][2].replace("are there?", "are there now?"),
        prompts["validation"][3],
    ]
    hashes = {name: [f"h{problem_key_of_prompt(p)[:6]}" for p in values] for name, values in prompts.items()}
    hashes["train"][5] = hashes["test"][7]

    keys = {
        name: [problem_key_of_prompt(p, f"{name}#{i}") for i, p in enumerate(v)]
        for name, v in prompts.items()
    }
    near = [
        pair
        for pair in find_near_duplicates(prompts)
        if keys[pair.split_a][pair.index_a] != keys[pair.split_b][pair.index_b]
    ]
    expected = {
        "shared_problem_keys": len(find_cross_split_overlap(keys)),
        "shared_content_hashes": len(find_cross_split_overlap(hashes)),
        "near_duplicates": len(near),
    }
    assert expected == {"shared_problem_keys": 2, "shared_content_hashes": 3, "near_duplicates": 2}
    for batch_rows in (1, 7, 1000):

        def read_split(name: str, size: int = batch_rows):
            values, digests = prompts[name], hashes[name]
            for start in range(0, len(values), size):
                yield values[start : start + size], digests[start : start + size]

        report = isolation_problems(read_split, ["train", "validation", "test"])
        assert report["counts"] == expected, batch_rows
        assert {e["kind"] for e in report["examples"]} == {"problem_key", "near_duplicate"}
