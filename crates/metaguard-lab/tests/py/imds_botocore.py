"""Drive botocore's real IMDS client against the lab's IMDS emulator.

Usage: imds_botocore.py {v2|v1|xff} BASE_URL

BASE_URL must be a loopback http://127.0.0.1:PORT address; anything else is
refused before a socket is opened. Prints one JSON object on the last line.

  v2   botocore's IMDSv2 path: _fetch_metadata_token, a GET of instance-id
       with the token, and retrieve_iam_role_credentials (what the SDK's
       credential chain calls on EC2).
  v1   one token-less GET of instance-id (IMDSv1); reports the status.
  xff  a token PUT carrying X-Forwarded-For, sent on botocore's own HTTP
       session; reports the status and what _fetch_metadata_token makes of
       such an endpoint.
"""

import json
import sys
from urllib.parse import urlparse

from botocore.awsrequest import AWSRequest
from botocore.utils import InstanceMetadataFetcher


def fetcher(base):
    # env={} and a fixed base_url: no AWS_* variable or config can redirect
    # the client anywhere else; timeout=2 and one attempt keep it fast.
    return InstanceMetadataFetcher(timeout=2, num_attempts=1, base_url=base, env={})


def main():
    cmd, base = sys.argv[1], sys.argv[2]
    if urlparse(base).hostname != "127.0.0.1":
        raise SystemExit(f"refusing non-loopback endpoint {base!r}")
    f = fetcher(base)
    out = {}
    if cmd == "v2":
        token = f._fetch_metadata_token()
        out["token"] = token
        resp = f._get_request("latest/meta-data/instance-id", None, token)
        out["instance_id"] = resp.text
        out["credentials"] = f.retrieve_iam_role_credentials()
    elif cmd == "v1":
        resp = f._get_request(
            "latest/meta-data/instance-id", retry_func=lambda r: False, token=None
        )
        out["status"] = resp.status_code
        out["body"] = resp.text
    elif cmd == "xff":
        request = AWSRequest(
            method="PUT",
            url=base.rstrip("/") + "/latest/api/token",
            headers={
                "x-aws-ec2-metadata-token-ttl-seconds": "21600",
                "X-Forwarded-For": "203.0.113.7",
            },
        )
        resp = f._session.send(request.prepare())
        out["status"] = resp.status_code
        out["body"] = resp.text
    else:
        raise SystemExit(f"unknown command {cmd!r}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
