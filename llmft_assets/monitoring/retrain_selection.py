"""Drift-targeted retraining data: the pool rows nearest to what users now ask (pure, no Dagster).

Served traffic (the request log's prompts) is clustered; every candidate pool row is scored by the
cosine similarity of its prompt to the nearest traffic cluster, and each cluster keeps its best rows in a
bounded heap whose size is the cluster's share of traffic times the number of rows wanted; what a
cluster cannot fill (the pool has too few rows like it) goes to the best rows the other clusters turned
away (one more bounded heap). The pool is streamed in Arrow batches, so memory is the index (the traffic
centroids, ``clusters x n_features`` float32) plus the heaps (at most twice the rows wanted), whatever the
pool's size.

Why TF-IDF over hashed word uni/bigrams and not MinHash-LSH: ``benchmarks/retrain_selection.py`` measures
both. MinHash over word 3-shingles finds *near duplicates* (the split check's job): a new word problem of
the same kind shares few 3-shingles with a traffic prompt, so LSH returns almost no candidates and the
selection misses the shifted kind; it is also slower (one Python hash per shingle). Hashed TF-IDF
vectorizes a batch in C, needs no vocabulary pass, and ranks rows of the same kind first.

Prompts are compared by their normalized problem (``data.splits.normalize_problem``) with every number
replaced by one placeholder: problems of one kind differ in their numbers, which say nothing about kind.

What is dropped, and counted: rows whose normalized problem is in a test split (``excluded_keys``: their
problem keys), rows without a user turn, a second row with a problem already selected, and rows less
similar than ``min_similarity`` to every traffic cluster. The selected rows are divided by a salted hash
of their problem key into training rows and the *traffic slice*, held-out rows selected the same way, on
which the gate judges the retrained adapter.
"""

from __future__ import annotations

import heapq
import itertools
import re
from collections.abc import Iterable, Iterator, Sequence, Set
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from llmft_assets.data.splits import normalize_problem, problem_key_of_prompt, split_point

TRAFFIC_SLICE_SALT = "llmft-traffic-slice"  # not the split salt: the slice is not the test split
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
MESSAGES_COLUMN = "messages"


@dataclass(frozen=True)
class SelectionSettings:
    """How the retraining dataset is selected (the one home of these defaults; Dagster config derives)."""

    target_rows: int = 2_000
    """Pool rows to select (training rows + traffic slice)."""
    mix_ratio: float = 0.5
    """Share of the retraining training split that are selected rows; the rest are current training rows."""
    traffic_slice_fraction: float = 0.2
    """Share of the selected rows held out as the traffic-shaped evaluation slice."""
    traffic_clusters: int = 8
    """At most this many clusters of traffic prompts (fewer when there are fewer distinct prompts)."""
    min_similarity: float = 0.05
    """A pool row less similar than this to every traffic cluster is never selected."""
    n_features: int = 2**18
    """Hashed feature space of the TF-IDF vectors (the centroids are ``clusters x n_features`` float32)."""
    histogram_bins: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if self.target_rows < 1:
            raise ValueError(f"target_rows must be >= 1, got {self.target_rows}")
        if not 0.0 < self.mix_ratio <= 1.0:
            raise ValueError(f"mix_ratio must be in (0, 1], got {self.mix_ratio}")
        if not 0.0 <= self.traffic_slice_fraction < 1.0:
            raise ValueError(f"traffic_slice_fraction must be in [0, 1), got {self.traffic_slice_fraction}")
        if self.traffic_clusters < 1:
            raise ValueError(f"traffic_clusters must be >= 1, got {self.traffic_clusters}")
        if not -1.0 <= self.min_similarity <= 1.0:
            raise ValueError(f"min_similarity must be in [-1, 1], got {self.min_similarity}")
        if self.n_features < 2**10 or self.histogram_bins < 1:
            raise ValueError("n_features must be >= 1024 and histogram_bins >= 1")


def topic_text(prompt: str) -> str:
    """The normalized problem with every number replaced by '#': what kind of problem, not which one."""
    return _NUMBER.sub("#", normalize_problem(prompt))


# ------------------------------------------------------------------------------------------- traffic


def traffic_texts(traffic_prompts: Sequence[str | None]) -> list[str]:
    """The topic texts of the non-empty traffic prompts: none means there is nothing to select for."""
    return [topic_text(prompt) for prompt in traffic_prompts if isinstance(prompt, str) and prompt.strip()]


@dataclass(frozen=True)
class TrafficCluster:
    index: int
    share: float  # of the traffic prompts
    prompts: int
    top_terms: tuple[str, ...]  # hashed features cannot be named: the commonest words of its prompts
    example: str


class TrafficIndex:
    """The traffic prompts as L2-normalized TF-IDF centroids of k-means clusters (the only index kept)."""

    def __init__(self, traffic_prompts: Sequence[str], settings: SelectionSettings) -> None:
        from sklearn.cluster import KMeans
        from sklearn.feature_extraction.text import HashingVectorizer, TfidfTransformer
        from sklearn.preprocessing import normalize

        texts = traffic_texts(traffic_prompts)
        if not texts:
            raise ValueError(
                "no traffic prompt to select for: the request-log window has no non-empty prompt"
            )
        self._vectorizer = HashingVectorizer(
            n_features=settings.n_features, ngram_range=(1, 2), alternate_sign=False, norm=None
        )
        counts = self._vectorizer.transform(texts)
        self._idf = TfidfTransformer(sublinear_tf=True).fit(counts)
        vectors = self._idf.transform(counts)
        distinct = len(set(texts))
        k = min(settings.traffic_clusters, distinct)
        if k > 1:
            labels = KMeans(n_clusters=k, n_init=3, random_state=settings.seed).fit_predict(vectors)
        else:
            labels = np.zeros(len(texts), dtype=np.int64)
        centroids = np.vstack([np.asarray(vectors[labels == c].mean(axis=0)) for c in range(k)])
        self.centroids = normalize(centroids).astype(np.float32)  # rows x n_features, dense
        self.clusters = tuple(
            _describe_cluster(
                c, [t for t, label in zip(texts, labels, strict=True) if label == c], len(texts)
            )
            for c in range(k)
        )

    @property
    def index_bytes(self) -> int:
        return int(self.centroids.nbytes + self._idf.idf_.nbytes)

    def score(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(similarity to the nearest cluster, that cluster) for each prompt."""
        from sklearn.preprocessing import normalize

        vectors = normalize(self._idf.transform(self._vectorizer.transform([topic_text(p) for p in prompts])))
        similarity = np.asarray(vectors @ self.centroids.T)
        nearest = similarity.argmax(axis=1)
        return similarity[np.arange(len(prompts)), nearest], nearest


def _describe_cluster(index: int, texts: list[str], total: int) -> TrafficCluster:
    words: dict[str, int] = {}
    for text in texts:
        for word in set(text.split(" ")):
            if len(word) > 3 and word.isalpha():
                words[word] = words.get(word, 0) + 1
    top = tuple(word for word, _ in sorted(words.items(), key=lambda item: (-item[1], item[0]))[:5])
    return TrafficCluster(index, len(texts) / total, len(texts), top, texts[0][:120] if texts else "")


# ------------------------------------------------------------------------------------------ selection


def first_user_prompts(batch: pa.RecordBatch | pa.Table, column: str = MESSAGES_COLUMN) -> list[str | None]:
    """The first user turn of each row's conversation (None where there is none), without Python loops
    over the messages: flatten, keep user turns, first per row."""
    messages = batch.column(column)
    if isinstance(messages, pa.ChunkedArray):
        messages = messages.combine_chunks()
    flat = pc.list_flatten(messages)
    parents = np.asarray(pc.list_parent_indices(messages))
    is_user = np.asarray(pc.fill_null(pc.equal(flat.field("role"), "user"), False))
    user_rows = parents[is_user]
    contents = flat.field("content").filter(pa.array(is_user))
    rows, first = np.unique(user_rows, return_index=True)
    prompts: list[str | None] = [None] * len(messages)
    for row, value in zip(rows.tolist(), contents.take(pa.array(first)).to_pylist(), strict=True):
        prompts[row] = value
    return prompts


@dataclass(frozen=True)
class ClusterSelection:
    cluster: TrafficCluster
    quota: int
    selected: int  # above the quota when other clusters' unfilled quota went to its rows
    mean_similarity: float | None


@dataclass(frozen=True)
class SelectionStats:
    pool_rows: int
    selected_rows: int
    training_rows: int
    traffic_slice_rows: int
    dropped_in_test_split: int
    dropped_without_prompt: int
    dropped_duplicate_problem: int
    below_min_similarity: int
    clusters: tuple[ClusterSelection, ...]
    histogram_edges: tuple[float, ...]
    histogram_pool: tuple[int, ...]  # similarity of every scored pool row
    histogram_selected: tuple[int, ...]
    index_bytes: int

    def as_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


@dataclass(frozen=True)
class TrafficSelection:
    training_rows: pa.Table  # selected rows for training (pool schema, plus nothing)
    traffic_slice: pa.Table  # held-out selected rows: the traffic-shaped evaluation slice
    stats: SelectionStats
    similarity: dict[str, float] = field(default_factory=dict)  # row id -> similarity (selected rows)


class _Heap:
    """The best ``quota`` rows of one cluster: a min-heap on (similarity, tiebreak)."""

    def __init__(self, quota: int) -> None:
        self.quota = quota
        self.items: list[tuple[float, int, str, dict[str, Any], int]] = []

    def floor(self) -> float:
        return self.items[0][0] if len(self.items) >= self.quota else -np.inf

    def push(
        self, similarity: float, order: int, key: str, row: dict[str, Any], cluster: int
    ) -> tuple[float, int, str, dict[str, Any], int] | None:
        """Add the row; returns the item it pushed out (possibly itself), if any."""
        item = (similarity, -order, key, row, cluster)  # equal similarity: the earlier row wins
        if len(self.items) < self.quota:
            heapq.heappush(self.items, item)
            return None
        if item[:2] <= self.items[0][:2]:
            return item
        return heapq.heappushpop(self.items, item)


def _quotas(clusters: Sequence[TrafficCluster], target: int) -> list[int]:
    """Largest-remainder apportionment of ``target`` rows by traffic share (every cluster >= 1)."""
    raw = [cluster.share * target for cluster in clusters]
    quotas = [max(1, int(value)) for value in raw]
    order = sorted(range(len(raw)), key=lambda c: raw[c] - int(raw[c]), reverse=True)
    for c in itertools.islice(itertools.cycle(order), max(0, target - sum(quotas))):
        quotas[c] += 1
    return quotas


def select_for_traffic(
    traffic_prompts: Sequence[str],
    pool_batches: Iterable[pa.RecordBatch | pa.Table],
    *,
    excluded_keys: Set[str],
    settings: SelectionSettings | None = None,
    messages_column: str = MESSAGES_COLUMN,
) -> TrafficSelection:
    """Stream ``pool_batches`` once and keep, per traffic cluster, the rows nearest to the traffic.

    ``excluded_keys``: problem keys (``data.splits.problem_key``) of every test split: such a row is
    never selected, for training or for the slice. Pool batches need ``id`` and ``messages_column``.
    """
    settings = settings or SelectionSettings()
    index = TrafficIndex(traffic_prompts, settings)
    heaps = [_Heap(quota) for quota in _quotas(index.clusters, settings.target_rows)]
    turned_away = _Heap(settings.target_rows)  # fills the quota of clusters the pool cannot fill
    edges = np.linspace(0.0, 1.0, settings.histogram_bins + 1)
    pool_histogram = np.zeros(settings.histogram_bins, dtype=np.int64)
    chosen: dict[str, int] = {}  # problem key -> heap holding it (one row per problem)
    counts = {"pool": 0, "test": 0, "no_prompt": 0, "duplicate": 0, "below": 0}
    schema: pa.Schema | None = None
    order = 0
    for batch in pool_batches:
        missing = {"id", messages_column} - set(batch.schema.names)
        if missing:
            raise ValueError(f"pool batch has no {sorted(missing)} column(s) (columns: {batch.schema.names})")
        schema = schema or batch.schema
        prompts = first_user_prompts(batch, messages_column)
        counts["pool"] += len(prompts)
        present = [i for i, prompt in enumerate(prompts) if prompt and prompt.strip()]
        counts["no_prompt"] += len(prompts) - len(present)
        if not present:
            continue
        similarity, nearest = index.score([prompts[i] for i in present])
        pool_histogram += np.histogram(np.clip(similarity, 0.0, 1.0), bins=edges)[0]
        floors = np.array([heap.floor() for heap in heaps])
        enough = similarity >= settings.min_similarity
        counts["below"] += int((~enough).sum())
        # Only rows that would enter their cluster's heap are converted to Python (a small share).
        candidates = np.flatnonzero(
            enough & ((similarity > floors[nearest]) | (similarity > turned_away.floor()))
        )
        if not len(candidates):
            order += len(prompts)
            continue
        rows = batch.take(pa.array([present[i] for i in candidates])).to_pylist()
        for position, row in zip(candidates.tolist(), rows, strict=True):
            prompt = prompts[present[position]] or ""
            key = problem_key_of_prompt(prompt, str(row.get("id", "")))
            if key in excluded_keys:
                counts["test"] += 1
                continue
            if key in chosen:
                counts["duplicate"] += 1
                continue
            cluster = int(nearest[position])
            chosen[key] = cluster
            evicted = heaps[cluster].push(
                float(similarity[position]), order + present[position], key, row, cluster
            )
            if evicted is not None:
                chosen.pop(evicted[2], None)
                turned_away.push(evicted[0], -evicted[1], evicted[2], evicted[3], evicted[4])
        order += len(prompts)
    shortfall = settings.target_rows - sum(len(heap.items) for heap in heaps)
    extra = [item for item in sorted(turned_away.items, reverse=True) if item[2] not in chosen]
    for item in extra[: max(0, shortfall)]:
        heaps[item[4]].items.append(item)  # no longer used as a heap: only read by _finish
    return _finish(index, heaps, settings, schema, counts, edges, pool_histogram)


def _finish(
    index: TrafficIndex,
    heaps: list[_Heap],
    settings: SelectionSettings,
    schema: pa.Schema | None,
    counts: dict[str, int],
    edges: np.ndarray,
    pool_histogram: np.ndarray,
) -> TrafficSelection:
    training: list[dict[str, Any]] = []
    held_out: list[dict[str, Any]] = []
    similarity: dict[str, float] = {}
    for heap in heaps:
        for score, _, key, row, _ in sorted(heap.items, key=lambda item: item[:2], reverse=True):
            similarity[str(row.get("id"))] = score
            in_slice = split_point(key, TRAFFIC_SLICE_SALT) < settings.traffic_slice_fraction
            (held_out if in_slice else training).append(row)
    selected_scores = np.array(list(similarity.values()), dtype=np.float64)
    schema = schema or pa.schema([])
    stats = SelectionStats(
        pool_rows=counts["pool"],
        selected_rows=len(training) + len(held_out),
        training_rows=len(training),
        traffic_slice_rows=len(held_out),
        dropped_in_test_split=counts["test"],
        dropped_without_prompt=counts["no_prompt"],
        dropped_duplicate_problem=counts["duplicate"],
        below_min_similarity=counts["below"],
        clusters=tuple(
            ClusterSelection(
                cluster,
                heap.quota,
                len(heap.items),
                float(np.mean([item[0] for item in heap.items])) if heap.items else None,
            )
            for cluster, heap in zip(index.clusters, heaps, strict=True)
        ),
        histogram_edges=tuple(float(edge) for edge in edges),
        histogram_pool=tuple(int(n) for n in pool_histogram),
        histogram_selected=tuple(
            int(n) for n in np.histogram(np.clip(selected_scores, 0.0, 1.0), bins=edges)[0]
        ),
        index_bytes=index.index_bytes,
    )
    return TrafficSelection(
        training_rows=pa.Table.from_pylist(training, schema=schema),
        traffic_slice=pa.Table.from_pylist(held_out, schema=schema),
        stats=stats,
        similarity=similarity,
    )


# --------------------------------------------------------------------------------------------- mixing


@dataclass(frozen=True)
class MixResult:
    train: pa.Table  # selected training rows + the kept current training rows
    current_rows_kept: int
    current_rows_read: int
    current_rows_in_slice: int  # current training rows whose problem is in the traffic slice: dropped
    traffic_slice: pa.Table  # the slice without problems the current training split holds


def mix_with_training(
    selection: TrafficSelection,
    current_train_batches: Iterable[pa.RecordBatch | pa.Table],
    *,
    settings: SelectionSettings | None = None,
    messages_column: str = MESSAGES_COLUMN,
) -> MixResult:
    """The retraining split: the selected rows are ``mix_ratio`` of it, the rest current training rows
    (a deterministic sample: the lowest salted hashes of their problem keys, kept in a bounded heap).

    A slice row whose problem the current training split holds is dropped from the slice: the champion
    trained on it, so it would not be held out.
    """
    settings = settings or SelectionSettings()
    selected = selection.training_rows
    wanted = round(selected.num_rows * (1 - settings.mix_ratio) / settings.mix_ratio)
    slice_keys = {
        problem_key_of_prompt(prompt or "", str(row_id)): position
        for position, (prompt, row_id) in enumerate(
            zip(
                first_user_prompts(selection.traffic_slice, messages_column)
                if selection.traffic_slice.num_rows
                else [],
                selection.traffic_slice.column("id").to_pylist() if selection.traffic_slice.num_rows else [],
                strict=True,
            )
        )
    }
    selected_keys = {
        problem_key_of_prompt(prompt or "", str(row_id))
        for prompt, row_id in zip(
            first_user_prompts(selected, messages_column) if selected.num_rows else [],
            selected.column("id").to_pylist() if selected.num_rows else [],
            strict=True,
        )
    }
    keep: list[tuple[float, int, dict[str, Any]]] = []  # max-heap by negated hash point
    seen_in_slice: set[int] = set()
    read = 0
    for batch in current_train_batches:
        prompts = first_user_prompts(batch, messages_column)
        ids = batch.column("id").to_pylist()
        for position, (prompt, row_id) in enumerate(zip(prompts, ids, strict=True)):
            read += 1
            key = problem_key_of_prompt(prompt or "", str(row_id))
            if key in slice_keys:
                seen_in_slice.add(slice_keys[key])
                continue
            if key in selected_keys or wanted == 0:
                continue
            point = split_point(key, TRAFFIC_SLICE_SALT + ":mix")
            if len(keep) < wanted:
                heapq.heappush(keep, (-point, read, batch.slice(position, 1).to_pylist()[0]))
            elif -point > keep[0][0]:
                heapq.heapreplace(keep, (-point, read, batch.slice(position, 1).to_pylist()[0]))
    current = [row for _, _, row in sorted(keep, key=lambda item: (-item[0], item[1]))]
    schema = selected.schema
    train = pa.concat_tables([selected, pa.Table.from_pylist(current, schema=schema)])
    slice_rows = [i for i in range(selection.traffic_slice.num_rows) if i not in seen_in_slice]
    return MixResult(
        train=train,
        current_rows_kept=len(current),
        current_rows_read=read,
        current_rows_in_slice=len(seen_in_slice),
        traffic_slice=selection.traffic_slice.take(pa.array(slice_rows, type=pa.int64())),
    )


def problem_keys(
    test_batches: Iterable[pa.RecordBatch | pa.Table], messages_column: str = MESSAGES_COLUMN
) -> set[str]:
    """The problem keys of a test split (streamed): what the selection must never take."""
    keys: set[str] = set()
    for batch in test_batches:
        for prompt, row_id in zip(
            first_user_prompts(batch, messages_column), batch.column("id").to_pylist(), strict=True
        ):
            keys.add(problem_key_of_prompt(prompt or "", str(row_id)))
    return keys


def iter_batches(table: pa.Table, batch_rows: int) -> Iterator[pa.RecordBatch]:
    """A table as a stream of batches (tests and in-memory pools)."""
    yield from table.to_batches(max_chunksize=batch_rows)
