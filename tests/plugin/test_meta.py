"""The META item's typed record: parsed from the item, written with MetaUpdate, spelled only in meta.py."""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import boto3
from ec2cluster_worker import records
from ec2cluster_worker.config import WorkerConfig

from airflow_ec2cluster.aws.dynamodb import deserialize_item
from airflow_ec2cluster.cluster import ClusterDescriptor, LaunchSpec
from airflow_ec2cluster.defaults import DEFAULT_LOG_SHARDS
from airflow_ec2cluster.hooks.ec2cluster import EC2ClusterHook
from airflow_ec2cluster.meta import (
    ClusterMeta,
    MetaUpdate,
    PendingLaunch,
    claim_launch_params,
    update_meta_params,
)
from tests.plugin.conftest import REGION

PROVIDER = Path(__file__).resolve().parents[2] / "airflow_ec2cluster"
META_MODULE = PROVIDER / "meta.py"
ATTRIBUTES = {f.name for f in dataclasses.fields(ClusterMeta)} | {records.TTL_ATTRIBUTE}
# META attribute names that other vocabularies share: the launch's descriptor (XCom), the worker's
# configuration, the enqueue's XCom and the drain's summary. Every other attribute name is META's alone.
SHARED = (
    {f.name for f in dataclasses.fields(ClusterDescriptor)}
    | {f.name for f in dataclasses.fields(WorkerConfig)}
    | {"enqueued", "enqueued_messages", "replacements_launched"}
    # Launch arguments of the same name (templated fields).
    | {"max_workers", "max_cost"}
)
SPEC = LaunchSpec(image_id="ami-1", instance_type="t3.micro", user_data_b64="IyE=", extra_tags={"team": "a"})


def provider_modules() -> list[Path]:
    return [path for path in sorted(PROVIDER.rglob("*.py")) if path != META_MODULE]


def mentions_meta(expression: ast.expr) -> bool:
    """Whether an expression is (or reads) a META item: a variable called ``*meta``, or get/update_meta()."""
    for node in ast.walk(expression):
        if isinstance(node, ast.Name) and node.id.lower().endswith("meta"):
            return True
        if isinstance(node, ast.Attribute) and node.attr in ("get_meta", "update_meta"):
            return True
    return False


def test_no_module_but_meta_spells_a_meta_attribute():
    offenders = []
    for path in provider_modules():
        for node in ast.walk(ast.parse(path.read_text())):
            where = f"{path.relative_to(PROVIDER.parent)}:{getattr(node, 'lineno', '?')}"
            # The old constants, and the META item's key.
            if isinstance(node, ast.Name) and node.id.startswith("META_"):
                offenders.append(f"{where}: {node.id}")
            if isinstance(node, ast.Attribute) and node.attr == "META_SK":
                offenders.append(f"{where}: records.META_SK")
            # A name only META uses.
            if isinstance(node, ast.Constant) and node.value in ATTRIBUTES - SHARED:
                offenders.append(f"{where}: {node.value!r}")
            # meta["..."] or meta.get("...") on anything called meta.
            if (
                isinstance(node, ast.Subscript)
                and mentions_meta(node.value)
                and isinstance(node.slice, ast.Constant)
                and isinstance(node.slice.value, str)
            ):
                offenders.append(f"{where}: {ast.unparse(node)}")
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "get"
                and mentions_meta(node.func.value)
            ):
                offenders.append(f"{where}: {ast.unparse(node)}")
    assert offenders == []


def test_every_update_field_is_an_attribute_of_the_record():
    settable = {f.name for f in dataclasses.fields(MetaUpdate)} - {"add_reaped"}
    assert settable <= ATTRIBUTES
    assert set(MetaUpdate(add_reaped=1).add_values()) <= ATTRIBUTES


def test_an_update_sets_only_what_it_names_in_field_order():
    update = MetaUpdate(launch_spec=SPEC, region="eu-west-1", num_workers=3, enqueue_complete=False)
    assert list(update.set_values()) == ["region", "enqueue_complete", "num_workers", "launch_spec"]
    assert json.loads(update.set_values()["launch_spec"]) == SPEC.to_dict()
    assert update.add_values() == {} and bool(update)
    assert not MetaUpdate() and MetaUpdate(add_reaped=2).add_values() == {"reaped_total": 2}
    assert bool(MetaUpdate(consecutive_empty=0))  # zero is a value, not "unset"


def test_the_update_request_keeps_created_at_and_refreshes_the_ttl():
    params = update_meta_params(
        "t", "c-1", MetaUpdate(consecutive_empty=2, add_reaped=1), retention_seconds=60
    )
    names = params["ExpressionAttributeNames"]
    values = deserialize_item(params["ExpressionAttributeValues"])
    assert params["UpdateExpression"] == (
        "SET #s0 = :s0, #s1 = :s1, #s2 = :s2, #created = if_not_exists(#created, :created) ADD #a0 :a0"
    )
    assert [names[f"#s{i}"] for i in range(3)] == ["cluster_id", records.TTL_ATTRIBUTE, "consecutive_empty"]
    assert (values[":s0"], values[":s2"], names["#a0"], values[":a0"]) == ("c-1", 2, "reaped_total", 1)
    assert abs(values[":s1"] - values[":created"] - 60) < 1  # expires_at: an int, created_at: now


def test_a_missing_attribute_reads_as_its_default():
    meta = ClusterMeta.from_item({"cluster_id": "c-1"})
    assert meta == ClusterMeta(cluster_id="c-1")
    assert meta.log_shards == DEFAULT_LOG_SHARDS and meta.instance_ids == [] and meta.launch_spec is None
    assert meta.enqueue_finished  # no enqueue wrote it: nothing to wait for
    assert not ClusterMeta.from_item({"enqueued": 5}).enqueue_finished
    assert ClusterMeta.from_item({"enqueued": 5, "enqueue_complete": True}).enqueue_finished


def test_what_the_operators_write_reads_back_typed(aws):
    hook = EC2ClusterHook(aws_conn_id=None, region_name=REGION)
    hook.ensure_state_table("meta-test")
    hook.update_meta(
        "meta-test", "c-1", MetaUpdate(queue_url="q", dlq_url="d", enqueued=25, enqueued_messages=3)
    )
    hook.update_meta(
        "meta-test",
        "c-1",
        MetaUpdate(region=REGION, num_workers=2, log_shards=4, launch_spec=SPEC, instance_ids=["i-1", "i-2"]),
    )
    after = hook.update_meta("meta-test", "c-1", MetaUpdate(launched_at=12.5, add_reaped=1))
    pending = PendingLaunch(generation=0, count=1, token="c-1-r0-n1")
    assert hook.claim_replacement_launch("meta-test", "c-1", pending)
    meta = hook.get_meta("meta-test", "c-1")
    assert meta == ClusterMeta(
        cluster_id="c-1",
        region=REGION,
        queue_url="q",
        dlq_url="d",
        enqueued=25,
        enqueued_messages=3,
        num_workers=2,
        log_shards=4,
        launch_spec=SPEC,
        instance_ids=["i-1", "i-2"],
        launched_at=12.5,
        reaped_total=1,
        replacement_generation=1,
        replacements_launched=1,
        pending_launch=pending,
        created_at=after.created_at,
        expires_at=meta.expires_at,
    )
    assert meta.expires_at >= after.created_at + records.DEFAULT_RETENTION_SECONDS - 1
    assert hook.finish_replacement_launch("meta-test", "c-1", 0, ["i-3"])
    finished = hook.get_meta("meta-test", "c-1")
    assert finished.instance_ids == ["i-1", "i-2", "i-3"] and finished.pending_launch is None
    descriptor = finished.descriptor("meta-test")
    assert (descriptor.launch_spec, descriptor.launch_time, descriptor.num_workers) == (SPEC, 12.5, 2)
    assert hook.get_meta("meta-test", "nope") is None
    item = boto3.client("dynamodb", region_name=REGION).get_item(
        TableName="meta-test", Key={"pk": {"S": records.cluster_pk("c-1")}, "sk": {"S": records.META_SK}}
    )["Item"]
    assert set(deserialize_item(item)) - {records.PK, records.SK} <= ATTRIBUTES


def test_a_claim_counts_against_the_budget_at_once():
    params = claim_launch_params("t", "c-1", PendingLaunch(generation=3, count=2, token="x"))
    values = deserialize_item(params["ExpressionAttributeValues"])
    assert values[":p"] == {"generation": 3, "count": 2, "token": "x"} and values[":n"] == 2
    assert values[":g"] == 3
