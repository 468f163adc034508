"""Benchmark: seconds and peak RSS of the drift report for 1k / 10k / 100k logged requests.

Synthetic R1-like traffic (math prompts, `<think>` reasoning, `\\boxed{}` answers) forms a 10,000-row
reference; each current window carries an injected shift (longer prompts, other topics, some
non-Latin prompts, refusals, shorter answers without think blocks). Each size runs in its own
subprocess that reads the Parquet request log and builds the report, so its peak RSS
(os.wait4's rusage of that child) is its own. Evidently's default text method for small windows
(`perc_text_content_drift`) runs beside ours (`abs_text_content_drift`) on the smallest size.

    .venv/bin/python benchmarks/drift.py [--sizes 1000,10000,100000] [--reference-rows 10000]

Prints one JSON line per run and a last JSON line with the summary.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO_ROOT = Path(__file__).resolve().parent.parent
OUR_TEXT_METHOD = "abs_text_content_drift"
DEFAULT_TEXT_METHOD = "perc_text_content_drift"

MATH_TOPICS = (
    "integer",
    "triangle",
    "probability",
    "polynomial",
    "sequence",
    "circle",
    "prime",
    "matrix",
    "function",
    "inequality",
    "remainder",
    "digits",
)
SHIFTED_TOPICS = ("recipe", "itinerary", "contract", "symptom", "poem", "database", "invoice", "playlist")
MATH_CLAUSES = (
    "Let $x$ and $y$ be positive real numbers such that $x + y = {a}$.",
    "Find the number of ordered pairs $(m, n)$ with $m^2 + n^2 \\le {a}$.",
    "A {t} has a perimeter of {a} and one side of length {b}.",
    "Compute the remainder when ${a}^{{{b}}}$ is divided by 7.",
    "The sum of the first {a} terms of a {t} is {b}.",
    "Determine the smallest {t} value greater than {a}.",
    "What is the probability that a random {t} contains {b}?",
    "Evaluate $\\frac{{{a}}}{{{b}}} + \\sqrt{{{a}}}$.",
)
SHIFTED_CLAUSES = (
    "Please write a detailed {t} for a family of {a} people visiting the coast next summer.",
    "Can you explain, step by step, how to fix the {t} that my manager sent on Monday?",
    "I need a friendly email about the {t}; keep it under {b} words and mention the deadline.",
    "Summarize the attached {t} and list every risk you can find, with references.",
    "请帮我写一个关于{t}的简短介绍，大约{a}个字。",  # noqa: RUF001
    "Напиши, пожалуйста, короткий текст про {t} для {a} читателей.",
)
REASONING_STEPS = (
    "First, I note that the constraint gives {a} directly.",
    "Substituting, we get {b} on the right-hand side.",
    "Wait, let me double-check the case where the {t} is degenerate.",
    "So the expression simplifies to {a} - {b}.",
    "By symmetry the two cases contribute equally.",
    "Hmm, that would contradict the bound, so this case is impossible.",
    "Therefore the count is {a} times {b}.",
)
REFUSAL_ANSWERS = (
    "I'm sorry, but I can't help with that request.",
    "As an AI, I cannot provide medical advice; please consult a professional.",
)


def synthetic_requests(rows: int, *, shifted: bool, seed: int) -> pa.Table:
    """R1-like prompt/response pairs in the request-log schema (the columns drift reads)."""
    rng = np.random.default_rng(seed)
    prompts: list[str] = []
    responses: list[str] = []
    for _ in range(rows):
        a, b = (int(value) for value in rng.integers(2, 500, size=2))
        if shifted and rng.random() < 0.7:
            topic = SHIFTED_TOPICS[rng.integers(len(SHIFTED_TOPICS))]
            clauses = [
                SHIFTED_CLAUSES[i] for i in rng.integers(len(SHIFTED_CLAUSES), size=rng.integers(3, 9))
            ]
        else:
            topic = MATH_TOPICS[rng.integers(len(MATH_TOPICS))]
            clauses = [MATH_CLAUSES[i] for i in rng.integers(len(MATH_CLAUSES), size=rng.integers(1, 4))]
        prompts.append(" ".join(clause.format(a=a, b=b, t=topic) for clause in clauses))
        if shifted and rng.random() < 0.15:
            responses.append(REFUSAL_ANSWERS[rng.integers(len(REFUSAL_ANSWERS))])
            continue
        steps = rng.integers(len(REASONING_STEPS), size=rng.integers(4, 30) // (3 if shifted else 1) + 1)
        reasoning = " ".join(REASONING_STEPS[i].format(a=a, b=b, t=topic) for i in steps)
        answer = f"The answer is $\\boxed{{{a * b % 997}}}$."
        if shifted and rng.random() < 0.5:
            responses.append(f"{reasoning} {answer}")  # no think block
        else:
            responses.append(f"<think>\n{reasoning}\n</think>\n\n{answer}")
    return pa.table(
        {
            "request_id": pa.array([f"req-{seed}-{index}" for index in range(rows)]),
            "prompt": pa.array(prompts, type=pa.string()),
            "response": pa.array(responses, type=pa.string()),
        }
    )


def run_child(reference_path: str, current_path: str, text_method: str) -> None:
    """One measurement: read the two Parquet windows, build the report, print a JSON line."""
    import resource

    started = time.perf_counter()
    import evidently.presets  # noqa: F401  (imported here so the report time excludes it)

    from llmft_assets.monitoring.drift import build_drift_report

    import_seconds = time.perf_counter() - started
    started = time.perf_counter()
    reference = pq.read_table(reference_path, columns=["prompt", "response"])
    current = pq.read_table(current_path, columns=["prompt", "response"])
    load_seconds = time.perf_counter() - started
    usage_before = resource.getrusage(resource.RUSAGE_SELF)
    rss_before_report_mb = usage_before.ru_maxrss / 1024
    started = time.perf_counter()
    result = build_drift_report(reference, current, text_method=text_method)
    report_seconds = time.perf_counter() - started
    usage_after = resource.getrusage(resource.RUSAGE_SELF)
    # CPU time is less sensitive than wall time to other work on a shared machine.
    report_cpu_seconds = (usage_after.ru_utime + usage_after.ru_stime) - (
        usage_before.ru_utime + usage_before.ru_stime
    )
    print(
        json.dumps(
            {
                "import_seconds": round(import_seconds, 2),
                "load_seconds": round(load_seconds, 2),
                "seconds": round(report_seconds, 2),
                "cpu_seconds": round(report_cpu_seconds, 2),
                "total_seconds": round(import_seconds + load_seconds + report_seconds, 2),
                "rss_before_report_mb": round(rss_before_report_mb, 1),
                "status": result.status,
                "drift_share": result.drift_share,
                "drifted_columns": result.drifted_columns,
                "text_sample_rows": result.text_sample_rows,
                "html_mb": round(len(result.html) / 2**20, 2),
            }
        )
    )


def measure(reference_path: Path, current_path: Path, text_method: str) -> dict:
    """Run one child; its own peak RSS comes from os.wait4 on its pid."""
    command = [sys.executable, __file__, "--child", str(reference_path), str(current_path), text_method]
    # stderr goes to a file, so a chatty child cannot fill a pipe we are not reading.
    with tempfile.TemporaryFile(mode="w+") as stderr_file:
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=stderr_file,
            text=True,
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        )
        stdout = process.stdout.read() if process.stdout else ""
        _, wait_status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(wait_status)
        if process.returncode != 0:
            stderr_file.seek(0)
            raise RuntimeError(
                f"benchmark child failed ({process.returncode}):\n{stderr_file.read()[-4000:]}"
            )
    measured = json.loads(stdout.strip().splitlines()[-1])
    measured["peak_rss_mb"] = round(usage.ru_maxrss / 1024, 1)  # Linux reports KiB
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="1000,10000,100000", help="current-window sizes, comma-separated")
    parser.add_argument("--reference-rows", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--child", nargs=3, metavar=("REFERENCE", "CURRENT", "TEXT_METHOD"), help=argparse.SUPPRESS
    )
    arguments = parser.parse_args()
    if arguments.child:
        run_child(*arguments.child)
        return

    sizes = sorted(int(size) for size in arguments.sizes.split(","))
    summary: dict = {"reference_rows": arguments.reference_rows, "sizes": sizes, "cpu_count": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="llmft-drift-bench-") as workdir:
        reference_path = Path(workdir) / "reference.parquet"
        pq.write_table(
            synthetic_requests(arguments.reference_rows, shifted=False, seed=arguments.seed), reference_path
        )
        runs: list[tuple[int, str]] = [(size, OUR_TEXT_METHOD) for size in sizes]
        runs.insert(1, (sizes[0], DEFAULT_TEXT_METHOD))
        for size, text_method in runs:
            current_path = Path(workdir) / f"current_{size}.parquet"
            if not current_path.exists():
                pq.write_table(
                    synthetic_requests(size, shifted=True, seed=arguments.seed + size), current_path
                )
            measured = measure(reference_path, current_path, text_method)
            line = {
                "current_rows": size,
                "reference_rows": arguments.reference_rows,
                "text_method": text_method,
            }
            print(json.dumps(line | measured), flush=True)
            if text_method == OUR_TEXT_METHOD:
                summary.setdefault("seconds", {})[str(size)] = measured["seconds"]
                summary.setdefault("cpu_seconds", {})[str(size)] = measured["cpu_seconds"]
                summary.setdefault("rss_mb", {})[str(size)] = measured["peak_rss_mb"]
                summary.setdefault("status", {})[str(size)] = measured["status"]
            else:
                summary[f"default_method_seconds_{size}"] = measured["seconds"]
                summary[f"default_method_cpu_seconds_{size}"] = measured["cpu_seconds"]

    smallest, largest = str(sizes[0]), str(sizes[-1])
    summary[f"seconds_{largest}"] = summary["seconds"][largest]
    summary[f"ours_seconds_{smallest}"] = summary["seconds"][smallest]
    summary[f"speedup_{smallest}"] = round(
        summary[f"default_method_seconds_{smallest}"] / max(summary["seconds"][smallest], 1e-9), 1
    )
    summary[f"cpu_speedup_{smallest}"] = round(
        summary[f"default_method_cpu_seconds_{smallest}"] / max(summary["cpu_seconds"][smallest], 1e-9), 1
    )
    summary["load_average_1min"] = round(os.getloadavg()[0], 1)
    # Memory growth per extra request between the two largest sizes (linear growth keeps it flat).
    if len(sizes) >= 2:
        previous = str(sizes[-2])
        extra_rows = sizes[-1] - sizes[-2]
        summary["rss_kb_per_extra_request"] = round(
            (summary["rss_mb"][largest] - summary["rss_mb"][previous]) * 1024 / extra_rows, 2
        )
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
