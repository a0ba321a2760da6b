"""Drive botocore's real container credentials client against the lab's ECS
agent emulator.

Usage: container_botocore.py {provider|error} FULL_URI

FULL_URI must be http://127.0.0.1:PORT/...; anything else is refused before a
socket is opened. Prints one JSON object on the last line.

  provider  ContainerProvider with AWS_CONTAINER_CREDENTIALS_FULL_URI, the
            SDK's own path for ECS task credentials; also the raw document.
  error     ContainerMetadataFetcher.retrieve_full_uri on a URI the agent
            refuses; reports botocore's error message.
"""

import json
import sys
from urllib.parse import urlparse

from botocore.credentials import ContainerProvider
from botocore.exceptions import MetadataRetrievalError
from botocore.utils import ContainerMetadataFetcher


def main():
    cmd, uri = sys.argv[1], sys.argv[2]
    if urlparse(uri).hostname != "127.0.0.1":
        raise SystemExit(f"refusing non-loopback endpoint {uri!r}")
    # The fetcher's timeout is 2 s; no sleeping between its 3 attempts.
    fetcher = ContainerMetadataFetcher(sleep=lambda _seconds: None)
    out = {}
    if cmd == "provider":
        provider = ContainerProvider(
            environ={"AWS_CONTAINER_CREDENTIALS_FULL_URI": uri}, fetcher=fetcher
        )
        creds = provider.load().get_frozen_credentials()
        out["method"] = provider.METHOD
        out["access_key"] = creds.access_key
        out["secret_key"] = creds.secret_key
        out["token"] = creds.token
        out["raw"] = fetcher.retrieve_full_uri(uri)
    elif cmd == "error":
        try:
            fetcher.retrieve_full_uri(uri)
            out["error"] = None
        except MetadataRetrievalError as e:
            out["error"] = str(e)
    else:
        raise SystemExit(f"unknown command {cmd!r}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
