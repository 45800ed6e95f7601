"""The local cloud's one AWS account: its id (moto's default) and its root user's access key."""

ACCOUNT_ID = "123456789012"
# The root key: the local cloud's own calls (instance runner, metadata service), and clients given no
# other identity. Allowed everything, as an account's root user is.
ROOT_ACCESS_KEY_ID = "testing"
ROOT_SECRET_ACCESS_KEY = "testing"
