"""The local cloud's IAM: policy evaluation, what each request asks for, and the enforcing middleware."""
