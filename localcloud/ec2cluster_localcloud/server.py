"""The local cloud's AWS endpoint: moto's server app, threaded, on loopback, with the SQS speed-up.

``python -m ec2cluster_localcloud.server --host 127.0.0.1 --port N`` (N = 0: any free port) prints
one line ``EC2CLUSTER_LOCALCLOUD_READY <endpoint url>`` on stdout once it listens, then serves until SIGTERM
or SIGINT. It exits by itself when the process that started it goes away, so it is never left behind.

``--work-dir`` names the local cloud's work dir, where the instance runner writes each instance's console
(``logs/<instance id>.log``: GetConsoleOutput answers from it); ``--reachability-file``, the runner's network
verdicts (``ec2cluster_localcloud.blackhole``): with ``--enforce-iam``, a request an instance's network does
not carry is held unanswered, then dropped. RebootInstances reaches the runner through the work dir too
(``reboot-requests``: one instance id a line, appended; ``make_reboot_reach_the_instance``).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import logging
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

from ec2cluster_localcloud.price_list import with_price_list

READY_PREFIX = "EC2CLUSTER_LOCALCLOUD_READY"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost")
PARENT_CHECK_SECONDS = 1.0
CREDENTIAL_SCOPE_RE = re.compile(r"Credential=[^/]+/\d{8}/[^/]+/([a-z0-9-]+)/aws4_request")
SERIALISED_SERVICES = ("ec2",)
CONSOLE_OUTPUT_BYTES = 64 * 1024  # GetConsoleOutput: the latest 64 KB, as EC2 gives


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="The local cloud's moto server (loopback only).")
    parser.add_argument("--host", default="127.0.0.1", help="127.0.0.1 (the only address allowed)")
    parser.add_argument("--port", type=int, default=0, help="port to listen on; 0 = any free port")
    parser.add_argument(
        "--no-sqs-speedup", action="store_true", help="serve moto's SQS unmodified (for comparisons)"
    )
    parser.add_argument(
        "--enforce-iam",
        action="store_true",
        help="check every request against the caller's IAM policies, as AWS does (the root key passes)",
    )
    parser.add_argument(
        "--work-dir", default=None, help="the local cloud's work dir: instance consoles are logs/<id>.log"
    )
    parser.add_argument(
        "--reachability-file",
        default=None,
        help="the instance runner's network verdicts (JSON); with --enforce-iam, unreachable calls time out",
    )
    args = parser.parse_args(argv)
    if args.host not in LOOPBACK_HOSTS:
        parser.error(
            f"--host must be 127.0.0.1: the local cloud never listens off loopback, not {args.host!r}"
        )
    return args


def exit_when_orphaned(parent_pid: int) -> None:
    """Exit the process when its parent is gone (reparented), so a crashed owner leaves no server."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_CHECK_SECONDS)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def raise_system_exit(signum: int, frame: object) -> None:
    raise SystemExit(0)


def signed_service(environ: dict) -> str | None:
    """The AWS service a SigV4-signed request is for (its credential scope names it)."""
    match = CREDENTIAL_SCOPE_RE.search(environ.get("HTTP_AUTHORIZATION", ""))
    return match.group(1) if match else None


def serialised(app, services: tuple[str, ...], lock: threading.Lock | None = None):
    """``app`` with every request to ``services`` handled one at a time.

    moto's EC2 backend is not thread-safe under the threaded server: two TerminateInstances of one
    instance at once (the runner's and a teardown's) fail with InvalidNetworkInterfaceID.NotFound, which
    AWS never answers. EC2 calls are short (no long polling), so one lock costs little.
    """
    lock = lock or threading.Lock()

    def application(environ, start_response):
        if signed_service(environ) not in services:
            return app(environ, start_response)
        with lock:
            # Consume the response inside the lock: moto computes it lazily in some handlers.
            return list(app(environ, start_response))

    return application


def already_patched(function: object, marker: str) -> bool:
    """True when ``function``, or one it wraps (``__wrapped__``), carries ``marker``: patch once."""
    while function is not None:
        if getattr(function, marker, False):
            return True
        function = getattr(function, "__wrapped__", None)
    return False


def make_terminate_idempotent() -> None:
    """Terminating an already terminated instance succeeds, as on AWS.

    moto deletes a terminated instance's network interfaces again and answers a second TerminateInstances
    (the runner's after the worker exited, then the teardown's) with InvalidNetworkInterfaceID.NotFound.
    """
    import copy

    from moto.ec2.models.instances import Instance

    original = Instance.terminate
    if already_patched(original, "ec2cluster_idempotent"):
        return

    def terminate(self):
        if self._state.name == "terminated":
            return copy.copy(self._state)
        return original(self)

    terminate.ec2cluster_idempotent = True
    terminate.__wrapped__ = original
    Instance.terminate = terminate


def make_run_instances_idempotent() -> None:
    """RunInstances with a ClientToken already used answers with that launch's reservation, as on AWS.

    moto records the token but launches again: two drain rounds finishing one claimed replacement launch at
    once (a triggerer restarted mid-launch) would start the batch twice, where AWS starts it once.
    """
    from moto.ec2.models.instances import InstanceBackend

    original = InstanceBackend.run_instances
    if already_patched(original, "ec2cluster_idempotent"):
        return

    def run_instances(self, image_id, count, user_data, security_group_names, **kwargs):
        token = kwargs.get("client_token")
        if token:
            for reservation in self.reservations.values():
                if any(instance.client_token == token for instance in reservation.instances):
                    return reservation
        return original(self, image_id, count, user_data, security_group_names, **kwargs)

    run_instances.ec2cluster_idempotent = True
    run_instances.__wrapped__ = original
    InstanceBackend.run_instances = run_instances


def make_instance_profile_apply_to_every_instance() -> None:
    """RunInstances with an instance profile and a count of N gives all N instances the profile, as on AWS.

    moto associates the profile with the first instance only, so the others boot with no role: their
    metadata has no credentials. A replayed ClientToken answers before moto would associate the first
    instance a second time (an error on AWS's AssociateIamInstanceProfile, not on a replayed launch).
    """
    from moto.core.responses import ActionResult
    from moto.ec2.responses.instances import InstanceResponse

    original = InstanceResponse.run_instances
    if already_patched(original, "ec2cluster_every_instance"):
        return

    def run_instances(self):
        token = self._get_param("ClientToken")
        if token:
            for reservation in self.ec2_backend.reservations.values():
                if any(instance.client_token == token for instance in reservation.instances):
                    return ActionResult(reservation)
        result = original(self)
        name, arn = self._get_param("IamInstanceProfile.Name"), self._get_param("IamInstanceProfile.Arn")
        if name or arn:
            for instance in result.result.instances[1:]:
                self.ec2_backend.associate_iam_instance_profile(
                    instance_id=instance.id, iam_instance_profile_name=name, iam_instance_profile_arn=arn
                )
        return result

    run_instances.ec2cluster_every_instance = True
    run_instances.__wrapped__ = original
    InstanceResponse.run_instances = run_instances


def make_spot_launches_create_the_service_linked_role() -> None:
    """An account's first spot RunInstances creates AWSServiceRoleForEC2Spot, as on AWS.

    The caller needs iam:CreateServiceLinkedRole for it then (ec2cluster_localcloud.iam.requests asks).
    """
    import json

    from moto.ec2.responses.instances import InstanceResponse
    from moto.iam.models import iam_backends

    from ec2cluster_localcloud.iam.requests import (
        SPOT_SERVICE,
        SPOT_SERVICE_ROLE_NAME,
        SPOT_SERVICE_ROLE_PATH,
    )

    original = InstanceResponse.run_instances
    if already_patched(original, "ec2cluster_spot_role"):
        return

    def run_instances(self):
        result = original(self)
        if self._get_param("InstanceMarketOptions.MarketType") == "spot":
            iam = iam_backends[self.current_account][self.partition]
            if not any(role.name == SPOT_SERVICE_ROLE_NAME for role in iam.get_roles()):
                trust = {
                    "Version": "2012-10-17",
                    "Statement": [
                        {
                            "Effect": "Allow",
                            "Principal": {"Service": SPOT_SERVICE},
                            "Action": "sts:AssumeRole",
                        }
                    ],
                }
                iam.create_role(
                    SPOT_SERVICE_ROLE_NAME,
                    json.dumps(trust),
                    SPOT_SERVICE_ROLE_PATH,
                    None,
                    "EC2 Spot's service-linked role",
                    [],
                    None,
                    linked_service=SPOT_SERVICE,
                )
        return result

    run_instances.ec2cluster_spot_role = True
    run_instances.__wrapped__ = original
    InstanceResponse.run_instances = run_instances


def make_default_vpcs_like_aws() -> None:
    """A default VPC as AWS makes it: an internet gateway, and 0.0.0.0/0 to it on the main route table.

    moto's default VPC has neither (its default subnets map public IPs on launch, and its default group
    allows all egress, as AWS's do). Patched where moto makes it, so every region's default VPC has them,
    and so does one moto makes again after a reset.
    """
    from moto.ec2.models.vpcs import VPCBackend

    original = VPCBackend.create_default_vpc
    if already_patched(original, "ec2cluster_internet_gateway"):
        return

    def create_default_vpc(self):
        vpc = original(self)
        gateway = self.create_internet_gateway()
        self.attach_internet_gateway(gateway.id, vpc.id)
        main = next(
            table
            for table in self.route_tables.values()
            if table.vpc_id == vpc.id and table.main_association_id is not None
        )
        self.create_route(main.id, "0.0.0.0/0", gateway_id=gateway.id)
        return vpc

    create_default_vpc.ec2cluster_internet_gateway = True
    create_default_vpc.__wrapped__ = original
    VPCBackend.create_default_vpc = create_default_vpc


def make_default_security_groups_admit_their_members() -> None:
    """A VPC's default security group has AWS's inbound rule: all traffic from members of the group itself.

    moto creates it with no inbound rule. The network model reads it: an interface endpoint created without
    security groups uses the default group, which admits only instances in that same group.
    """
    from moto.ec2.models.security_groups import SecurityGroupBackend

    original = SecurityGroupBackend.create_security_group
    if already_patched(original, "ec2cluster_default_ingress"):
        return

    def create_security_group(self, name, description, vpc_id=None, tags=None, force=False, is_default=None):
        group = original(
            self, name, description, vpc_id=vpc_id, tags=tags, force=force, is_default=is_default
        )
        if is_default:
            self.authorize_security_group_ingress(
                group.id, "-1", None, None, [], source_groups=[{"GroupId": group.id}], vpc_id=group.vpc_id
            )
        return group

    create_security_group.ec2cluster_default_ingress = True
    create_security_group.__wrapped__ = original
    SecurityGroupBackend.create_security_group = create_security_group


def console_output(log_path: Path, limit: int = CONSOLE_OUTPUT_BYTES) -> bytes:
    """The last ``limit`` bytes of an instance's console (its log file); b"" when it has none yet."""
    try:
        with open(log_path, "rb") as console:
            console.seek(0, os.SEEK_END)
            console.seek(max(0, console.tell() - limit))
            return console.read()
    except FileNotFoundError:
        return b""


def make_console_output_the_instance_log(work_dir: Path) -> None:
    """GetConsoleOutput answers with the instance's console: the last 64 KB of what its user data wrote.

    moto answers canned kernel messages. The runner writes each instance's stdout and stderr to
    ``<work dir>/logs/<instance id>.log``; it stays there after the instance is terminated, and so does the
    answer, as on EC2 (for a while). Base64-encoded, as EC2 gives it; no Output before there is any.
    """
    from moto.core.responses import ActionResult
    from moto.core.types import Base64EncodedString
    from moto.core.utils import utcnow
    from moto.ec2.responses.general import General

    original = General.get_console_output
    if already_patched(original, "ec2cluster_console"):
        return

    def get_console_output(self):
        instance = self.ec2_backend.get_instance(self._get_param("InstanceId"))
        result: dict = {"InstanceId": instance.id, "Timestamp": utcnow()}
        output = console_output(work_dir / "logs" / f"{instance.id}.log")
        if output:
            result["Output"] = Base64EncodedString.from_encoded_bytes(base64.b64encode(output))
        return ActionResult(result)

    get_console_output.ec2cluster_console = True
    get_console_output.__wrapped__ = original
    General.get_console_output = get_console_output


def append_lines(path: Path, lines: list[str]) -> None:
    """Append ``lines`` to ``path`` in one write (O_APPEND): a reader never sees a request half written."""
    if not lines:
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, "".join(f"{line}\n" for line in lines).encode())
    finally:
        os.close(fd)


def make_reboot_reach_the_instance(work_dir: Path) -> None:
    """RebootInstances reboots the instance's OS, as on AWS: the instance runner does it.

    moto only sets the state to running: it does nothing to the instance, and it even "revives" a stopped or
    terminated instance. Here a running (or pending) instance stays running and its id is appended to
    ``<work dir>/reboot-requests`` (one line per instance, one write per request), which the runner reads
    on each poll (``ec2cluster_localcloud.runner.read_reboot_requests``) to reboot the instances it runs.
    Requests to reboot a terminated instance are ignored, as AWS documents, and so are requests for an
    instance that is stopped or on its way there. An unknown id is still InvalidInstanceID.NotFound.
    """
    from moto.ec2.models.instances import InstanceBackend

    from ec2cluster_localcloud.runner import REBOOT_REQUESTS_FILE, RUNNING_STATES

    original = InstanceBackend.reboot_instances
    if already_patched(original, "ec2cluster_reboot"):
        return
    requests = Path(work_dir) / REBOOT_REQUESTS_FILE

    def reboot_instances(self, instance_ids):
        instances = self.get_multi_instances_by_id(instance_ids)  # unknown ids: NotFound, as moto answers
        rebooted = [instance for instance in instances if instance._state.name in RUNNING_STATES]
        for instance in rebooted:
            instance.reboot()
        append_lines(requests, [instance.id for instance in rebooted])
        return rebooted

    reboot_instances.ec2cluster_reboot = True
    reboot_instances.__wrapped__ = original
    InstanceBackend.reboot_instances = reboot_instances


def make_capacity_like_aws(work_dir: Path | None = None) -> None:
    """RunInstances and CreateFleet within the capacity and vCPU quotas of ``<work dir>/capacity.json``
    (``ec2cluster_localcloud.capacity``; unlimited without it), and CreateFleet Type=instant as EC2 does it,
    each pool launched through RunInstances (``ec2cluster_localcloud.fleet``)."""
    from ec2cluster_localcloud import capacity
    from ec2cluster_localcloud.fleet import make_create_fleet_instant

    source = capacity.CapacityFile(Path(work_dir) / capacity.CAPACITY_FILE) if work_dir is not None else None

    def document() -> dict:
        return source.read() if source is not None else capacity.normalise({})

    # Outermost RunInstances patch: a replayed ClientToken answers before any capacity check.
    capacity.make_run_instances_respect_capacity(document)
    make_create_fleet_instant(lambda backend: capacity.headroom_of(backend, document()))


def make_spot_prices_the_price_table() -> None:
    """DescribeSpotPriceHistory answers the local cloud's spot prices (``prices.py``: what its CreateFleet
    ranks spot pools by), stamped now, in each zone of the region; moto answers 0.00001 for all, in the
    zones of its offerings only.
    So the controller's cost estimate uses the prices the allocation chose by."""
    from datetime import datetime, timezone

    from moto.core.responses import ActionResult
    from moto.ec2.responses.spot_instances import SpotInstances

    from ec2cluster_localcloud import prices

    original = SpotInstances.describe_spot_price_history
    if already_patched(original, "ec2cluster_spot_prices"):
        return

    def describe_spot_price_history(self):
        # Every zone the region launches in, for each priced type asked (all priced types when none is).
        filters = self._filters_from_querystring()
        types = self._get_param("InstanceTypes", []) or sorted(prices.ON_DEMAND_USD_PER_HOUR)
        types = [t for t in types if t in filters.get("instance-type", [t])]
        zones = [z.name for z in self.ec2_backend.describe_availability_zones()]
        zones = [z for z in zones if z in filters.get("availability-zone", [z])]
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        history = [
            {
                "InstanceType": instance_type,
                "ProductDescription": "Linux/UNIX",
                "SpotPrice": f"{price:.6f}",
                "AvailabilityZone": zone,
                "Timestamp": now,
            }
            for instance_type in types
            if (price := prices.spot_price(instance_type)) is not None
            for zone in zones
        ]
        return ActionResult({"SpotPriceHistory": history})

    describe_spot_price_history.ec2cluster_spot_prices = True
    describe_spot_price_history.__wrapped__ = original
    SpotInstances.describe_spot_price_history = describe_spot_price_history


def make_logs_like_aws() -> None:
    """CloudWatch Logs' JSON filter patterns (the drain reads failed tasks' events with one)."""
    from ec2cluster_localcloud.logs_filter import make_logs_like_aws as patch

    patch()


def make_ec2_like_aws(work_dir: Path | None = None) -> None:
    """The EC2 behaviours of AWS that moto lacks and the cluster relies on."""
    make_terminate_idempotent()
    make_run_instances_idempotent()
    make_instance_profile_apply_to_every_instance()
    make_spot_launches_create_the_service_linked_role()
    make_default_vpcs_like_aws()
    make_default_security_groups_admit_their_members()
    make_capacity_like_aws(work_dir)
    make_spot_prices_the_price_table()
    if work_dir is not None:
        make_console_output_the_instance_log(work_dir)
        make_reboot_reach_the_instance(work_dir)


def serve(
    host: str,
    port: int,
    *,
    sqs_speedup: bool = True,
    enforce_iam: bool = False,
    work_dir: Path | None = None,
    reachability_file: Path | None = None,
) -> None:
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    if sqs_speedup:
        from ec2cluster_localcloud import sqs_speedup as speedup

        speedup.apply()
    make_ec2_like_aws(work_dir)
    make_logs_like_aws()
    # One log line per request would flood the server log of a busy cluster.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    ec2_lock = threading.Lock()
    app = serialised(DomainDispatcherApplication(create_backend_app), SERIALISED_SERVICES, ec2_lock)
    app = with_price_list(app)  # moto has no pricing backend
    if enforce_iam:
        from ec2cluster_localcloud.account import ACCOUNT_ID, ROOT_ACCESS_KEY_ID, ROOT_SECRET_ACCESS_KEY
        from ec2cluster_localcloud.iam.enforce import IamEnforcer, MotoFacts, MotoIdentities

        identities = MotoIdentities(ACCOUNT_ID, ROOT_ACCESS_KEY_ID, ROOT_SECRET_ACCESS_KEY)
        network_check = None
        if reachability_file is not None:
            from ec2cluster_localcloud.blackhole import ReachabilityFile, UnreachableGuard

            network_check = UnreachableGuard(ReachabilityFile(reachability_file))
        app = IamEnforcer(app, identities, MotoFacts(ACCOUNT_ID), lock=ec2_lock, network_check=network_check)
    server = make_server("127.0.0.1", port, app, threaded=True, request_handler=MotoRequestHandler)
    print(f"{READY_PREFIX} http://127.0.0.1:{server.server_port}", flush=True)
    # Nothing else goes to stdout: the owner reads only the ready line (and may stop reading it).
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    try:
        server.serve_forever()
    finally:
        server.server_close()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    exit_when_orphaned(os.getppid())
    signal.signal(signal.SIGTERM, raise_system_exit)
    with contextlib.suppress(KeyboardInterrupt):
        serve(
            args.host,
            args.port,
            sqs_speedup=not args.no_sqs_speedup,
            enforce_iam=args.enforce_iam,
            work_dir=Path(args.work_dir) if args.work_dir else None,
            reachability_file=Path(args.reachability_file) if args.reachability_file else None,
        )


if __name__ == "__main__":
    main()
