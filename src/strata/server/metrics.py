"""Prometheus metrics of the server (served at /metrics)."""

from prometheus_client import CollectorRegistry, Counter, Histogram

REGISTRY = CollectorRegistry()

REQUESTS = Counter("strata_requests_total", "HTTP requests", ["method", "route", "status"],
                   registry=REGISTRY)
LATENCY = Histogram("strata_request_seconds", "HTTP request latency", ["route"],
                    registry=REGISTRY,
                    buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
BYTES_RECEIVED = Counter("strata_bytes_received_total", "Request body bytes received",
                         registry=REGISTRY)
BYTES_SENT = Counter("strata_bytes_sent_total", "Response body bytes sent", registry=REGISTRY)
BYTES_DEDUPLICATED = Counter(
    "strata_bytes_deduplicated_total",
    "Raw bytes of uploaded chunks the store already held", registry=REGISTRY)
REJECTED_CHUNKS = Counter("strata_rejected_uploads_total",
                          "Uploads refused because a chunk did not match its id",
                          registry=REGISTRY)
UPLOAD_CHUNKS_KEPT = Counter(
    "strata_upload_chunks_kept_total",
    "Chunks of uploads cut short or refused midway (a dropped connection, a stalled client, "
    "a bad record) kept because they arrived whole and matched their ids",
    registry=REGISTRY)
CHECKINS = Counter("strata_checkins_total", "Agent check-ins", registry=REGISTRY)
SNAPSHOTS = Counter("strata_snapshots_committed_total", "Snapshots committed",
                    registry=REGISTRY)
STREAM_CACHE = Counter("strata_download_streams_total",
                       "Layer download streams served, by whether the stream cache had them",
                       ["cache"], registry=REGISTRY)
DELTAS = Counter("strata_file_deltas_total",
                 "Changed files of layer updates answered with a delta (sent), offered by id "
                 "for a branch reflector (offered), or not (it did not pay: the agent takes "
                 "chunks); layer manifests sent as deltas; delta bodies sent to reflectors "
                 "(to-reflector)",
                 ["outcome"], registry=REGISTRY)
MANIFEST_DELTAS = Counter("strata_manifest_deltas_total",
                          "Snapshot manifests agents sent as a delta against an earlier one",
                          registry=REGISTRY)
DELTA_CACHE = Counter("strata_file_delta_cache_total",
                      "File deltas looked up, by whether the delta cache had them", ["cache"],
                      registry=REGISTRY)
DELTA_CPU = Counter("strata_file_delta_cpu_seconds_total",
                    "CPU seconds spent computing file deltas (cache misses only)",
                    registry=REGISTRY)
