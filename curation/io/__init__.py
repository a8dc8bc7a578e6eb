"""Input and output: listing, readers, atomic writes.

Importing this package sets how S3 requests are retried for every s3fs filesystem the job
opens (on the driver and in each Ray worker, since every stage that touches S3 imports it):
botocore's `standard` retry mode with `S3_MAX_ATTEMPTS` attempts, exponential backoff with
jitter (up to 20 s between attempts), on connection errors, timeouts, throttling and 5xx
answers. An object store that stops answering for a few seconds therefore delays a job
instead of failing it. `AWS_MAX_ATTEMPTS` / `AWS_RETRY_MODE` in the environment, or an
explicit `s3` entry in fsspec's configuration, take precedence.
"""

from __future__ import annotations

import os

import fsspec.config

S3_MAX_ATTEMPTS = 10
"""Attempts per S3 request (about a minute of backoff in all before a request fails)."""


def configure_s3_retries() -> None:
    """Default retry settings for s3fs filesystems (see the package docstring)."""
    s3 = fsspec.config.conf.setdefault("s3", {})
    config = s3.setdefault("config_kwargs", {})
    retries = config.setdefault("retries", {})
    retries.setdefault("mode", os.environ.get("AWS_RETRY_MODE", "standard"))
    # total_max_attempts counts the first request, as AWS_MAX_ATTEMPTS does (botocore rewrites
    # a `max_attempts` entry into this key in place)
    retries.setdefault(
        "total_max_attempts", int(os.environ.get("AWS_MAX_ATTEMPTS", S3_MAX_ATTEMPTS))
    )


configure_s3_retries()
