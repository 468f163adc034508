"""`incoming_data_sensor`: each new drop under `<storage root>/incoming/` becomes a data_job run (with
LLMFT_INCOMING_SHARDED, each of its files a source_shards partition with its own shard_job run).

Which drops are complete and new is `llmft_assets.storage.incoming.plan_incoming_runs`; this sensor
counts the free slots, and turns the plan into run requests and log lines.
"""

import dagster as dg

from llmft_assets import settings
from llmft_assets.data.raw_sources import SUPPORTED_SUFFIXES
from llmft_assets.defs.data.jobs import data_job, fresh_data_selection
from llmft_assets.defs.data.shards import SOURCE_SHARDS, shard_job, shard_run_requests
from llmft_assets.defs.storage_resources import StorageResource
from llmft_assets.run_tags import TAG_INCOMING_DROP, TAG_INCOMING_FINGERPRINT, TAG_TRIGGER
from llmft_assets.storage.incoming import DROP_READY_MARKER, IncomingPlan, incoming_uri, plan_incoming_runs

_IN_FLIGHT = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


def incoming_runs_in_flight(instance: dg.DagsterInstance) -> int:
    return instance.get_runs_count(filters=dg.RunsFilter(tags={TAG_TRIGGER: "incoming"}, statuses=_IN_FLIGHT))


def _drop_requests(
    plan: IncomingPlan, storage: StorageResource, selection: list[dg.AssetKey]
) -> tuple[list[dg.RunRequest], list[str]]:
    """A data_job run per drop; with LLMFT_INCOMING_SHARDED, a shard_job run per file of each drop (the
    files registered as source_shards partitions, returned for the sensor to add)."""
    requests: list[dg.RunRequest] = []
    partitions: list[str] = []
    for run in plan.runs:
        run_key = f"incoming-{run.drop.name}-{run.fingerprint}"
        tags = {TAG_INCOMING_DROP: run.drop.name, TAG_INCOMING_FINGERPRINT: run.fingerprint}
        if settings.get().incoming_sharded:
            keys, shard_requests = shard_run_requests(
                storage, run.source, run_key=run_key, tags={TAG_TRIGGER: "incoming_shard", **tags}
            )
            partitions += keys
            requests += shard_requests
            continue
        requests.append(
            dg.RunRequest(
                run_key=run_key,
                job_name=data_job.name,
                run_config={"ops": {"raw_dataset": {"config": {"source": run.source, "config": None}}}},
                asset_selection=selection,
                tags={TAG_TRIGGER: "incoming", **tags},
            )
        )
    return requests, partitions


@dg.sensor(
    jobs=[data_job, shard_job],
    minimum_interval_seconds=settings.get().incoming_sensor_interval_s,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Each new file or folder under <storage root>/incoming/ becomes a data_job run reading "
    f"just that drop (a dataset version). A folder with {DROP_READY_MARKER} is read at once; anything "
    "else once it is unchanged between two evaluations. At most LLMFT_INCOMING_MAX_RUNS such runs are "
    "in flight at once (the rest wait for a later tick); base_model is not re-materialized. With "
    "LLMFT_INCOMING_SHARDED=true each file of a drop becomes a source_shards partition with its own "
    "shard_job run instead (sharded_dataset_splits assembles them).",
)
def incoming_data_sensor(
    context: dg.SensorEvaluationContext, storage: StorageResource
) -> dg.SensorResult | dg.SkipReason:
    backend = storage.backend()
    max_runs = settings.get().incoming_max_runs
    free_slots = max(0, max_runs - incoming_runs_in_flight(context.instance))
    plan = plan_incoming_runs(backend, context.cursor, free_slots=free_slots)
    selection = fresh_data_selection(context.instance)
    for name in plan.not_data:
        context.log.warning(f"drop {name!r} holds no {'/'.join(SUPPORTED_SUFFIXES)} file; left alone")
    run_requests, partitions = _drop_requests(plan, storage, selection)
    for run in plan.runs:
        context.log.info(f"new data drop {run.drop.name!r} ({len(run.drop.keys)} files): {run.source}")
    if plan.waiting_for_slot:
        context.log.info(
            f"{len(plan.waiting_for_slot)} drop(s) wait for a free slot (at most {max_runs} incoming data "
            f"runs at once): {', '.join(plan.waiting_for_slot)}"
        )
    if run_requests:
        return dg.SensorResult(
            run_requests=run_requests,
            cursor=plan.cursor(),
            dynamic_partitions_requests=[SOURCE_SHARDS.build_add_request(partitions)] if partitions else None,
        )
    if plan.waiting_for_slot:
        reason = (
            f"{len(plan.waiting_for_slot)} drop(s) wait for a free slot: {max_runs} incoming data run(s) "
            "already in flight (LLMFT_INCOMING_MAX_RUNS)"
        )
    elif plan.settling:
        reason = f"waiting for {len(plan.settling)} drop(s) to settle: {', '.join(plan.settling)}"
    else:
        reason = f"no new data under {incoming_uri(backend.root_uri)}/"
    return dg.SensorResult(skip_reason=reason, cursor=plan.cursor())
