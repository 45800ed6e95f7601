"""The local cloud's AWS endpoint: moto's server app, threaded, on loopback, with the SQS speed-up.

``python -m ec2cluster_localcloud.server --host 127.0.0.1 --port N`` (N = 0: any free port) prints
one line ``EC2CLUSTER_LOCALCLOUD_READY <endpoint url>`` on stdout once it listens, then serves until SIGTERM
or SIGINT. It exits by itself when the process that started it goes away, so it is never left behind.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import signal
import sys
import threading
import time

READY_PREFIX = "EC2CLUSTER_LOCALCLOUD_READY"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost")
PARENT_CHECK_SECONDS = 1.0
CREDENTIAL_SCOPE_RE = re.compile(r"Credential=[^/]+/\d{8}/[^/]+/([a-z0-9-]+)/aws4_request")
SERIALISED_SERVICES = ("ec2",)


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


def make_ec2_like_aws() -> None:
    """The EC2 behaviours of AWS that moto lacks and the cluster relies on."""
    make_terminate_idempotent()
    make_run_instances_idempotent()
    make_instance_profile_apply_to_every_instance()
    make_spot_launches_create_the_service_linked_role()


def serve(host: str, port: int, *, sqs_speedup: bool = True, enforce_iam: bool = False) -> None:
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    if sqs_speedup:
        from ec2cluster_localcloud import sqs_speedup as speedup

        speedup.apply()
    make_ec2_like_aws()
    # One log line per request would flood the server log of a busy cluster.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    ec2_lock = threading.Lock()
    app = serialised(DomainDispatcherApplication(create_backend_app), SERIALISED_SERVICES, ec2_lock)
    if enforce_iam:
        from ec2cluster_localcloud.account import ACCOUNT_ID, ROOT_ACCESS_KEY_ID, ROOT_SECRET_ACCESS_KEY
        from ec2cluster_localcloud.iam.enforce import IamEnforcer, MotoFacts, MotoIdentities

        identities = MotoIdentities(ACCOUNT_ID, ROOT_ACCESS_KEY_ID, ROOT_SECRET_ACCESS_KEY)
        app = IamEnforcer(app, identities, MotoFacts(ACCOUNT_ID), lock=ec2_lock)
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
        serve(args.host, args.port, sqs_speedup=not args.no_sqs_speedup, enforce_iam=args.enforce_iam)


if __name__ == "__main__":
    main()
