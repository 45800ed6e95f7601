"""``ec2cluster`` subcommands beyond the local cloud: each module has a ``register(subparsers)``."""
