"""Console links: their URLs, what the operators persist, and hidden links on a custom endpoint."""

from __future__ import annotations

from airflow_ec2cluster.get_provider_info import get_provider_info
from airflow_ec2cluster.hooks.ec2cluster import EC2ClusterHook
from airflow_ec2cluster.links import (
    CLUSTER_LINKS,
    EC2ClusterInstancesLink,
    EC2ClusterQueueLink,
    EC2ClusterStateTableLink,
    link_values,
    persist_cluster_links,
)
from airflow_ec2cluster.operators import EC2ClusterLaunchOperator, EC2ClusterTeardownOperator
from airflow_ec2cluster.sensors.ec2cluster import QueueDrainedSensor
from tests.plugin.conftest import FakeTaskInstance

QUEUE_URL = "https://sqs.eu-west-1.amazonaws.com/123456789012/job-1a2b-tasks"


def formatted(link, **values) -> str:
    return link.format_link(region_name="eu-west-1", aws_domain="aws.amazon.com", **values)


def test_link_urls_are_region_aware_and_escaped():
    values = link_values(cluster_id="job-1a2b", queue_url=QUEUE_URL, state_table="ec2cluster-state")
    assert formatted(EC2ClusterInstancesLink(), **values[EC2ClusterInstancesLink.key]) == (
        "https://console.aws.amazon.com/ec2/home?region=eu-west-1#Instances:tag:ec2cluster:cluster-id=job-1a2b"
    )
    assert formatted(EC2ClusterQueueLink(), **values[EC2ClusterQueueLink.key]) == (
        "https://console.aws.amazon.com/sqs/v3/home?region=eu-west-1#/queues/"
        "https%3A%2F%2Fsqs.eu-west-1.amazonaws.com%2F123456789012%2Fjob-1a2b-tasks"
    )
    assert formatted(EC2ClusterStateTableLink(), **values[EC2ClusterStateTableLink.key]) == (
        "https://console.aws.amazon.com/dynamodbv2/home?region=eu-west-1#item-explorer?table=ec2cluster-state"
    )
    china = EC2ClusterStateTableLink().format_link(
        region_name="cn-north-1", aws_domain=EC2ClusterStateTableLink.get_aws_domain("aws-cn"), table="t"
    )
    assert china.startswith("https://console.amazonaws.cn/dynamodbv2/home?region=cn-north-1")


class Operator:
    do_xcom_push = True


def test_links_are_persisted_on_aws_and_recorded_absent_on_a_custom_endpoint(aws, monkeypatch):
    hook = EC2ClusterHook(aws_conn_id=None, region_name="eu-west-1")
    ti = FakeTaskInstance("d", "r")
    assert persist_cluster_links(
        {"ti": ti}, Operator(), hook, cluster_id="job-1a2b", queue_url=QUEUE_URL, state_table="tbl"
    )
    assert ti.pushed[EC2ClusterInstancesLink.key] == {
        "region_name": "eu-west-1",
        "aws_domain": "aws.amazon.com",
        "cluster_id": "job-1a2b",
    }
    assert set(ti.pushed) == {
        EC2ClusterInstancesLink.key,
        EC2ClusterQueueLink.key,
        EC2ClusterStateTableLink.key,
    }

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:5000")
    local = FakeTaskInstance("d", "r")
    assert not persist_cluster_links(
        {"ti": local}, Operator(), hook, cluster_id="job-1a2b", queue_url=QUEUE_URL, state_table="tbl"
    )
    # Every declared link has a value (so Airflow logs no "XCom not found"), and each is empty (hidden).
    assert local.pushed == {
        EC2ClusterInstancesLink.key: {},
        EC2ClusterQueueLink.key: {},
        EC2ClusterStateTableLink.key: {},
    }
    assert all(link.format_link(**(local.pushed[link.key] or {})) == "" for link in CLUSTER_LINKS)

    no_queue = FakeTaskInstance("d", "r")
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    persist_cluster_links(
        {"ti": no_queue}, Operator(), hook, cluster_id="job-1a2b", queue_url=None, state_table="tbl"
    )
    assert no_queue.pushed[EC2ClusterQueueLink.key] == {}
    assert no_queue.pushed[EC2ClusterStateTableLink.key]["table"] == "tbl"


def test_launch_sensor_and_teardown_carry_the_links_and_the_provider_lists_them():
    names = {"EC2 Cluster Instances", "EC2 Cluster Queue", "EC2 Cluster State Table"}
    for operator_class in (EC2ClusterLaunchOperator, QueueDrainedSensor, EC2ClusterTeardownOperator):
        assert {link.name for link in operator_class.operator_extra_links} == names
    info = get_provider_info()
    assert "airflow_ec2cluster.links.EC2ClusterQueueLink" in info["extra-links"]
    assert info["triggers"][0]["python-modules"] == ["airflow_ec2cluster.triggers.ec2cluster"]
