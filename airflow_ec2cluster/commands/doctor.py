"""``ec2cluster doctor``: the launch's preflight on its own, with the launch's parameters, launching nothing.

For each subnet: the way to each service the job uses (S3 for the cluster's bundle among them), the
security groups' egress, and the image's architecture against the instance type's. Prints
one line per subnet, then each problem with its fix; exits 1 when there is a problem.
"""

from __future__ import annotations

import argparse

from airflow_ec2cluster.preflight import NETWORK_MODES, PUBLIC, architecture_problem

SERVICES = ("dynamodb", "sqs", "s3", "logs")
EXIT_PROBLEMS = 1


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "doctor",
        help="check, before launching, that the launch's subnets reach what the job needs",
        description="Run the launch operator's preflight with its parameters: for each subnet, can an "
        "instance reach every service the job uses (S3 for the cluster's bundle among them); do the "
        "security groups allow the egress; does the AMI's architecture match the instance "
        "type. Launches nothing.",
    )
    parser.add_argument("--subnet-ids", nargs="*", default=[], help="subnets (default: the default VPC's)")
    parser.add_argument(
        "--network",
        choices=NETWORK_MODES,
        default=PUBLIC,
        help="public: a public IP through an internet gateway (default); private: NAT gateway or endpoints",
    )
    parser.add_argument(
        "--security-group-ids", nargs="*", default=[], help="default: the cluster's own group (all egress)"
    )
    parser.add_argument("--image-id", default=None, help="the AMI (its architecture is checked)")
    parser.add_argument("--instance-type", default=None, help="the instance type")
    parser.add_argument(
        "--services",
        nargs="*",
        default=["dynamodb", "sqs", "s3"],
        choices=SERVICES,
        help="services the instances use (default dynamodb sqs s3: the bundle is fetched from S3)",
    )
    parser.add_argument(
        "--aws-conn-id",
        default=None,
        help="Airflow connection (default: none: boto3's credentials, region and AWS_ENDPOINT_URL)",
    )
    parser.add_argument("--region", default=None, help="AWS region (default: the connection's or boto3's)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from airflow_ec2cluster.hooks.ec2cluster import EC2ClusterHook
    from airflow_ec2cluster.operators.launch import check_network, report_line

    hook = EC2ClusterHook(aws_conn_id=args.aws_conn_id, region_name=args.region)
    found = check_network(
        hook,
        subnet_ids=list(args.subnet_ids),
        subnet_id=None,
        network=args.network,
        security_group_ids=list(args.security_group_ids),
        services=list(args.services),
    )
    problems = list(found.problems)
    image = hook.describe_image(args.image_id) if args.image_id else None
    if args.image_id and image is None:
        problems.append(f"image_id: AMI {args.image_id!r} not found in {hook.region}")
    instance_type = hook.describe_instance_type(args.instance_type) if args.instance_type else None
    if args.instance_type and instance_type is None:
        problems.append(f"instance_type: {args.instance_type!r} is not an EC2 instance type")
    arch = architecture_problem(image, instance_type)
    if arch:
        problems.append(arch)
    mode = f"network={args.network}"
    print(f"Checked {len(found.subnet_ids)} subnet(s), {mode}, for {', '.join(args.services)}")
    for report in found.reports:
        print(f"  {'ok  ' if report.ok else 'FAIL'} {report_line(report)}")
    if not problems:
        print("No problem found: the launch would go ahead.")
        return 0
    print(f"{len(problems)} problem(s); the launch would launch nothing:")
    for problem in problems:
        print(f"  - {problem}")
    return EXIT_PROBLEMS
