"""EC2ClusterLaunchOperator: validate everything, then start the workers with one EC2 Fleet launch."""

from __future__ import annotations

import base64
import math
import re
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.providers.amazon.aws.operators.base_aws import AwsBaseOperator
from airflow.providers.amazon.aws.utils.mixins import aws_template_fields
from airflow.sdk.exceptions import AirflowException

from airflow_ec2cluster.aws.fleet import requirement_problems, types_matching
from airflow_ec2cluster.aws.logs import LOGS_SERVICE, retention_problems
from airflow_ec2cluster.aws.s3 import bundle_object_key
from airflow_ec2cluster.bundle import Bundle, BundleError, Target, build_bundle, module_code_path
from airflow_ec2cluster.calls import run_sync
from airflow_ec2cluster.capacity import after_launch, launch_workers, min_count_for
from airflow_ec2cluster.cluster import (
    CAPACITY_CHOICES,
    ON_DEMAND,
    SPOT,
    TAG_LAUNCH_TOKEN,
    ClusterDescriptor,
    LaunchSpec,
    dead_letter_queue_name,
    launch_client_token,
    log_group_name,
    task_queue_name,
)
from airflow_ec2cluster.defaults import (
    DEFAULT_BOOT_TIMEOUT,
    DEFAULT_BUNDLE_BUCKET_FORMAT,
    DEFAULT_BUNDLE_PREFIX,
    DEFAULT_INSTANCE_PROFILE,
    DEFAULT_LOG_RETENTION_DAYS,
    DEFAULT_LOG_SHARDS,
    DEFAULT_METADATA_HOP_LIMIT,
    DEFAULT_ON_DEMAND_STRATEGY,
    DEFAULT_PYTHONS,
    DEFAULT_ROOT_VOLUME_GB,
    DEFAULT_SPOT_STRATEGY,
    DEFAULT_STATE_TABLE,
)
from airflow_ec2cluster.drain.decisions import CAPACITY_STATES
from airflow_ec2cluster.drain.round import log_launch
from airflow_ec2cluster.hooks.ec2cluster import EC2ClusterHook
from airflow_ec2cluster.links import CLUSTER_LINKS
from airflow_ec2cluster.meta import ClusterMeta, MetaUpdate
from airflow_ec2cluster.operators.base import ClusterOperatorMixin, as_bool
from airflow_ec2cluster.preflight import (
    NETWORK_MODES,
    PUBLIC,
    SubnetReport,
    architecture_problem,
    launch_reports,
)

if TYPE_CHECKING:
    from airflow.sdk import Context


class EC2ClusterLaunchOperator(ClusterOperatorMixin, AwsBaseOperator[EC2ClusterHook]):
    """Launch the cluster's workers with EC2 Fleet (CreateFleet, ``instant``), after validating everything.

    The workers may run in any *pool*: each of ``instance_type`` (one type or a list, in order of
    preference) in each subnet, in the markets ``capacity`` names: ``"on-demand"``, ``"spot"`` (also
    ``spot=True``), or ``"spot-then-on-demand"`` (on-demand for what spot could not start). Spot pools are
    chosen by ``spot_strategy`` (``price-capacity-optimized``), on-demand ones by ``on_demand_strategy``
    (``lowest-price``, or ``prioritized``: the order given). EC2 starts what capacity allows: at least
    ``min_workers`` (default 1) are kept, else none, and the drain launches the rest as capacity comes
    back, and grows the cluster up to ``max_workers`` (default ``num_workers``) while queued work exceeds it
    (see :mod:`airflow_ec2cluster.capacity`). A launch short of capacity never fails the task: the drain
    fails the run only when no worker could be launched for its ``capacity_timeout``.

    ``max_cost`` (USD, recorded in META for the drain): once the cluster's estimated cost (instance-seconds
    by pool from EC2's own times, at the on-demand table's and DescribeSpotPriceHistory's prices; see
    :mod:`airflow_ec2cluster.cost`) reaches it, the drain launches no replacement and no scale-out and says
    so; the workers already running finish what they hold, so the final cost can pass it.

    Validation comes first and launches nothing when anything is wrong: the worker configuration (with the
    worker's own ``WorkerConfig.from_dict``), the user data size, the AMI, instance type, subnet, security
    groups and instance profile; one error lists every problem with its fix. The launch spec is recorded in
    the cluster's META item before launching and the instance ids right after, so the sensor can launch
    replacements and teardown finds everything by tag. When anything fails after the launch, or the task is
    killed, the instances it started are terminated.

    Running it again (an Airflow retry, or clearing the launch and drain tasks after a failure; see
    :func:`plan_launch`): while the cluster has live instances it launches nothing (a retry never launches
    twice: RunInstances carries a ClientToken of the launch generation, and an unrecorded launch is found
    by it); once none is left it starts a new launch generation from its current arguments (the launch spec
    and the cluster's bundle are replaced, so replacements use them too), with as many workers as the
    work still queued needs and a fresh replacement budget for the drain. Tasks already done are not run
    again: the workers skip tasks the task log holds as done.

    The workers run only the cluster's bundle, built here before anything is created (see
    :mod:`airflow_ec2cluster.bundle`): ``code`` (module files or package folders; by default the handler's
    and a custom output's modules when they sit beside the DAG file) and ``requirements`` (wheels for
    ``python_version`` and the AMI's architecture), stored in ``bundle_bucket`` and checked by SHA-256 at
    boot; ``python`` names the image's interpreters to try, ``boot_timeout`` and ``max_lifetime`` arm each
    instance's own watchdog.

    ``slots_per_instance`` tasks run at once on each instance (default: the instance's vCPUs for a command
    handler or a Python handler with ``"isolation": "process"``, else 1; see DESIGN.md "Slots").
    ``worker_options`` holds any other worker configuration field (``output``, ``task_timeout_seconds``,
    ``idle_shutdown_seconds``...; see DESIGN.md). Returns the :class:`ClusterDescriptor` as a dict.
    """

    aws_hook_class = EC2ClusterHook
    template_fields: Sequence[str] = aws_template_fields(
        "cluster_id",
        "num_workers",
        "min_workers",
        "max_workers",
        "max_cost",
        "capacity",
        "on_demand_strategy",
        "spot_strategy",
        "image_id",
        "instance_type",
        "instance_requirements",
        "handler",
        "worker_options",
        "slots_per_instance",
        "subnet_ids",
        "subnet_id",
        "network",
        "security_group_ids",
        "instance_profile",
        "key_name",
        "queue_url",
        "state_table",
        "code",
        "requirements",
        "python",
        "python_version",
        "bundle_bucket",
        "bundle_prefix",
        "boot_timeout",
        "max_lifetime",
        "tags",
        "spot",
        "spot_max_price",
        "metadata_hop_limit",
        "volume_size_gb",
        "log_retention_days",
    )
    template_fields_renderers = {"handler": "json", "worker_options": "json"}
    operator_extra_links = CLUSTER_LINKS
    ui_color = "#ffcc80"

    def __init__(
        self,
        *,
        num_workers: int,
        min_workers: int | None = None,
        max_workers: int | None = None,
        max_cost: float | None = None,
        image_id: str,
        instance_type: str | list[str] | None = None,
        instance_requirements: dict[str, Any] | None = None,
        capacity: str | None = None,
        on_demand_strategy: str = DEFAULT_ON_DEMAND_STRATEGY,
        spot_strategy: str = DEFAULT_SPOT_STRATEGY,
        handler: dict[str, Any],
        worker_options: dict[str, Any] | None = None,
        slots_per_instance: int | None = None,
        cluster_id: str | None = None,
        state_table: str = DEFAULT_STATE_TABLE,
        queue_url: str | None = None,
        subnet_ids: list[str] | None = None,
        subnet_id: str | None = None,
        network: str = PUBLIC,
        security_group_ids: list[str] | None = None,
        instance_profile: str | None = DEFAULT_INSTANCE_PROFILE,
        key_name: str | None = None,
        spot: bool = False,
        spot_max_price: str | None = None,
        metadata_hop_limit: int = DEFAULT_METADATA_HOP_LIMIT,
        volume_size_gb: int | None = None,
        code: str | list[str] | None = None,
        requirements: list[str] | None = None,
        python: str | list[str] = DEFAULT_PYTHONS,
        python_version: str | None = None,
        bundle_bucket: str | None = None,
        bundle_prefix: str = DEFAULT_BUNDLE_PREFIX,
        boot_timeout: int = DEFAULT_BOOT_TIMEOUT,
        max_lifetime: int | None = None,
        tags: dict[str, str] | None = None,
        terminate_on_failure: bool = True,
        log_retention_days: int | None = DEFAULT_LOG_RETENTION_DAYS,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.num_workers = num_workers
        self.min_workers = min_workers
        self.max_workers = max_workers
        self.max_cost = max_cost
        self.capacity = capacity
        self.on_demand_strategy = on_demand_strategy
        self.spot_strategy = spot_strategy
        self.image_id = image_id
        self.instance_type = instance_type
        self.instance_requirements = instance_requirements
        self.handler = handler
        self.worker_options = worker_options or {}
        self.slots_per_instance = slots_per_instance
        self.cluster_id = cluster_id
        self.state_table = state_table
        self.queue_url = queue_url
        self.subnet_ids = subnet_ids or []
        self.subnet_id = subnet_id
        self.network = network
        self.security_group_ids = security_group_ids or []
        self.instance_profile = instance_profile
        self.key_name = key_name
        self.spot = spot
        self.spot_max_price = spot_max_price
        self.metadata_hop_limit = metadata_hop_limit
        self.volume_size_gb = volume_size_gb
        self.code = code
        self.requirements = requirements or []
        self.python = python
        self.python_version = python_version
        self.bundle_bucket = bundle_bucket
        self.bundle_prefix = bundle_prefix
        self.boot_timeout = boot_timeout
        self.max_lifetime = max_lifetime
        self._bundle: Bundle | None = None
        self._bundle_location: tuple[str, str] | None = None
        self.tags = tags or {}
        self.terminate_on_failure = terminate_on_failure
        self.log_retention_days = log_retention_days
        self._launched_ids: list[str] = []
        self._vpc_id: str | None = None
        self._subnet_zones: dict[str, str] = {}

    def execute(self, context: Context) -> dict[str, Any]:
        cluster_id = self.resolve_cluster_id(context)
        hook = self.hook
        hook.ensure_state_table(self.state_table)
        self.persist_links(context, hook, cluster_id, self.state_table)
        meta = hook.get_meta(self.state_table, cluster_id) or ClusterMeta(cluster_id=cluster_id)
        live = [i["InstanceId"] for i in hook.list_cluster_instances(cluster_id, CAPACITY_STATES)]
        if live and meta.launch_spec is None:
            raise AirflowException(
                f"instances {live} are tagged with cluster {cluster_id} but it has no launch record: "
                "tear the cluster down (EC2ClusterTeardownOperator) or use another cluster_id"
            )

        queue_url, dlq_url = self.resolve_queues(hook, cluster_id)
        config = self.worker_config(cluster_id, hook.region, queue_url)
        spec = self.validated_spec(hook, config, code_search_dirs(context))
        if spec.log_group:
            hook.ensure_log_group(spec.log_group, cluster_id, int(self.log_retention_days), dict(self.tags))
            self.log.info(
                "Cluster %s: the workers' logs go to CloudWatch Logs group %s (kept %s days; read them with "
                "`ec2cluster logs %s`)",
                cluster_id,
                spec.log_group,
                self.log_retention_days,
                cluster_id,
            )
        if not spec.security_group_ids:
            spec = replace(spec, security_group_ids=[self.cluster_security_group(hook, cluster_id, spec)])
        spec = replace(spec, launch_template_id=hook.ensure_launch_template(cluster_id, spec))
        num_workers = int(self.num_workers)
        work = None
        if meta.current_generation and meta.enqueue_finished and not live:
            # A re-run: start only the workers the work still queued needs (held messages count).
            work = hook.queue_counts(queue_url, dlq_url).work
        plan = plan_launch(meta, live, spec, num_workers, work)
        self.log.info("Cluster %s: %s", cluster_id, plan.why)
        self.store_bundle(hook, cluster_id)
        common = MetaUpdate(
            region=hook.region,
            queue_url=queue_url,
            dlq_url=dlq_url,
            num_workers=num_workers,
            max_workers=int(self.max_workers) if self.max_workers not in (None, "") else num_workers,
            max_cost=max_cost_of(self.max_cost) or 0.0,  # 0: no cap (replaces an earlier generation's)
            log_shards=int(config.get("log_shards") or DEFAULT_LOG_SHARDS),
            launch_spec=spec,
        )
        if plan.action == ADOPT:
            known = list(meta.instance_ids)
            every = known + [i for i in live if i not in known]
            adopt = replace(
                common,
                instance_ids=every,
                launched_generation=plan.generation,
                launched_at=meta.launched_at or time.time(),
            )
            if plan.renew:
                adopt = replace(adopt, retired_instance_ids=every, replacements_launched=0)
            meta = hook.update_meta(self.state_table, cluster_id, adopt)
            return replace(meta.descriptor(self.state_table), instance_ids=sorted(live)).to_dict()
        if plan.action == START:
            started = hook.start_launch_generation(
                self.state_table,
                cluster_id,
                meta.launch_generation,
                replace(
                    common,
                    launch_generation=plan.generation,
                    launch_count=plan.count,
                    retired_instance_ids=list(meta.instance_ids),
                    replacements_launched=0,
                    consecutive_empty=0,
                ),
            )
            if started is None:
                raise AirflowException(
                    f"cluster {cluster_id}: another launch try started launch generation {plan.generation} "
                    "at the same time; this one launched nothing (run only one launch task per cluster)"
                )
            meta = started
        else:
            meta = hook.update_meta(self.state_table, cluster_id, common)
        return self.launch_generation(context, hook, meta, plan, spec).to_dict()

    def launch_generation(
        self, context: Context, hook: EC2ClusterHook, meta: ClusterMeta, plan: LaunchPlan, spec: LaunchSpec
    ) -> ClusterDescriptor:
        """CreateFleet for ``plan`` (its ClientToken: a retried call starts nothing new), then record."""
        cluster_id = meta.cluster_id
        launched_at = time.time()
        outcome = None
        if plan.count:
            self.log.info(
                "Cluster %s: launching %d worker(s) from %s over %s in %s, %s (launch generation %d)",
                cluster_id,
                plan.count,
                spec.image_id,
                ", ".join(spec.types()),
                ", ".join(spec.subnet_ids) or "the default subnets",
                " then ".join(spec.markets()),
                plan.generation,
            )
            outcome = run_sync(
                launch_workers(
                    cluster_id,
                    spec,
                    plan.count,
                    plan.token,
                    min_count=min_count_for(spec, plan.count, 0),
                    extra_tags={TAG_LAUNCH_TOKEN: plan.token},
                ),
                hook,
            )
            self._launched_ids = outcome.instance_ids
            log_launch(outcome, "", self.log)
            if not outcome.instances:
                self.log.warning(
                    "Cluster %s: no worker started now; the drain launches as capacity comes back and "
                    "fails the run when none could be launched for its capacity_timeout",
                    cluster_id,
                )
        else:
            self.log.info("Cluster %s: no work left in the queue; launching no worker", cluster_id)
        try:
            known = list(meta.instance_ids)
            meta = hook.update_meta(
                self.state_table,
                cluster_id,
                replace(
                    after_launch(meta, outcome, launched_at, 0) if outcome else MetaUpdate(),
                    instance_ids=known + [i for i in self._launched_ids if i not in known],
                    launched_at=launched_at,
                    launched_generation=plan.generation,
                ),
            )
            context["ti"].xcom_push(key="instance_ids", value=self._launched_ids)
            if self._launched_ids:
                self.log.info("Cluster %s: launched %s", cluster_id, ", ".join(self._launched_ids))
            return replace(meta.descriptor(self.state_table), instance_ids=list(self._launched_ids))
        except BaseException:
            if self.terminate_on_failure and self._launched_ids:
                self.log.error(
                    "Cluster %s: failed after launching; terminating %s", cluster_id, self._launched_ids
                )
                hook.terminate_instances(self._launched_ids, wait=False)
            raise

    def on_kill(self) -> None:
        if self._launched_ids and self.terminate_on_failure:
            self.log.info("on_kill: terminating %s", ", ".join(self._launched_ids))
            self.hook.terminate_instances(self._launched_ids, wait=False)
        super().on_kill()

    def cluster_security_group(self, hook: EC2ClusterHook, cluster_id: str, spec: LaunchSpec) -> str:
        """The cluster's own group (no inbound rules, all egress), made once every check passed (the
        preflight found the subnets' VPC); teardown deletes it."""
        vpc_id = self._vpc_id
        group_id = hook.ensure_cluster_security_group(cluster_id, vpc_id)
        self.log.info("Cluster %s: security group %s (no inbound rules) in %s", cluster_id, group_id, vpc_id)
        return group_id

    def resolve_queues(self, hook: EC2ClusterHook, cluster_id: str) -> tuple[str, str]:
        queue_url = self.queue_url or hook.get_queue_url(task_queue_name(cluster_id))
        dlq_url = hook.get_queue_url(dead_letter_queue_name(cluster_id))
        if not queue_url or not dlq_url:
            raise AirflowException(
                f"cluster {cluster_id} has no task queue ({task_queue_name(cluster_id)}) or dead-letter "
                f"queue ({dead_letter_queue_name(cluster_id)}): run EC2ClusterEnqueueOperator with the same "
                "cluster_id first"
            )
        return queue_url, dlq_url

    def worker_config(self, cluster_id: str, region: str, queue_url: str) -> dict[str, Any]:
        # The log group is the cluster's (the policies allow no other); log_retention_days=None: none.
        shipping = self.log_retention_days is not None
        slots = self.slots_per_instance
        if isinstance(slots, str) and slots.strip().isdigit():  # a rendered template
            slots = int(slots)
        return {
            **self.worker_options,
            **({} if slots in (None, "") else {"slots_per_instance": slots}),
            "cluster_id": cluster_id,
            "region": region,
            "queue_url": queue_url,
            "state_table": self.state_table,
            "handler": self.handler,
            "log_group": log_group_name(cluster_id) if shipping else None,
        }

    def validated_spec(
        self, hook: EC2ClusterHook, config: dict[str, Any], code_dirs: Sequence[Path] = ()
    ) -> LaunchSpec:
        """The launch spec, or an AirflowException listing every problem (nothing is launched)."""
        from ec2cluster_worker.config import ConfigError, WorkerConfig

        from airflow_ec2cluster.userdata import CredentialsInUserData, UserDataTooLarge, render_user_data

        problems: list[str] = []
        try:
            num_workers = int(self.num_workers)
            if num_workers < 1:
                raise ValueError
        except (TypeError, ValueError):
            problems.append(f"num_workers: {self.num_workers!r} is not a positive integer")
        problems.extend(min_workers_problems(self.min_workers, self.num_workers))
        problems.extend(queue_region_problems(config["queue_url"], hook.region))
        output_table = (config.get("output") or {}).get("table")
        if output_table and not hook.table_exists(output_table):
            problems.append(
                f"worker_options.output.table: DynamoDB table {output_table!r} not found in {hook.region}; "
                "create it (pk and sk string keys) or leave 'table' out to store results in the state table"
            )
        config_ok = True
        try:
            WorkerConfig.from_dict(config)
        except ConfigError as error:
            problems.append(f"worker configuration: {error}")
            config_ok = False
        problems.extend(lifetime_problems(self.boot_timeout, self.max_lifetime))
        problems.extend(retention_problems(self.log_retention_days))
        if not 1 <= int(self.metadata_hop_limit) <= 64:
            problems.append("metadata_hop_limit: use 1 (2 when containers on the instance need metadata)")
        image = hook.describe_image(self.image_id)
        if image is None:
            problems.append(
                f"image_id: AMI {self.image_id!r} not found in {hook.region}; check the id and region"
            )
        named = instance_types_of(self.instance_type)
        types_problems, types = self.matched_types(hook, image, named)
        problems.extend(types_problems)
        for name in named:  # the matched ones come from DescribeInstanceTypes already
            instance_type = hook.describe_instance_type(name)
            if instance_type is None:
                problems.append(f"instance_type: {name!r} is not an EC2 instance type (e.g. 'c7g.large')")
            arch_problem = architecture_problem(image, instance_type)
            if arch_problem:
                problems.append(arch_problem)
        problems.extend(
            capacity_problems(
                self.capacity,
                self.spot,
                self.on_demand_strategy,
                self.spot_strategy,
                self.max_workers,
                self.num_workers,
            )
        )
        problems.extend(max_cost_problems(self.max_cost))
        if image is not None:
            problems.extend(self.bundle_problems(hook, config, image, code_dirs))
        user_data = b""
        if config_ok and self._bundle is not None and self._bundle_location is not None:
            bucket, key = self._bundle_location
            try:
                user_data = render_user_data(
                    config,
                    bundle={
                        "sha256": self._bundle.sha256,
                        "size": self._bundle.size,
                        "s3": {"bucket": bucket, "key": key},
                    },
                    python=[self.python] if isinstance(self.python, str) else list(self.python),
                    python_version=self.python_version or None,
                    min_python_version=self._bundle.manifest["min_python_version"],
                    boot_timeout=int(self.boot_timeout),
                    max_lifetime=None if self.max_lifetime in (None, "") else int(self.max_lifetime),
                )
            except (UserDataTooLarge, CredentialsInUserData) as error:
                problems.append(f"user data: {error}")
            except ValueError as error:  # python / python_version
                problems.append(str(error))
        subnet_ids, network_problems = self.network_preflight(hook, config)
        problems.extend(network_problems)
        if self.instance_profile and not hook.instance_profile_exists(self.instance_profile):
            problems.append(
                f"instance_profile: IAM instance profile {self.instance_profile!r} not found; create it "
                "with a role that may use the queue and the state table, or pass an existing one"
            )
        if problems:
            raise AirflowException(
                "cannot launch the cluster, nothing was launched:\n  - " + "\n  - ".join(problems)
            )
        return LaunchSpec(
            image_id=self.image_id,
            instance_type=types[0],
            instance_types=types,
            capacity=capacity_of(self.capacity, self.spot),
            on_demand_strategy=self.on_demand_strategy,
            spot_strategy=self.spot_strategy,
            min_workers=int(self.min_workers or 1),
            subnet_zones=dict(self._subnet_zones),
            user_data_b64=base64.b64encode(user_data).decode("ascii"),
            instance_profile=self.instance_profile,
            subnet_ids=subnet_ids,
            security_group_ids=list(self.security_group_ids),
            key_name=self.key_name,
            spot=as_bool(self.spot),
            spot_max_price=self.spot_max_price,
            associate_public_ip=self.network == PUBLIC,
            metadata_hop_limit=int(self.metadata_hop_limit),
            root_device_name=(image or {}).get("RootDeviceName"),
            volume_size_gb=root_volume_size(image, self.volume_size_gb),
            extra_tags=dict(self.tags),
            bundle_bucket=self._bundle_location[0] if self._bundle_location else None,
            bundle_prefix=self.bundle_prefix,
            log_group=config.get("log_group"),
        )

    def matched_types(
        self, hook: EC2ClusterHook, image: dict[str, Any] | None, types: list[str]
    ) -> tuple[list[str], list[str]]:
        """``instance_type`` followed by the types ``instance_requirements`` matches for the AMI's
        architecture (DescribeInstanceTypes, current generation); the problems, and the types."""
        requirements = self.instance_requirements
        if requirements in (None, {}):
            if types:
                return [], types
            return [
                f"instance_type: {self.instance_type!r} names no instance type; give one (e.g. 'c7g.large'), "
                "a list of them in order of preference, or instance_requirements (vCPU and memory ranges)"
            ], types
        problems = requirement_problems(requirements)
        if problems or image is None:
            return problems, types
        architecture = image.get("Architecture") or "x86_64"
        matched = types_matching(requirements, hook.current_instance_types(architecture))
        if not matched:
            memory = requirements.get("memory_gib", "any")
            return [
                f"instance_requirements: no current-generation {architecture} instance type has "
                f"{requirements['vcpus']} vCPUs and {memory} GiB; widen the ranges"
            ], types
        self.log.info("instance_requirements %s match: %s", requirements, ", ".join(matched))
        return [], list(dict.fromkeys([*types, *matched]))

    def bundle_problems(
        self, hook: EC2ClusterHook, config: dict[str, Any], image: dict[str, Any], code_dirs: Sequence[Path]
    ) -> list[str]:
        """Build the cluster's bundle (airflow_ec2cluster.bundle) for the image's architecture and check
        where it will be stored; every problem, naming the parameter and the fix."""
        code = self.code_paths(config, code_dirs)
        try:
            target = Target(
                python_version=self.python_version or None, architecture=image.get("Architecture") or "x86_64"
            )
            bundle = build_bundle(code, self.requirements, target)
        except BundleError as error:
            return [str(error)]
        self.log.info(
            "Bundle: %s (%.1f MB, SHA-256 %s, %s in %.1f s): code %s, requirements %s",
            bundle.path.name,
            bundle.size / 1e6,
            bundle.sha256[:12],
            "reused" if bundle.cached else "built",
            bundle.build_seconds,
            [str(path) for path in code] or "none",
            list(self.requirements) or "none",
        )
        problems = user_module_problems(config, bundle)
        bucket = self.bundle_bucket or DEFAULT_BUNDLE_BUCKET_FORMAT.format(
            account=hook.account_id(), region=hook.region
        )
        problem = hook.bundle_bucket_problem(bucket)
        if problem:
            problems.append(problem)
        self._bundle = bundle
        self._bundle_location = (
            bucket,
            bundle_object_key(self.bundle_prefix, config["cluster_id"], bundle.sha256),
        )
        return problems

    def code_paths(self, config: dict[str, Any], code_dirs: Sequence[Path]) -> list[Path]:
        """``code`` as given, else the modules of the handler and of a custom output that sit beside the
        DAG file."""
        if self.code:
            return [Path(p) for p in ([self.code] if isinstance(self.code, (str, Path)) else self.code)]
        found = (module_code_path(module, list(code_dirs)) for module in user_modules(config).values())
        return list(dict.fromkeys(path for path in found if path))

    def store_bundle(self, hook: EC2ClusterHook, cluster_id: str) -> None:
        """Create the bucket when needed and upload the bundle (once every check has passed)."""
        if self._bundle is None or self._bundle_location is None:
            return
        bucket, key = self._bundle_location
        if hook.ensure_bundle_bucket(bucket):
            self.log.info("Bundle bucket s3://%s created (private: public access blocked)", bucket)
        hook.put_bundle(self._bundle.path, bucket, key, self._bundle.sha256)
        self.log.info("Cluster %s: bundle stored at s3://%s/%s", cluster_id, bucket, key)

    def network_preflight(self, hook: EC2ClusterHook, config: dict[str, Any]) -> tuple[list[str], list[str]]:
        """The launch's subnets and every network problem (see airflow_ec2cluster.preflight)."""
        from ec2cluster_worker.config import ConfigError, WorkerConfig
        from ec2cluster_worker.reachability import services_needed

        try:
            services = services_needed(WorkerConfig.from_dict(config))
        except ConfigError:  # reported by validated_spec; check what every worker needs
            services = ["dynamodb", "sqs"]
        services = list(dict.fromkeys([*services, BUNDLE_SERVICE]))  # the boot loader fetches the bundle
        found = check_network(
            hook,
            subnet_ids=self.subnet_ids,
            subnet_id=self.subnet_id,
            network=self.network,
            security_group_ids=list(self.security_group_ids),
            services=services,
            # The workers' logs: without a way to CloudWatch Logs the job still runs (their lines stay on
            # the consoles), so that is said, not refused.
            optional_services=[LOGS_SERVICE] if config.get("log_group") else [],
        )
        self._vpc_id = found.vpc_id
        self._subnet_zones = found.subnet_zones
        for report in found.reports:
            if report.ok:
                self.log.info("Preflight: %s", report_line(report))
        for warning in found.warnings:
            self.log.warning(
                "Preflight: the workers' logs will not reach CloudWatch Logs (their lines stay on the "
                "consoles; or set log_retention_days=None): %s",
                warning,
            )
        return found.subnet_ids, found.problems


@dataclass(frozen=True)
class NetworkCheck:
    subnet_ids: list[str]
    problems: list[str]
    reports: list[SubnetReport]
    vpc_id: str | None
    subnet_zones: dict[str, str] = dataclass_field(default_factory=dict)
    warnings: list[str] = dataclass_field(default_factory=list)  # what only the optional services lack


def check_network(
    hook: EC2ClusterHook,
    *,
    subnet_ids: list[str],
    subnet_id: str | None,
    network: str,
    security_group_ids: list[str],
    services: list[str],
    internet_why: str = "",
    optional_services: list[str] | None = None,
) -> NetworkCheck:
    """Resolve the launch's subnets, read their VPC, and judge each subnet (the launch and ``doctor``);
    what only ``optional_services`` lack is a warning, not a problem."""
    chosen, problems = resolve_subnets(hook, subnet_ids, subnet_id, network)
    missing_groups = hook.missing_security_groups(security_group_ids)
    if missing_groups:
        problems.append(f"security_group_ids: {missing_groups} not found in {hook.region}")
    if problems:
        return NetworkCheck(chosen, problems, [], None)
    facts = hook.network_facts(chosen, security_group_ids)
    found, reports = launch_reports(
        facts,
        chosen,
        mode=network,
        services=services,
        group_ids=security_group_ids,
        internet_why=internet_why,
    )
    zones = {sid: str(facts.subnets[sid].get("AvailabilityZone") or "") for sid in chosen}
    warnings: list[str] = []
    if optional_services:
        with_optional, _ = launch_reports(
            facts,
            chosen,
            mode=network,
            services=[*services, *optional_services],
            group_ids=security_group_ids,
            internet_why=internet_why,
        )
        warnings = [problem for problem in with_optional if problem not in found]
    return NetworkCheck(chosen, found, reports, facts.subnets[chosen[0]]["VpcId"], zones, warnings)


def report_line(report: SubnetReport) -> str:
    """``subnet-1 (us-east-1a): sqs via internet gateway igw-1, ...`` (unreachable: ``sqs: NO PATH``)."""
    parts = [
        f"{destination} via {path.via}" if path is not None else f"{destination}: NO PATH"
        for destination, path in report.paths.items()
    ]
    return f"{report.subnet_id} ({report.zone}): {', '.join(parts)}"


def resolve_subnets(
    hook: EC2ClusterHook, subnet_ids: list[str], subnet_id: str | None, network: str
) -> tuple[list[str], list[str]]:
    """The subnets to launch in (``subnet_ids``, ``subnet_id``, else the default VPC's) and their problems."""
    problems: list[str] = []
    if network not in NETWORK_MODES:
        problems.append(
            f"network: {network!r} is not a network mode; use 'public' (a public IP, through an internet "
            "gateway: a default VPC) or 'private' (no public IP: the subnets' NAT gateway or VPC endpoints)"
        )
    if isinstance(subnet_ids, str):
        subnet_ids = [s.strip() for s in subnet_ids.split(",") if s.strip()]
    chosen = list(dict.fromkeys([*list(subnet_ids or []), *([subnet_id] if subnet_id else [])]))
    if not chosen:
        chosen = hook.default_subnet_ids()
        if not chosen:
            problems.append(
                f"subnet_ids: {hook.region} has no default VPC to launch in; give subnet_ids (subnets of one "
                "VPC, one per availability zone) and network='public' or 'private'"
            )
    missing = hook.missing_subnets(chosen) if subnet_ids or subnet_id else []
    if missing:
        problems.append(f"subnet_ids: {missing} not found in {hook.region}; check the ids and the region")
    return chosen, problems


ADOPT = "adopt"  # live instances: record them, launch nothing
RESUME = "resume"  # a generation started and not recorded: its RunInstances again, same ClientToken
START = "start"  # no live instance: the next generation, with a fresh replacement budget


@dataclass(frozen=True)
class LaunchPlan:
    action: str
    generation: int
    count: int
    token: str
    why: str
    # Adopting live instances with changed arguments (a fix while old workers still run): the workers from
    # now on get a fresh replacement budget, and the earlier ones' stops no longer count towards stopping.
    renew: bool = False


def generation_client_token(cluster_id: str, generation: int) -> str:
    """The ClientToken of launch ``generation`` (at most 64 characters with a 40-character cluster id).

    Generation 1 keeps the token launches had before generations existed, so a retry across an upgrade
    still finds its RunInstances; each later generation has its own, so a re-run after a failure is a new
    launch while a retry of the same generation is not.
    """
    base = launch_client_token(cluster_id)
    return base if generation <= 1 else f"{base}-g{generation}"


def plan_launch(
    meta: ClusterMeta, live_ids: list[str], spec: LaunchSpec, num_workers: int, work: int | None
) -> LaunchPlan:
    """What one run of the launch operator does, from the META item, the cluster's live (pending/running)
    instances, the spec of its current arguments, and ``work``: messages still queued (None: unknown, or the
    first launch: start ``num_workers``).

    Live instances are never added to: they are an earlier try of this launch (an Airflow retry must not
    launch twice) or a drain's workers (the drain keeps the cluster at its size with replacements, which
    use the spec this run records); launching here too would race with it. A generation started and not
    recorded, and not changed since, is retried with its own ClientToken: if its RunInstances went
    through, EC2 answers with those instances instead of starting more. Otherwise (nothing live: the job
    failed, or its workers stopped) the next generation starts with the current spec, as many workers as
    the queued work needs (at most ``num_workers``, none when nothing is left) and a fresh replacement budget.
    """
    cluster_id = meta.cluster_id
    current = meta.current_generation
    if live_ids:
        renew = meta.launch_spec is not None and meta.launch_spec != spec
        return LaunchPlan(
            ADOPT,
            current,
            0,
            generation_client_token(cluster_id, current),
            f"instances {sorted(live_ids)} of launch generation {current} are live; not launching again "
            "(the drain replaces workers that stop, from the launch spec of this run"
            + ("; the arguments changed: a fresh replacement budget)" if renew else ")"),
            renew=renew,
        )
    if current > meta.recorded_generation and meta.launch_spec == spec:
        count = num_workers if meta.launch_count is None else meta.launch_count
        return LaunchPlan(
            RESUME,
            current,
            count,
            generation_client_token(cluster_id, current),
            f"launch generation {current} was started but its instances were not recorded; repeating its "
            "RunInstances with the same ClientToken (it starts nothing new if the first call went through)",
        )
    generation = current + 1
    count = num_workers if work is None else max(0, min(num_workers, work))
    why = (
        f"launch generation {generation}: {count} worker(s)"
        if work is None
        else f"launch generation {generation} (no live instance left): {count} worker(s) for {work} "
        "message(s) still queued, and a fresh replacement budget"
    )
    return LaunchPlan(START, generation, count, generation_client_token(cluster_id, generation), why)


def root_volume_size(image: dict[str, Any] | None, requested: int | None) -> int | None:
    """The root volume size: as requested, else the AMI's own (RunInstances wants one to encrypt it)."""
    if requested:
        return int(requested)
    for mapping in (image or {}).get("BlockDeviceMappings", []):
        if mapping.get("DeviceName") == (image or {}).get("RootDeviceName"):
            size = mapping.get("Ebs", {}).get("VolumeSize")
            if size:
                return int(size)
    return DEFAULT_ROOT_VOLUME_GB if image and image.get("RootDeviceName") else None


BUNDLE_SERVICE = "s3"
WORKER_PACKAGE = "ec2cluster_worker"


def code_search_dirs(context: Context) -> list[Path]:
    """Where a handler's module is looked for when ``code`` is not given: the DAG file's folder."""
    dag = context.get("dag")
    fileloc = getattr(dag, "fileloc", None)
    return [Path(fileloc).resolve().parent] if fileloc else []


def user_modules(config: dict[str, Any]) -> dict[str, str]:
    """The top-level modules the workers import for the user, by field: ``handler.target`` (a Python
    handler's ``module:attribute``) and ``output.target`` (a custom output's)."""
    modules = {}
    for field, section in (("handler.target", "handler"), ("output.target", "output")):
        spec = config.get(section) or {}
        if not isinstance(spec, dict) or spec.get("type") not in ("python", "custom"):
            continue
        module = str(spec.get("target") or "").split(":", 1)[0].strip().split(".", 1)[0]
        if module:
            modules[field] = module
    return modules


def user_module_problems(config: dict[str, Any], bundle: Bundle) -> list[str]:
    """The user's modules must be in the bundle: the workers import nothing from Airflow's environment."""
    names = bundle_top_level_names(bundle.path) | {WORKER_PACKAGE}
    return [
        f"{field}: module {module!r} is not in the cluster's bundle (the workers run only what it holds, "
        f"never Airflow's environment): pass code=['path/to/{module}.py' or its package folder], put it "
        f"beside the DAG file, or list the distribution that provides it in requirements"
        for field, module in user_modules(config).items()
        if module not in names
    ]


def bundle_top_level_names(path: Path) -> set[str]:
    """Importable top-level names in a bundle: under ``code/`` and ``site/``."""
    names = set()
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            parts = name.split("/")
            if len(parts) >= 2 and parts[0] in ("code", "site") and parts[1]:
                top = parts[1]
                if len(parts) == 2:  # a module file
                    if not top.endswith(".py"):
                        continue
                    top = top[:-3]
                names.add(top)
    return names


def lifetime_problems(boot_timeout: Any, max_lifetime: Any) -> list[str]:
    problems = []
    try:
        if int(boot_timeout) < 10:
            raise ValueError
    except (TypeError, ValueError):
        problems.append(
            f"boot_timeout: {boot_timeout!r} is not a number of seconds of at least 10 (the instance's "
            "watchdog shuts it down when its worker has not started by then)"
        )
    if max_lifetime not in (None, ""):
        try:
            if int(max_lifetime) < 300:
                raise ValueError
        except (TypeError, ValueError):
            problems.append(
                f"max_lifetime: {max_lifetime!r} is not a number of seconds of at least 300 (or None: no "
                "limit); the instance shuts itself down once it has run that long"
            )
    return problems


def min_workers_problems(min_workers: Any, num_workers: Any) -> list[str]:
    """What is wrong with ``min_workers`` (RunInstances MinCount) given ``num_workers`` (MaxCount)."""
    if min_workers in (None, ""):
        return []
    try:
        minimum, maximum = int(min_workers), int(num_workers)
    except (TypeError, ValueError):
        return [f"min_workers: {min_workers!r} is not a positive integer"]
    if minimum < 1:
        return [f"min_workers: {minimum} is below 1; give at least 1, or leave it out for all-or-nothing"]
    if minimum > maximum:
        return [f"min_workers: {minimum} is more than num_workers ({maximum}); lower it or raise num_workers"]
    return []


SQS_HOST_REGION_RE = re.compile(
    r"^https?://(?:sqs\.([a-z0-9-]+)\.amazonaws\.com|([a-z0-9-]+)\.queue\.amazonaws\.com)/"
)


def instance_types_of(value: Any) -> list[str]:
    """``instance_type`` as a list: one name, a comma-separated string, or a list (order kept, once each)."""
    names = value.split(",") if isinstance(value, str) else list(value or [])
    return list(dict.fromkeys(str(name).strip() for name in names if str(name).strip()))


def capacity_of(capacity: Any, spot: Any) -> str:
    """The launch's market choice: ``capacity`` when given, else spot or on-demand as ``spot`` says."""
    if capacity not in (None, ""):
        return str(capacity)
    return SPOT if as_bool(spot) else ON_DEMAND


def capacity_problems(
    capacity: Any,
    spot: Any,
    on_demand_strategy: Any,
    spot_strategy: Any,
    max_workers: Any,
    num_workers: Any,
) -> list[str]:
    """What is wrong with the fleet's choices: markets, allocation strategies, the cluster's ceiling."""
    problems = []
    if capacity not in (None, "") and capacity not in CAPACITY_CHOICES:
        problems.append(
            f"capacity: {capacity!r} is not one of {', '.join(CAPACITY_CHOICES)}; "
            "'spot-then-on-demand' takes spot where it can and on-demand for the rest"
        )
    elif capacity == ON_DEMAND and as_bool(spot):
        problems.append("spot: True contradicts capacity='on-demand'; drop spot (capacity says it all)")
    if on_demand_strategy not in ON_DEMAND_STRATEGIES:
        problems.append(
            f"on_demand_strategy: {on_demand_strategy!r} is not one of {', '.join(ON_DEMAND_STRATEGIES)} "
            "('prioritized': the instance types in the order given)"
        )
    if spot_strategy not in SPOT_STRATEGIES:
        problems.append(
            f"spot_strategy: {spot_strategy!r} is not one of {', '.join(SPOT_STRATEGIES)} "
            "('price-capacity-optimized' is AWS's recommendation: the pools least likely to be interrupted, "
            "then the cheapest)"
        )
    if max_workers not in (None, ""):
        try:
            ceiling, size = int(max_workers), int(num_workers)
        except (TypeError, ValueError):
            return [*problems, f"max_workers: {max_workers!r} is not a positive integer"]
        if ceiling < size:
            problems.append(
                f"max_workers: {ceiling} is less than num_workers ({size}); raise it, or leave it out for "
                "a cluster that never grows past num_workers"
            )
    return problems


def max_cost_of(max_cost: Any) -> float | None:
    """``max_cost`` as USD (None or '': no cap); :func:`max_cost_problems` has checked it."""
    return None if max_cost in (None, "") else float(max_cost)


def max_cost_problems(max_cost: Any) -> list[str]:
    """``max_cost`` must be a positive number of US dollars (or absent)."""
    try:
        value = max_cost_of(max_cost)
    except (TypeError, ValueError):
        value = float("nan")
    if value is not None and not (value > 0 and math.isfinite(value)):
        return [
            f"max_cost: {max_cost!r} is not a positive number of US dollars; give the estimated cost at "
            "which the drain stops launching replacements and growing the cluster (e.g. max_cost=25.0), or "
            "leave it out for no cap"
        ]
    return []


# EC2 Fleet's allocation strategies (CreateFleet OnDemandOptions / SpotOptions).
ON_DEMAND_STRATEGIES = ("lowest-price", "prioritized")
SPOT_STRATEGIES = ("price-capacity-optimized", "capacity-optimized", "lowest-price", "diversified")


def queue_region_problems(queue_url: str, region: str) -> list[str]:
    """A queue in another region than the cluster's: workers there would poll the wrong endpoint."""
    match = SQS_HOST_REGION_RE.match(queue_url or "")
    queue_region = match and (match.group(1) or match.group(2))
    if queue_region and queue_region != region:
        return [
            f"queue_url: {queue_url!r} is in {queue_region}, the cluster in {region}; use a queue of "
            f"{region} (let EC2ClusterEnqueueOperator create it) or set region_name={queue_region!r}"
        ]
    return []
