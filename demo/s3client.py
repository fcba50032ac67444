"""The boto3 S3 client that the demo uses against its loopback S3 server."""

from __future__ import annotations

from typing import Any

import boto3
from botocore.config import Config

TEST_REGION = "us-east-1"
TEST_ACCESS_KEY_ID = "testing"
TEST_SECRET_ACCESS_KEY = "testing"


def create_s3_client(endpoint_url: str, region: str = TEST_REGION) -> Any:
    """Create an S3 client for `endpoint_url` with the fixed test credentials.

    Path-style addressing keeps the bucket in the URL path, which is the form
    the demo server's range ledger recognises as an object request.
    """
    config = Config(
        s3={"addressing_style": "path"},
        retries={"max_attempts": 3, "mode": "standard"},
    )
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=region,
        aws_access_key_id=TEST_ACCESS_KEY_ID,
        aws_secret_access_key=TEST_SECRET_ACCESS_KEY,
        config=config,
    )
