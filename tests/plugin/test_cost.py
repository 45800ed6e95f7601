"""The cost estimate (pure): instance-seconds by pool from EC2's times, prices, the cap, the price table."""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path

import boto3
import pytest
from botocore.stub import Stubber
from ec2cluster_localcloud import prices as localcloud_prices

from airflow_ec2cluster.commands.refresh_prices import refresh
from airflow_ec2cluster.cost import (
    ON_DEMAND,
    SPOT,
    InstanceUsage,
    cap_reached,
    cluster_usage,
    estimate_cost,
    newly_ended,
    seconds_by_pool,
    stale_spot_pools,
    transition_time,
    usage_of,
    usd_text,
)
from airflow_ec2cluster.drain.decisions import decide
from airflow_ec2cluster.operators.launch import max_cost_problems
from airflow_ec2cluster.pricing.price_list import get_products_params, on_demand_prices
from airflow_ec2cluster.pricing.spot import spot_prices_of
from airflow_ec2cluster.pricing.table import PriceTable, on_demand_table, read_table, write_table
from tests.plugin.test_decisions import NOW, WORK, instance, snapshot, worker

ANSWERS = Path(__file__).parent / "data" / "pricing_get_products_us_east_1.json"


def described(iid, launched, state="running", itype="m5.large", zone="us-east-1a", spot=False, reason=""):
    """An instance as DescribeInstances answers it."""
    item = {
        "InstanceId": iid,
        "InstanceType": itype,
        "Placement": {"AvailabilityZone": zone},
        "State": {"Name": state},
        "LaunchTime": datetime.fromtimestamp(launched, tz=timezone.utc),
        "StateTransitionReason": reason,
    }
    if spot:
        item["InstanceLifecycle"] = "spot"
    return item


def stamp(epoch: float) -> str:
    return f"User initiated ({datetime.fromtimestamp(epoch, tz=timezone.utc):%Y-%m-%d %H:%M:%S} GMT)"


def test_ec2s_transition_stamp_is_read():
    assert transition_time(stamp(NOW)) == NOW
    assert (
        transition_time("User initiated (2026-12-03 17:45:43 UTC)")
        == datetime(2026, 12, 3, 17, 45, 43, tzinfo=timezone.utc).timestamp()
    )
    assert transition_time("") is None and transition_time(None) is None


def test_usage_runs_from_launch_to_ec2s_end_or_now():
    running = usage_of(described("i-1", NOW - 100), NOW)
    assert running.end is None and running.seconds(NOW) == 100 and running.market == ON_DEMAND
    ended = usage_of(described("i-2", NOW - 100, "terminated", spot=True, reason=stamp(NOW - 40)), NOW)
    assert ended.end == NOW - 40 and ended.seconds(NOW + 999) == 60 and ended.market == SPOT
    # No stamp: it ends when a round first saw it ended (an upper bound), never before its launch.
    unstamped = usage_of(described("i-3", NOW - 100, "shutting-down"), NOW)
    assert unstamped.end == NOW
    assert ended.pool == "m5.large/us-east-1a/spot"


def test_ended_instances_are_recorded_once_and_outlive_ec2s_listing():
    listed = [described("i-1", NOW - 100), described("i-2", NOW - 100, "terminated", reason=stamp(NOW - 50))]
    ended = newly_ended(listed, {}, NOW)
    assert list(ended) == ["i-2"]
    assert newly_ended(listed, {"i-2": ended["i-2"].to_dict()}, NOW) == {}
    # An hour later EC2 lists only i-1: the record still counts i-2's 50 s.
    recorded = {"i-2": InstanceUsage.from_dict("i-2", ended["i-2"].to_dict())}
    usage = cluster_usage([described("i-1", NOW - 100)], recorded, NOW + 3600)
    assert seconds_by_pool(usage, NOW + 3600) == {"m5.large/us-east-1a/on-demand": 3700 + 50}


def test_cost_by_pool_with_spot_prices_and_an_unknown_type_said_not_zeroed():
    seconds = {
        "m5.large/us-east-1a/on-demand": 3600.0,
        "m5.large/us-east-1b/spot": 1800.0,
        "x9.mystery/us-east-1a/on-demand": 7200.0,
    }
    estimate = estimate_cost(
        seconds, {"m5.large": 0.096}, {"m5.large/us-east-1b": {"price": 0.04, "at": NOW}}
    )
    assert estimate.usd == pytest.approx(0.096 + 0.02)
    assert estimate.instance_seconds == 12600
    assert [p.instance_type for p in estimate.unpriced] == ["x9.mystery"]
    assert estimate.unpriced_seconds == 7200
    assert "unknown for 7200 instance-seconds (x9.mystery: no price)" in estimate.text()
    # A spot pool with no price looked up yet is unknown too, not the on-demand price.
    assert estimate_cost({"m5.large/us-east-1b/spot": 10.0}, {"m5.large": 0.096}, {}).unpriced


def test_dollars_are_shown_to_the_cent_or_to_what_a_small_figure_needs():
    assert [usd_text(v) for v in (0, 0.0123456, 12.5, 1234.5, 6.9e-05, 1e-9)] == [
        "$0.0000",
        "$0.0123",
        "$12.50",
        "$1,234.50",
        "$0.000069",
        "$0.0000000010",
    ]


def test_cap_is_reached_by_the_priced_estimate():
    estimate = estimate_cost({"m5.large/us-east-1a/on-demand": 3600.0}, {"m5.large": 0.096}, {})
    assert cap_reached(estimate, 0.096) and cap_reached(estimate, 0.05)
    assert not cap_reached(estimate, 0.10) and not cap_reached(estimate, None)


def test_spot_prices_are_looked_up_once_per_pool_per_hour():
    cached = {"m5.large/us-east-1a": {"price": 0.04, "at": NOW - 100}}
    needed = {"m5.large/us-east-1a", "c5.large/us-east-1b"}
    assert stale_spot_pools(needed, cached, NOW) == ["c5.large/us-east-1b"]
    assert sorted(stale_spot_pools(needed, cached, NOW + 3600)) == sorted(needed)


def test_spot_price_history_newest_entry_wins():
    def entry(price, ago):
        at = datetime.fromtimestamp(NOW - ago, tz=timezone.utc)
        return {
            "InstanceType": "m5.large",
            "AvailabilityZone": "us-east-1a",
            "SpotPrice": price,
            "Timestamp": at,
        }

    assert spot_prices_of([entry("0.05", 600), entry("0.04", 60)], NOW) == {
        "m5.large/us-east-1a": {"price": 0.04, "at": NOW}
    }


def capped(**fields):
    estimate = estimate_cost({"m5.large/us-east-1a/on-demand": 3600.0}, {"m5.large": 0.096}, {})
    return snapshot(**fields, cost=estimate, max_cost=0.05)


def test_a_reached_cap_stops_replacements_and_scale_out_and_says_so():
    # One live worker of three wanted, work queued: without the cap, two would be launched.
    live = ([instance("i-1")], [worker("i-1")])
    assert decide(snapshot(*live)).launch == 2
    decision = decide(capped(instances=live[0], workers=live[1]))
    assert decision.launch == 0 and decision.failure is None
    assert "the estimated cost $0.0960 reached max_cost $0.0500" in decision.progress
    assert "no replacement or scale-out is launched" in decision.progress
    uncapped = decide(snapshot(*live, cost=capped(instances=[], workers=[]).cost, max_cost=1.0))
    assert "cost ~$0.0960 of max_cost $1.00" in uncapped.progress and uncapped.launch == 2


def test_a_reached_cap_with_no_worker_left_fails_naming_the_cap():
    decision = decide(capped(instances=[], workers=[], counts=WORK))
    assert decision.launch == 0
    assert "the estimated cost $0.0960 reached max_cost $0.0500" in decision.failure
    assert "raise the launch's max_cost" in decision.failure


@pytest.mark.parametrize("bad", ["abc", -1, 0, "0", math.nan, math.inf, [3]])
def test_max_cost_must_be_a_positive_number(bad):
    (problem,) = max_cost_problems(bad)
    assert problem.startswith(f"max_cost: {bad!r} is not a positive number of US dollars")
    assert "max_cost=25.0" in problem


@pytest.mark.parametrize("good", [None, "", 10, "2.5", 0.01])
def test_max_cost_may_be_absent_or_positive(good):
    assert max_cost_problems(good) == []


def recorded_pages() -> list[dict]:
    return json.loads(ANSWERS.read_text())


def test_price_list_answers_parse_to_hourly_on_demand_prices():
    entries = [entry for page in recorded_pages() for entry in page["PriceList"]]
    # A reservation's unused capacity and a zero price are left out.
    assert on_demand_prices(entries, "us-east-1") == {
        "c7g.large": 0.0725,
        "m5.large": 0.096,
        "t3.micro": 0.0104,
    }
    assert on_demand_prices(entries, "eu-west-1") == {}
    filters = {f["Field"]: f["Value"] for f in get_products_params("eu-west-1")["Filters"]}
    assert filters == {
        "regionCode": "eu-west-1",
        "operatingSystem": "Linux",
        "tenancy": "Shared",
        "preInstalledSw": "NA",
        "capacitystatus": "Used",
        "licenseModel": "No License required",
    }


def stubbed_pricing(pages: list[dict], region: str):
    client = boto3.client(
        "pricing", region_name="us-east-1", aws_access_key_id="k", aws_secret_access_key="s"
    )
    stubber = Stubber(client)
    params = get_products_params(region)
    for index, page in enumerate(pages):
        expected = dict(params, **({"NextToken": pages[index - 1]["NextToken"]} if index else {}))
        stubber.add_response("get_products", page, expected)
    stubber.activate()
    return client, stubber


def test_refresh_writes_the_table_from_the_price_list_pages(tmp_path):
    path = tmp_path / "prices.json"
    write_table(
        PriceTable("2020-01-01", "old", {"us-east-1": {"m5.large": 1.0}, "eu-west-1": {"m5.large": 2.0}}),
        path,
    )
    client, stubber = stubbed_pricing(recorded_pages(), "us-east-1")
    table = refresh(client, path, ["us-east-1"], "2026-12-03")
    stubber.assert_no_pending_responses()  # every page was read (the paginator followed NextToken)
    assert read_table(path) == table
    assert table.as_of == "2026-12-03" and "Price List API" in table.source
    assert table.regions["us-east-1"] == {"c7g.large": 0.0725, "m5.large": 0.096, "t3.micro": 0.0104}
    assert table.regions["eu-west-1"] == {"m5.large": 2.0}  # regions not asked for are kept


def test_refresh_of_a_region_without_prices_fails_and_writes_nothing(tmp_path):
    path = tmp_path / "prices.json"
    write_table(PriceTable("2020-01-01", "old", {"us-east-1": {"m5.large": 1.0}}), path)
    before = path.read_text()
    client, _ = stubbed_pricing([{"FormatVersion": "aws_v1", "PriceList": []}], "us-esat-1")
    with pytest.raises(
        ValueError, match="--regions: the Price List API has no EC2 on-demand price for us-esat-1"
    ):
        refresh(client, path, ["us-esat-1"], "2026-12-03")
    assert path.read_text() == before


def test_the_provider_table_has_a_date_and_agrees_with_the_local_clouds_prices():
    table = on_demand_table()
    assert table.as_of and table.for_region("us-east-1")
    # The local cloud ranks CreateFleet's pools by its own table: the estimate must use the same figures.
    assert table.for_region("us-east-1") == localcloud_prices.ON_DEMAND_USD_PER_HOUR
    assert table.for_region("xx-nowhere-1") == {}


def test_a_controller_that_may_not_read_spot_prices_gets_no_price_and_a_fix(monkeypatch, caplog):
    from airflow_ec2cluster.hooks.ec2cluster import EC2ClusterHook

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    hook = EC2ClusterHook(aws_conn_id=None, region_name="us-east-1")
    with Stubber(hook.ec2) as stub:
        stub.add_client_error(
            "describe_spot_price_history", "UnauthorizedOperation", "You are not authorized", 403
        )
        assert hook.current_spot_prices(["c5.large"], NOW) == {}
    assert "ec2:DescribeSpotPriceHistory" in caplog.text and "cost is unknown" in caplog.text
    with Stubber(hook.ec2) as stub:  # any other error is the caller's
        stub.add_client_error("describe_spot_price_history", "RequestLimitExceeded", "slow down", 503)
        with pytest.raises(Exception, match="RequestLimitExceeded"):
            hook.current_spot_prices(["c5.large"], NOW)
